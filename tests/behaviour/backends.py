"""THE list of redirection backends the behaviour table runs against. Add yours here.

Each entry names a backend as :func:`cni_plugin.redirection.registry.make_backend` knows it,
the options to build it with, a probe that returns why it cannot run on this machine (the
test is then skipped with that reason, never silently), and the ways to break an installed
redirection behind the backend's back (``check`` must notice each one).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cni_plugin.redirection.backend import RedirectionBackend
from cni_plugin.redirection.registry import make_backend
from tests.netns import bpf_support as bpf

# A tamper gets the backend instance and the pod netns name, and deletes one installed
# piece (never anything else); it returns a short description for failure messages.
Tamper = Callable[[RedirectionBackend, str], str]


@dataclass(frozen=True)
class BackendCase:
    id: str  # pytest id
    name: str  # registry name
    options: dict[str, Any] = field(default_factory=dict)
    unavailable: Callable[[], str | None] = lambda: None  # reason to skip, or None
    tampers: tuple[tuple[str, Tamper], ...] = ()
    # case id -> why this backend does not behave like Istio there yet. Such cases run as
    # strict xfail: visible in every run, and an unexpected pass fails until removed here.
    known_gaps: dict[str, str] = field(default_factory=dict)

    def build(self) -> RedirectionBackend:
        return make_backend(self.name, **self.options)


def _needs(*tools: str) -> Callable[[], str | None]:
    def probe() -> str | None:
        missing = [t for t in tools if shutil.which(t) is None]
        return f"missing tools: {', '.join(missing)} (run make setup)" if missing else None

    return probe


def _python_iptables_unavailable() -> str | None:
    try:
        import iptc  # type: ignore[import-untyped,unused-ignore]  # noqa: F401
    except (ImportError, OSError) as e:
        return f"python-iptables cannot load here: {e}"
    return _needs("iptables-legacy-save", "ip6tables-legacy-save")()


def delete_nat_outbound_redirect(backend: RedirectionBackend, ns: str) -> str:
    """Delete the last rule of nat ISTIO_OUTPUT (the 15001 REDIRECT) with the backend's own
    xtables variant."""
    variant = backend.applier.variant  # type: ignore[attr-defined]
    cmd = ["ip", "netns", "exec", ns, f"iptables-{variant}", "-t", "nat"]
    listed = subprocess.run([*cmd, "-S", "ISTIO_OUTPUT"], capture_output=True, text=True,
                            check=True).stdout.splitlines()  # fmt: skip
    subprocess.run([*cmd, "-D", "ISTIO_OUTPUT", str(len(listed) - 1)], check=True)
    return f"deleted `{listed[-1]}` ({variant})"


def delete_policy_rule(backend: RedirectionBackend, ns: str) -> str:
    """Delete the IPv4 fwmark policy rule (shared by backends that use policy routing)."""
    subprocess.run(["ip", "-n", ns, "rule", "del", "pref", "32764"], check=True)
    return "deleted ip rule pref 32764"


def _nftables_unavailable() -> str | None:
    try:
        import nftables  # noqa: F401
    except (ImportError, OSError) as e:
        return f"libnftables (python3-nftables) cannot load here: {e}"
    return _needs("nft")()


def delete_nft_outbound_redirect(backend: RedirectionBackend, ns: str) -> str:
    """Delete the last 15001 redirect of chain istio-output in table inet istio-ambient-nat."""
    where = ["inet", "istio-ambient-nat", "istio-output"]
    listed = subprocess.run(["ip", "netns", "exec", ns, "nft", "-a", "list", "chain", *where],
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    rule = [ln.strip() for ln in listed.splitlines() if "redirect to :15001" in ln][-1]
    handle = rule.rsplit("# handle", 1)[1].strip()
    subprocess.run(["ip", "netns", "exec", ns, "nft", "delete", "rule", *where, "handle", handle],
                   check=True)  # fmt: skip
    return f"deleted nft rule `{rule}`"


IPTABLES_TAMPERS: tuple[tuple[str, Tamper], ...] = (
    ("nat-rule", delete_nat_outbound_redirect),
    ("policy-rule", delete_policy_rule),
)

BACKENDS: list[BackendCase] = [
    BackendCase(
        "iptables-restore",
        "iptables",
        {"applier": "iptables-restore"},
        unavailable=_needs("iptables-nft-restore", "iptables-legacy-restore"),
        tampers=IPTABLES_TAMPERS,
    ),
    BackendCase(
        "python-iptables",
        "iptables",
        {"applier": "python-iptables"},
        unavailable=_python_iptables_unavailable,
        tampers=IPTABLES_TAMPERS,
    ),
    BackendCase(
        "nftables",
        "nftables",
        unavailable=_nftables_unavailable,
        tampers=(("nft-rule", delete_nft_outbound_redirect), ("policy-rule", delete_policy_rule)),
    ),
    BackendCase(
        "ebpf",
        "ebpf",
        bpf.options(),
        unavailable=bpf.unavailable,
        tampers=bpf.TAMPERS,
    ),
    # The same programs on the inbound path Linux < 6.5 takes (port rewrite instead of
    # bpf_sk_assign, which refuses ztunnel's SO_REUSEPORT listeners there).
    BackendCase(
        "ebpf-inbound-nat",
        "ebpf",
        {**bpf.options(), "inbound_nat": True},
        unavailable=bpf.unavailable,
        tampers=bpf.TAMPERS,
    ),
]
