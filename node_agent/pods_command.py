"""``istio-cni-agent pods`` and ``istio-cni-agent pod NS/NAME``: what the running agent
holds, read from its state file in the run dir (see :mod:`node_agent.state`).

``pods`` prints a table in the shape of ``istioctl ztunnel-config workloads``: NAMESPACE,
POD NAME, ADDRESS, NODE, PROTOCOL (HBONE when enrolled, else TCP), BACKEND, STATE, with
kubectl's habits: ``-A`` all namespaces (the default: the agent has no current namespace),
``-n NS`` one namespace (then no NAMESPACE column, as kubectl), ``-o wide`` adds DECISION,
ZDS, NETNS and UID, ``-o json|yaml`` the records, ``--no-headers``; columns are padded as
kubectl's tabwriter pads them (the widest cell plus 3 spaces, the last column unpadded).
``pod NS/NAME`` prints one pod: decision, state, netns inode, ZDS state, last error, the
last rule check, and the rules its backend installs for it (rendered, not read back).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from cni_plugin import constants as c
from cni_plugin.errors import ConfigError
from node_agent.state import STATE_FILE, AgentState, PodRecord, read_state, state_path

HELP_FOR = {
    "pods": "list the pods the running node agent knows (-A, -n NS, -o wide|json|yaml)",
    "pod": "show one pod the running node agent knows in detail: state, ZDS, last check, rules",
}
HELP = HELP_FOR["pods"]
COLUMN_PADDING = 3  # kubectl's printers: tabwriter.NewWriter(out, 10, 4, 3, ' ', 0)
__all__ = ["STATE_FILE", "add_arguments", "add_arguments_for", "load", "run"]


def add_arguments_for(name: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run-dir",
        default=os.environ.get("CNI_AGENT_RUN_DIR") or c.DEFAULT_RUN_DIR,
        help="the agent's run dir (env CNI_AGENT_RUN_DIR)",
    )
    if name == "pod":
        parser.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
        parser.add_argument("pod", help="NAMESPACE/NAME")
    else:
        parser.add_argument(
            "-o", "--output", choices=("table", "wide", "json", "yaml"), default="table"
        )
        scope = parser.add_mutually_exclusive_group()
        scope.add_argument("-n", "--namespace", help="only this namespace")
        scope.add_argument(
            "-A", "--all-namespaces", action="store_true", help="every namespace (the default)"
        )
        parser.add_argument("--no-headers", action="store_true", help="no header line")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_arguments_for("pods", parser)


def load(run_dir: str) -> AgentState:
    path = state_path(run_dir)
    try:
        return read_state(path)
    except FileNotFoundError:
        raise ConfigError(
            f"no agent state at {path}: is `istio-cni-agent run` running with this run dir? "
            "(pass --run-dir or set CNI_AGENT_RUN_DIR)"
        ) from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read agent state {path}: {e}") from None


def _warn_stale(doc: AgentState) -> None:
    if not doc.writer_alive():
        print(
            f"warning: the agent that wrote this state (pid {doc.pid}) is not running; "
            f"state is from {time.strftime('%H:%M:%S', time.localtime(doc.written_at))}",
            file=sys.stderr,
        )


def status_word(pod: PodRecord) -> str:
    if pod.state:
        return pod.state
    if pod.phase in ("Succeeded", "Failed"):
        return "terminated"
    return (
        "not-ambient"
        if pod.decision in ("ambient", "not_labelled")
        else pod.decision.replace("_", "-")
    )


def align(rows: list[tuple[str, ...]]) -> str:
    """Rows as kubectl prints them: every column but the last padded to its widest cell
    plus :data:`COLUMN_PADDING` spaces."""
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in rows) + COLUMN_PADDING for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "".join(cell.ljust(w) for cell, w in zip(r, widths, strict=False)) + r[-1] for r in rows
    )


def table(
    doc: AgentState,
    namespace: str | None = None,
    *,
    wide: bool = False,
    headers: bool = True,
) -> str:
    head: tuple[str, ...] = (
        "NAMESPACE", "POD NAME", "ADDRESS", "NODE", "PROTOCOL", "BACKEND", "STATE"
    )  # fmt: skip
    if wide:
        head += ("DECISION", "ZDS", "NETNS", "UID")
    rows: list[tuple[str, ...]] = [head] if headers else []
    pods = sorted(doc.pods, key=lambda p: (p.namespace, p.name))
    for p in pods:
        if namespace and p.namespace != namespace:
            continue
        enrolled = p.state == "enabled"
        row: tuple[str, ...] = (
            p.namespace,
            p.name,
            ",".join(p.ips) or "-",
            p.node or "-",
            "HBONE" if enrolled else "TCP",
            (doc.backend or "-") if p.state else "-",
            status_word(p),
        )
        if wide:
            row += (p.decision or "-", p.zds or "-", str(p.netns_inode or "-"), p.uid or "-")
        rows.append(row)
    if namespace:  # kubectl -n: the namespace is implied, no column for it
        rows = [r[1:] for r in rows]
    return align(rows)


def detail(doc: AgentState, pod: PodRecord) -> str:
    lines = [
        f"Pod:           {pod.namespace}/{pod.name}",
        f"UID:           {pod.uid}",
        f"Addresses:     {', '.join(pod.ips) or '-'}",
        f"Node:          {pod.node or '-'}",
        f"Decision:      {pod.decision}",
        f"State:         {status_word(pod)}",
        f"Annotation:    {c.REDIRECTION_ANNOTATION}={pod.annotation}",
        f"Netns inode:   {pod.netns_inode or '-'}",
        f"ZDS:           {pod.zds or '-'}"
        + ("" if doc.ztunnel_connected else " (ztunnel not connected)"),
        f"Backend:       {doc.backend}",
        f"Latency:       {pod.latency_ms} ms" if pod.latency_ms else "Latency:       -",
        f"Last error:    {pod.last_error or '-'}",
    ]
    check = pod.check
    if check:
        when = time.strftime("%H:%M:%S", time.localtime(check.at))
        lines.append(f"Last check:    {'ok' if check.ok else 'DRIFT'} at {when}")
        lines += [f"  missing: {m}" for m in check.missing]
        lines += [f"  extra:   {m}" for m in check.extra]
    if pod.state:
        lines.append("Rules:")
        lines += ["  " + ln for ln in _render_rules(doc, pod).splitlines()]
    return "\n".join(lines)


def _render_rules(doc: AgentState, pod: PodRecord) -> str:
    from cni_plugin.redirection.registry import make_backend
    from cni_plugin.redirection.settings import RedirectSettings

    settings = RedirectSettings(
        dns_capture=doc.dns_capture, ipv6=doc.ipv6, bypass_inbound=pod.bypass_inbound
    )
    try:
        return make_backend(doc.backend or "iptables").render(settings)
    except Exception as e:  # rendering is informational only
        return f"(cannot render rules for backend {doc.backend}: {e})"


def run(args: argparse.Namespace) -> int:
    doc = load(args.run_dir)
    _warn_stale(doc)
    if args.command == "pod":
        ns, _, name = args.pod.partition("/")
        if not name:
            raise ConfigError(f"give the pod as NAMESPACE/NAME, not {args.pod!r}")
        for p in doc.pods:
            if p.namespace == ns and p.name == name:
                print(_structured(p.to_json(), args.output) or detail(doc, p))
                return 0
        print(f"pod {ns}/{name} is not known to the agent on node {doc.node}", file=sys.stderr)
        return 1
    chosen = [p for p in doc.pods if not args.namespace or p.namespace == args.namespace]
    out = _structured([p.to_json() for p in chosen], args.output)
    if out is not None:
        print(out)
    elif not chosen:  # kubectl: a note on stderr, no header
        where = f"in namespace {args.namespace}" if args.namespace else "on this node"
        print(f"No pods known to the agent {where}.", file=sys.stderr)
    else:
        wide = args.output == "wide"
        print(table(doc, args.namespace, wide=wide, headers=not args.no_headers))
    return 0


def _structured(obj: object, output: str) -> str | None:
    """``-o json`` / ``-o yaml`` text, or None for the table forms."""
    if output == "json":
        return json.dumps(obj, indent=2)
    if output == "yaml":
        import yaml  # only for -o yaml: the table and json need nothing beyond the stdlib

        return str(yaml.safe_dump(obj, sort_keys=False)).rstrip("\n")
    return None
