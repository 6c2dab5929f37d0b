"""``istio-cni-agent run``: the node agent daemon's command line.

Reads the configuration (environment, flags override), sets up logging and the malloc
arena cap before any thread exists, builds the agent (:mod:`node_agent.agent_assembly`, the
composition root), starts it, once ready hands what start-up left behind back to the kernel
(:func:`node_agent.malloc_arenas.trim_after_start`), and runs until SIGTERM/SIGINT, then
stops it. An API server
that cannot be reached does not end the start (the agent keeps trying, not ready); a start
that fails with a project error stops what was started *without* uninstalling (the plugin
stays, new pods wait, kubelet restarts us: fail closed) and exits with its one line.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading

from cni_plugin.errors import IstioCniError
from node_agent import logs
from node_agent.agent_assembly import Agent
from node_agent.config import AgentConfig
from node_agent.malloc_arenas import cap_malloc_arenas, trim_after_start

__all__ = ["HELP", "Agent", "add_arguments", "agent_config", "run"]

log = logging.getLogger("node_agent.agent")

HELP = "run the node agent: watch pods of this node and keep ambient pods enrolled"


# -- command line ---------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--node-name", help="this node's name (env NODE_NAME)")
    a("--kubeconfig", help="kubeconfig file (env KUBECONFIG; default in-cluster)")
    a("--run-dir", dest="run_dir", help="agent run dir (env CNI_AGENT_RUN_DIR)")
    a("--ztunnel-socket", dest="ztunnel_socket", help="ZDS socket (env ZTUNNEL_UDS_ADDRESS)")
    a("--proc-root", dest="proc_root", help="host /proc mount (env HOST_PROC, /host/proc)")
    a("--netns-dir", dest="netns_dir", help="host /var/run/netns mount (env HOST_NETNS_DIR)")
    a("--host-netns", dest="host_netns", help="path of the host/node netns reference")
    a("--node-netns", dest="node_netns", help="netns for host probe rules (default: own)")
    a("--backend", choices=("iptables", "nftables", "ebpf"), help="redirection backend")
    a("--health-port", dest="health_port", type=int, help="health port (default 8000)")
    a("--monitoring-port", dest="monitoring_port", type=int, help="metrics port (15014)")
    a("--listen-address", dest="listen_address", help="address for health/metrics")
    a("--reconcile-seconds", dest="reconcile_seconds", type=float, help="drift check period")
    a("--workers", type=int, help="parallel enrollment workers (default 8)")
    a(
        "--install",
        dest="install_cni",
        action="store_true",
        default=None,
        help="run the CNI installer in-process (as Istio's agent does)",
    )
    a(
        "--log-level",
        "--log_output_level",
        dest="log_level",
        help="level or Istio's scope:level,... e.g. default:info,cni:debug (env LOG_LEVEL)",
    )
    a(
        "--log_as_json",
        dest="log_as_json",
        action="store_true",
        default=None,
        help="JSON log lines (env LOG_AS_JSON; the default), as Istio's flag",
    )


def agent_config(args: argparse.Namespace) -> AgentConfig:
    """The configuration: the environment (the chart's ConfigMap), flags winning."""
    env_cfg = AgentConfig.from_env(
        {**os.environ, **({"NODE_NAME": args.node_name} if args.node_name else {})}
    )
    fields = [
        "kubeconfig", "run_dir", "ztunnel_socket", "proc_root", "netns_dir", "host_netns",
        "node_netns", "backend", "health_port", "monitoring_port", "listen_address",
        "reconcile_seconds", "workers", "install_cni", "log_level", "log_as_json",
    ]  # fmt: skip
    return env_cfg.with_overrides(**{f: getattr(args, f, None) for f in fields})


def run(args: argparse.Namespace) -> int:
    cfg = agent_config(args)
    logs.configure(cfg.log_level, as_json=cfg.log_as_json)
    log.debug(cap_malloc_arenas())  # before any thread exists
    agent = Agent(cfg)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        started = agent.start(cancel=stop)
    except IstioCniError:
        agent.stop(uninstall=False)  # a failed start is never an uninstall
        raise
    if started:
        log.debug(trim_after_start())  # ready: what start-up left behind goes back
        stop.wait()
    agent.stop()
    return 0
