"""``istio-cni-agent redirect render|apply|remove|check|uninstall-node``: in-pod
redirection by hand, and the node-wide state it leaves.

The same backends the agent uses, built by name through the registry, so every backend
(iptables, nftables, ebpf) is reachable here. Settings default to the agent's environment
(``AMBIENT_DNS_CAPTURE``, ``AMBIENT_IPV6``, ``HOST_PROBE_SNAT_IP``, ``HOST_PROBE_SNAT_IPV6``)
so that ``check`` on a node judges what the agent would have installed.

Node-wide state has one owner, the backend's node lifecycle
(:mod:`node_agent.backend_selection`): ``remove`` releases it when the namespace was the
last one using it (ebpf: pins, the ``nat`` map, the ``istio_getsockopt`` cgroup link) and
otherwise says in one line that it stays and how to remove it; ``check`` reports it (without
``--netns``: only it) together with the agent's host probe rule and ipsets;
``uninstall-node`` removes both once no pod uses them. The host probe state is looked at in
``NODE_NETNS`` when set (as the agent does), else in this process's namespace: the iptables
rule and ipsets, and the native nftables table (``NATIVE_NFTABLES``) -- ``check`` reports
the one the agent's environment selects, ``uninstall-node`` removes both kinds.

Exit codes: 0 done (``check``: everything in place); 1 ``check`` found differences,
``uninstall-node`` found node-wide state still in use, or an error (one line on stderr,
nothing changed); 2 bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from cni_plugin import constants as c
from cni_plugin.env_flags import env_bool
from cni_plugin.errors import ConfigError, IstioCniError
from cni_plugin.redirection.nftables_host_probe import NftablesHostProbe, kubelet_uid
from cni_plugin.redirection.pod_overrides import PodOverrides
from cni_plugin.redirection.registry import BACKENDS, make_backend
from cni_plugin.redirection.settings import RedirectSettings
from node_agent.backend_selection import HostProbeRules, NodeLifecycle, Selection
from node_agent.host_probe import HostProbe

HELP = "render, apply, remove or check in-pod traffic redirection in a network namespace"
ACTIONS = ("render", "apply", "remove", "check", "uninstall-node")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=ACTIONS, help="what to do")
    parser.add_argument(
        "--netns",
        metavar="PATH",
        help="the pod's network namespace (not for render and uninstall-node; check without it "
        "reports only the node-wide state)",
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
    node = Selection.of(backend).node_lifecycle(
        os.environ.get("HOST_PROC") or "/proc", os.environ.get("HOST_NETNS_DIR") or "/run/netns"
    )
    if args.action == "uninstall-node":
        return _uninstall_node(node, settings)
    if args.action == "check" and not args.netns:
        _print_node_state(node, settings)
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
        print(node.release().line)
        return 0
    report = backend.check(args.netns, settings)
    _print_node_state(node, settings)
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


def _host_probe(settings: RedirectSettings) -> HostProbe:
    return HostProbe(
        ipv6=settings.ipv6,
        node_netns=os.environ.get("NODE_NETNS", ""),
        snat_v4=settings.probe_snat_ipv4,
        snat_v6=settings.probe_snat_ipv6,
    )


def _nft_host_probe(settings: RedirectSettings, both: bool = False) -> NftablesHostProbe:
    try:  # the UID only matters to `check` (the rule it expects); 0 when none is seen
        uid = kubelet_uid(os.environ.get("HOST_PROC") or "/proc")
    except ConfigError:
        uid = 0
    return NftablesHostProbe(
        kubelet_uid=uid,
        ipv6=settings.ipv6 or both,  # both: uninstall looks at both sets, whatever IPv6 says
        node_netns=os.environ.get("NODE_NETNS", ""),
        snat_v4=settings.probe_snat_ipv4,
        snat_v6=settings.probe_snat_ipv6,
    )


def _print_node_state(node: NodeLifecycle, settings: RedirectSettings) -> None:
    for line in node.describe():
        print(line)
    probe: HostProbeRules = _host_probe(settings)
    if env_bool(os.environ, "NATIVE_NFTABLES", False):
        probe = _nft_host_probe(settings)
    try:
        lines = probe.describe()
    except (OSError, IstioCniError) as e:  # the ipset/iptables tools or libnftables missing
        lines = [
            f"node: host probe state unreadable ({getattr(e, 'strerror', None) or e}): install "
            "ipset and iptables (or nftables, with NATIVE_NFTABLES)"
        ]
    for line in lines:
        print(line)


def _uninstall_node(node: NodeLifecycle, settings: RedirectSettings) -> int:
    """Remove the backend's node-wide state and the host probe rule and sets, each only
    once no pod uses it (the agent's pods would lose their redirection or their probes).
    Pods whose namespace is gone (deleted without a CNI DEL) do not count: their leftovers
    are pruned first, as the agent's reconcile pass does."""
    node.housekeeping()
    outcome = node.release()
    print(outcome.line)
    probe = _host_probe(settings)
    members = probe.members()
    nft: NftablesHostProbe | None = _nft_host_probe(settings, both=True)
    try:
        nft_members = nft.members() if nft is not None else {}
    except IstioCniError:  # no libnftables here: nothing of ours can be in nf_tables sets
        nft, nft_members = None, {}
    if members or nft_members:
        print(
            f"node: the host probe rule and sets stay: {len(members) + len(nft_members)} pod "
            "address(es) still in them (the agent has pods enrolled); uninstall the agent first"
        )
        return 1
    probe.teardown()
    print(f"node: host probe rule ({c.CHAIN_POSTROUTING}) and ipsets removed (or were absent)")
    if nft is not None:
        nft.teardown()
        print("node: native nftables host probe table inet istio-ambient-nat removed (or absent)")
    return 0 if outcome.removed else 1


def _describe(backend: Any) -> str:
    applier = getattr(backend, "applier", None)
    if applier is not None and hasattr(applier, "describe"):
        return f"{backend.name} [{applier.describe()}]"
    return str(backend.name)
