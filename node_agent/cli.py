"""``istio-cni-agent``: one executable, subcommands in their own modules.

Each subcommand module exposes ``HELP: str``, ``add_arguments(parser)`` and
``run(args) -> int``. Only the chosen subcommand's module is imported, so a quick
``redirect check`` never pays for the Kubernetes client. Add a command by adding a line to
``COMMANDS``. Errors of this project (:class:`IstioCniError`) become one clear line on
stderr and exit 1, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from cni_plugin.errors import IstioCniError

# subcommand -> module implementing it
COMMANDS: dict[str, str] = {
    "redirect": "node_agent.redirect_command",
    "run": "node_agent.run_command",
    "install": "node_agent.install_command",
    "pods": "node_agent.pods_command",
    "pod": "node_agent.pods_command",
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(
        prog="istio-cni-agent", description="Istio ambient CNI node agent (Python)"
    )
    top.add_argument("command", choices=sorted(COMMANDS), help="what to do")
    if not args or args[0] not in COMMANDS:
        top.parse_args(args[:1] or ["--help"])
        return 2
    name = args[0]
    try:
        module = importlib.import_module(COMMANDS[name])
    except ImportError as e:
        print(f"istio-cni-agent: command {name!r} is not available: {e}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog=f"istio-cni-agent {name}", description=module.HELP)
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
