"""``istio-cni-agent install``: run the installer alone (without the node agent).

Installs, keeps the installation intact until SIGTERM/SIGINT, then uninstalls or leaves
everything for an upgrade (``--on-exit``, default ``auto``: ask the API server whether the
DaemonSet is still there). ``--once`` installs and exits (0 when installed).
"""

from __future__ import annotations

import argparse
import os
import signal
import threading

from install.config import InstallConfig

HELP = "install the istio-cni plugin, kubeconfig and conflist entry on this node, and keep them"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--once", action="store_true", help="install once and exit")
    parser.add_argument(
        "--on-exit",
        choices=("auto", "uninstall", "keep"),
        default="auto",
        help="on SIGTERM: auto (uninstall unless the DaemonSet still exists), uninstall, keep",
    )
    parser.add_argument("--log-level", default="info")


def run(args: argparse.Namespace) -> int:
    from install.installer import Installer
    from node_agent import logs

    logs.configure(args.log_level)
    config = InstallConfig.from_env(os.environ)
    installer = Installer(config)
    if args.once:
        ok = installer.install_once()
        if not ok:
            print(f"no primary CNI config in {config.mounted_cni_net_dir} yet")
        return 0 if ok else 1

    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    installer.start()
    done.wait()
    if args.on_exit == "auto":
        from install.teardown import is_upgrade

        uninstall = not is_upgrade(config.pod_namespace)
    else:
        uninstall = args.on_exit == "uninstall"
    installer.stop(uninstall=uninstall)
    return 0
