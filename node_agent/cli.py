"""``istio-cni-agent``: one executable, subcommands in their own modules.

Each subcommand module exposes ``HELP: str``, ``add_arguments(parser)`` and
``run(args) -> int``. Only the chosen subcommand's module is imported, so a quick
``redirect check`` never pays for the Kubernetes client; the top-level help lists every
subcommand with its one-line help from ``COMMANDS`` (a unit test keeps each line equal to
its module's ``HELP``). Add a command by adding a line to ``COMMANDS``. Errors of this
project (:class:`IstioCniError`) become one clear line on stderr and exit 1, never a
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from cni_plugin.errors import IstioCniError

# subcommand -> module implementing it
COMMANDS: dict[str, str] = {
    "run": "node_agent.run_command",
    "install": "node_agent.install_command",
    "pods": "node_agent.pods_command",
    "pod": "node_agent.pods_command",
    "redirect": "node_agent.redirect_command",
}
# subcommand -> its one-line help, listed by ``istio-cni-agent --help`` without importing
# any command module (a unit test keeps each equal to its module's HELP).
COMMAND_HELP: dict[str, str] = {
    "run": "run the node agent: watch pods of this node and keep ambient pods enrolled",
    "install": "install the istio-cni plugin, kubeconfig and conflist entry on this node, "
    "and keep them",
    "pods": "list the pods the running node agent knows (-A, -n NS, -o wide|json|yaml)",
    "pod": "show one pod the running node agent knows in detail: state, ZDS, last check, rules",
    "redirect": "render, apply, remove or check in-pod traffic redirection in a network namespace",
}
ISTIO_CONTRACT = "1.24"


def version() -> str:
    """This package's version (its metadata; a source tree without it says so)."""
    from importlib import metadata

    try:
        mine = metadata.version("istio-cni-py")
    except metadata.PackageNotFoundError:
        mine = "unknown (not installed)"
    return f"istio-cni-agent {mine} (istio-cni in Python; Istio {ISTIO_CONTRACT} contract)"


def _top_parser() -> argparse.ArgumentParser:
    width = max(len(n) for n in COMMANDS)
    listing = "\n".join(f"  {n.ljust(width)}  {COMMAND_HELP[n]}" for n in COMMANDS)
    top = argparse.ArgumentParser(
        prog="istio-cni-agent",
        description="Istio ambient CNI node agent (Python)",
        usage="istio-cni-agent [-h] [--version] COMMAND [ARGS...]",
        epilog=f"commands:\n{listing}\n\n'istio-cni-agent COMMAND -h' shows a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument("--version", action="version", version=version())
    top.add_argument("command", metavar="COMMAND", choices=list(COMMANDS), help=argparse.SUPPRESS)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in COMMANDS:
        _top_parser().parse_args(args[:1] or ["--help"])
        return 2
    name = args[0]
    try:
        module = importlib.import_module(COMMANDS[name])
    except ImportError as e:
        print(f"istio-cni-agent: command {name!r} is not available: {e}", file=sys.stderr)
        return 2
    helps = getattr(module, "HELP_FOR", {})
    parser = argparse.ArgumentParser(
        prog=f"istio-cni-agent {name}", description=helps.get(name, module.HELP)
    )
    if hasattr(module, "add_arguments_for"):
        module.add_arguments_for(name, parser)
    else:
        module.add_arguments(parser)
    ns = parser.parse_args(args[1:])
    ns.command = name
    try:
        rc: int = module.run(ns)
    except IstioCniError as e:
        print(f"istio-cni-agent {name}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
