"""``istio-cni-agent pods`` and ``istio-cni-agent pod NS/NAME``: what the running agent
holds, read from its state file in the run dir (see :mod:`node_agent.state`).

``pods`` prints a table in the shape of ``istioctl ztunnel-config workloads``: NAMESPACE,
POD NAME, ADDRESS, NODE, PROTOCOL (HBONE when enrolled, else TCP), BACKEND, STATE.
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

HELP = "show the pods the running node agent knows (table), or one pod in detail"
__all__ = ["STATE_FILE", "add_arguments", "add_arguments_for", "load", "run"]


def add_arguments_for(name: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run-dir",
        default=os.environ.get("CNI_AGENT_RUN_DIR") or c.DEFAULT_RUN_DIR,
        help="the agent's run dir (env CNI_AGENT_RUN_DIR)",
    )
    parser.add_argument("-o", "--output", choices=("table", "json"), default="table")
    if name == "pod":
        parser.add_argument("pod", help="NAMESPACE/NAME")
    else:
        parser.add_argument("-n", "--namespace", help="only this namespace")


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


def table(doc: AgentState, namespace: str | None = None) -> str:
    rows = [("NAMESPACE", "POD NAME", "ADDRESS", "NODE", "PROTOCOL", "BACKEND", "STATE")]
    pods = sorted(doc.pods, key=lambda p: (p.namespace, p.name))
    for p in pods:
        if namespace and p.namespace != namespace:
            continue
        enrolled = p.state == "enabled"
        rows.append(
            (
                p.namespace,
                p.name,
                ",".join(p.ips) or "-",
                p.node or "-",
                "HBONE" if enrolled else "TCP",
                (doc.backend or "-") if p.state else "-",
                status_word(p),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        " ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


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
                print(
                    json.dumps(p.to_json(), indent=2) if args.output == "json" else detail(doc, p)
                )
                return 0
        print(f"pod {ns}/{name} is not known to the agent on node {doc.node}", file=sys.stderr)
        return 1
    if args.output == "json":
        print(json.dumps([p.to_json() for p in doc.pods], indent=2))
    else:
        print(table(doc, args.namespace))
    return 0
