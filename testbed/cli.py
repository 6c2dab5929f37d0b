"""``istio-cni-testbed``: build, bring up, inspect and tear down the single-node Kubernetes.

- ``build``: build (or find cached) Kubernetes binaries and images; prints their location.
  The release is ``ISTIO_CNI_TESTBED_KUBERNETES`` (default ``testbed.build.KUBERNETES_VERSION``),
  built from the Go module proxy; ``1.20`` is the old Debian-source build (comparisons only).
- ``up [--mesh] [--backend iptables|nftables|ebpf]``: prints ONE JSON object on stdout
  (progress goes to stderr); exit 0 only when the node is Ready.
- ``down``: removes everything (also after a crashed run); exit 1 lists what remains.
- ``status``: JSON saying what is running.
Errors are one clear line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from testbed.build import KUBERNETES_VERSION, BuildError, ensure_binaries
from testbed.images import ImageError, build_images
from testbed.layout import Layout
from testbed.mesh import MeshUnavailable
from testbed.node import BACKENDS, Testbed, TestbedError
from testbed.provision import ProvisionError


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="istio-cni-testbed", description=__doc__.split("\n")[0])
    p.add_argument(
        "--instance",
        help="node instance (default: $ISTIO_CNI_TESTBED_INSTANCE or 'node' = icni-tb-node)",
    )
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "build",
        help="build/cache the Kubernetes binaries and images "
        f"(release: $ISTIO_CNI_TESTBED_KUBERNETES, default {KUBERNETES_VERSION})",
    )
    up = sub.add_parser("up", help="bring the node up; prints one JSON object")
    up.add_argument("--mesh", action="store_true", help="also start installer, agent, stand-in")
    up.add_argument("--backend", choices=BACKENDS, default="iptables")
    up.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for Ready")
    up.add_argument("--replace", action="store_true", help="replace a running node")
    sub.add_parser("down", help="remove everything the testbed made")
    sub.add_parser("status", help="what is running (JSON)")
    args = p.parse_args(argv)
    try:
        bed = Testbed(Layout.for_instance(args.instance))
    except ValueError as e:
        print(f"istio-cni-testbed: {e}", file=sys.stderr)
        return 2
    try:
        if args.command == "build":
            bins = ensure_binaries(bed.cache)
            images = build_images(bed.cache / "images")
            print(
                json.dumps(
                    {
                        "bin_dir": str(bins.bin_dir),
                        "version": bins.version,
                        "images": {n: str(i.tarball) for n, i in images.items()},
                    },
                    indent=2,
                )
            )
        elif args.command == "up":
            info = bed.up(
                mesh=args.mesh, backend=args.backend, timeout=args.timeout, replace=args.replace
            )
            print(json.dumps(info, indent=2))
        elif args.command == "down":
            problems = bed.down()
            if problems:
                for line in problems:
                    print(f"istio-cni-testbed down: still there: {line}", file=sys.stderr)
                return 1
        else:
            print(json.dumps(bed.status(), indent=2))
    except (TestbedError, BuildError, ImageError, MeshUnavailable, ProvisionError) as e:
        print(f"istio-cni-testbed {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
