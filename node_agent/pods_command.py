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
from typing import Any

from cni_plugin import constants as c
from cni_plugin.errors import ConfigError
from node_agent.state import read_state, writer_alive

HELP = "show the pods the running node agent knows (table), or one pod in detail"
STATE_FILE = "agent-state.json"


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


def load(run_dir: str) -> dict[str, Any]:
    path = os.path.join(run_dir, STATE_FILE)
    try:
        doc = read_state(path)
    except FileNotFoundError:
        raise ConfigError(
            f"no agent state at {path}: is `istio-cni-agent run` running with this run dir? "
            "(pass --run-dir or set CNI_AGENT_RUN_DIR)"
        ) from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read agent state {path}: {e}") from None
    return doc


def _warn_stale(doc: dict[str, Any]) -> None:
    if not writer_alive(doc):
        print(
            f"warning: the agent that wrote this state (pid {doc.get('pid')}) is not running; "
            f"state is from {time.strftime('%H:%M:%S', time.localtime(doc.get('written_at', 0)))}",
            file=sys.stderr,
        )


def status_word(pod: dict[str, Any]) -> str:
    if pod.get("state"):
        return str(pod["state"])
    if pod.get("phase") in ("Succeeded", "Failed"):
        return "terminated"
    decision = str(pod.get("decision", ""))
    return "not-ambient" if decision in ("ambient", "not_labelled") else decision.replace("_", "-")


def table(doc: dict[str, Any], namespace: str | None = None) -> str:
    rows = [("NAMESPACE", "POD NAME", "ADDRESS", "NODE", "PROTOCOL", "BACKEND", "STATE")]
    pods = sorted(doc.get("pods", []), key=lambda p: (p["namespace"], p["name"]))
    for p in pods:
        if namespace and p["namespace"] != namespace:
            continue
        enrolled = p.get("state") == "enabled"
        rows.append(
            (
                p["namespace"],
                p["name"],
                ",".join(p.get("ips") or []) or "-",
                p.get("node") or "-",
                "HBONE" if enrolled else "TCP",
                doc.get("backend", "-") if p.get("state") else "-",
                status_word(p),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        " ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def detail(doc: dict[str, Any], pod: dict[str, Any]) -> str:
    lines = [
        f"Pod:           {pod['namespace']}/{pod['name']}",
        f"UID:           {pod['uid']}",
        f"Addresses:     {', '.join(pod.get('ips') or []) or '-'}",
        f"Node:          {pod.get('node') or '-'}",
        f"Decision:      {pod.get('decision')}",
        f"State:         {status_word(pod)}",
        f"Annotation:    {c.REDIRECTION_ANNOTATION}={pod.get('annotation')}",
        f"Netns inode:   {pod.get('netns_inode') or '-'}",
        f"ZDS:           {pod.get('zds') or '-'}"
        + ("" if doc.get("ztunnel_connected") else " (ztunnel not connected)"),
        f"Backend:       {doc.get('backend')}",
        f"Latency:       {pod.get('latency_ms')} ms"
        if pod.get("latency_ms")
        else "Latency:       -",
        f"Last error:    {pod.get('last_error') or '-'}",
    ]
    check = pod.get("check")
    if check:
        when = time.strftime("%H:%M:%S", time.localtime(check.get("at", 0)))
        lines.append(f"Last check:    {'ok' if check.get('ok') else 'DRIFT'} at {when}")
        lines += [f"  missing: {m}" for m in check.get("missing", [])]
        lines += [f"  extra:   {m}" for m in check.get("extra", [])]
    if pod.get("state"):
        lines.append("Rules:")
        lines += ["  " + ln for ln in _render_rules(doc, pod).splitlines()]
    return "\n".join(lines)


def _render_rules(doc: dict[str, Any], pod: dict[str, Any]) -> str:
    from cni_plugin.redirection.registry import make_backend
    from cni_plugin.redirection.settings import RedirectSettings

    settings = RedirectSettings(
        dns_capture=bool(doc.get("dns_capture")),
        ipv6=bool(doc.get("ipv6", True)),
        bypass_inbound=bool(pod.get("bypass_inbound")),
    )
    try:
        return make_backend(str(doc.get("backend", "iptables"))).render(settings)
    except Exception as e:  # rendering is informational only
        return f"(cannot render rules for backend {doc.get('backend')}: {e})"


def run(args: argparse.Namespace) -> int:
    doc = load(args.run_dir)
    _warn_stale(doc)
    if args.command == "pod":
        ns, _, name = args.pod.partition("/")
        if not name:
            raise ConfigError(f"give the pod as NAMESPACE/NAME, not {args.pod!r}")
        for p in doc.get("pods", []):
            if p["namespace"] == ns and p["name"] == name:
                print(json.dumps(p, indent=2) if args.output == "json" else detail(doc, p))
                return 0
        print(
            f"pod {ns}/{name} is not known to the agent on node {doc.get('node')}", file=sys.stderr
        )
        return 1
    if args.output == "json":
        print(json.dumps(doc.get("pods", []), indent=2))
    else:
        print(table(doc, args.namespace))
    return 0
