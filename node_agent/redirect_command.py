"""``istio-cni-agent redirect render|apply|remove|check``: in-pod redirection by hand.

The same backends the agent uses, built by name through the registry, so every backend
(iptables, nftables, ebpf) is reachable here. Settings default to the agent's environment
(``AMBIENT_DNS_CAPTURE``, ``AMBIENT_IPV6``, ``HOST_PROBE_SNAT_IP``, ``HOST_PROBE_SNAT_IPV6``)
so that ``check`` on a node judges what the agent would have installed.

Exit codes: 0 done (``check``: everything in place); 1 ``check`` found differences, or an
error (one line on stderr, nothing changed); 2 bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from cni_plugin import constants as c
from cni_plugin.env_flags import env_bool
from cni_plugin.errors import ConfigError
from cni_plugin.redirection.pod_overrides import PodOverrides
from cni_plugin.redirection.registry import BACKENDS, make_backend
from cni_plugin.redirection.settings import RedirectSettings

HELP = "render, apply, remove or check in-pod traffic redirection in a network namespace"
ACTIONS = ("render", "apply", "remove", "check")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=ACTIONS, help="what to do")
    parser.add_argument(
        "--netns", metavar="PATH", help="the pod's network namespace (not needed for render)"
    )
    parser.add_argument(
        "--backend", default="iptables", choices=sorted(BACKENDS), help="redirection backend"
    )
    parser.add_argument(
        "--applier",
        choices=("python-iptables", "iptables-restore"),
        help="how the iptables backend writes rules (default iptables-restore)",
    )
    parser.add_argument(
        "--ipv6",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also redirect IPv6 (default: $AMBIENT_IPV6, else on)",
    )
    parser.add_argument(
        "--dns-capture",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="capture DNS to ztunnel's 15053 (default: $AMBIENT_DNS_CAPTURE, else off as in 1.24)",
    )
    parser.add_argument(
        "--bypass-inbound",
        action="store_true",
        help="the ingress variant: no inbound capture (pod annotation "
        f"{c.BYPASS_INBOUND_ANNOTATION})",
    )
    parser.add_argument(
        "--virtual-interfaces",
        metavar="IF[,IF...]",
        default="",
        help="interfaces whose inbound TCP goes to ztunnel's 15001, e.g. a KubeVirt bridge "
        f"(pod annotation {c.VIRTUAL_INTERFACES_ANNOTATION}, same list syntax)",
    )


def settings_from(args: argparse.Namespace) -> RedirectSettings:
    ipv6 = args.ipv6 if args.ipv6 is not None else env_bool(os.environ, "AMBIENT_IPV6", True)
    dns = (
        args.dns_capture
        if args.dns_capture is not None
        else env_bool(os.environ, "AMBIENT_DNS_CAPTURE", False)
    )
    node = RedirectSettings(
        dns_capture=dns,
        ipv6=ipv6,
        bypass_inbound=bool(args.bypass_inbound),
        probe_snat_ipv4=os.environ.get("HOST_PROBE_SNAT_IP") or c.HOST_PROBE_SNAT_IPV4,
        probe_snat_ipv6=os.environ.get("HOST_PROBE_SNAT_IPV6") or c.HOST_PROBE_SNAT_IPV6,
    )
    # Parsed as the annotation is; a bad name is refused by the backend in one line.
    overrides = PodOverrides.from_annotations(
        {c.VIRTUAL_INTERFACES_ANNOTATION: args.virtual_interfaces}
    )
    return overrides.applied_to(node)


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    options: dict[str, Any] = {}
    if args.applier is not None:
        if args.backend != "iptables":
            raise ConfigError("--applier only applies to --backend iptables")
        options["applier"] = args.applier
    if args.backend == "ebpf":  # the running agent's pins and image cache (its env names)
        run_dir = os.environ.get("CNI_AGENT_RUN_DIR") or c.DEFAULT_RUN_DIR
        options["pin_root"] = os.environ.get("AMBIENT_EBPF_PIN_ROOT") or "/sys/fs/bpf/istio-cni"
        options["cache_dir"] = os.path.join(run_dir, "bpf-cache")
        options["cgroup"] = os.environ.get("HOST_CGROUP2_ROOT") or None
    backend = make_backend(args.backend, **options)
    if args.action == "render":
        print(backend.render(settings))
        return 0
    if not args.netns:
        raise ConfigError(f"{args.action} needs --netns PATH (the pod's network namespace)")
    how = _describe(backend)
    if args.action == "apply":
        backend.apply(args.netns, settings)
        print(f"applied {how} redirection in {args.netns}")
        return 0
    if args.action == "remove":
        backend.remove(args.netns, settings)
        print(f"removed {how} redirection from {args.netns}")
        return 0
    report = backend.check(args.netns, settings)
    for line in report.missing:
        print(f"missing: {line}")
    for line in report.extra:
        print(f"extra: {line}")
    if report.ok:
        print(f"ok: {how} redirection in {args.netns} is complete")
        return 0
    print(
        f"{len(report.missing)} missing, {len(report.extra)} extra in {args.netns}: "
        "run `redirect apply` to repair",
        file=sys.stderr,
    )
    return 1


def _describe(backend: Any) -> str:
    applier = getattr(backend, "applier", None)
    if applier is not None and hasattr(applier, "describe"):
        return f"{backend.name} [{applier.describe()}]"
    return str(backend.name)
