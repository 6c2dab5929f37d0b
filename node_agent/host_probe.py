"""Host side of kubelet probes: the probe ipsets and the nat SNAT rule in the node namespace.

Kubelet probes come from the node; ztunnel's in-pod rules let traffic from
``169.254.7.127`` through uncaptured. So on the node, TCP from local sockets to an enrolled
pod IP is SNATed to that address: ipset ``istio-inpod-probes-v4`` (``-v6``), type
``hash:ip`` with comment = pod UID, and the ``ISTIO_POSTRT`` nat rule of
``reference/istio-1.24/iptables/hostprobe*.golden``. Everything runs in the node namespace:
the one the agent runs in, or ``node_netns`` when given (tests pass a throwaway one), via
``nsenter`` so no thread of ours ever changes namespace. Idempotent throughout.
"""

from __future__ import annotations

import ipaddress
import logging
import subprocess
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future

from cni_plugin import constants as c
from cni_plugin.errors import RedirectionError
from cni_plugin.redirection.iptables_rules import families, host_probe_rules
from cni_plugin.redirection.settings import RedirectSettings

log = logging.getLogger("node_agent.host_probe")


def render_hostprobe(
    ipv6: bool, snat_v4: str = c.HOST_PROBE_SNAT_IPV4, snat_v6: str = c.HOST_PROBE_SNAT_IPV6
) -> list[str]:
    """``iptables-restore --noflush`` inputs, one per family: [v4] or [v4, v6]. Joined by a
    newline they are exactly ``hostprobe*.golden`` (the iptables rule model renders them)."""
    settings = RedirectSettings(ipv6=ipv6, probe_snat_ipv4=snat_v4, probe_snat_ipv6=snat_v6)
    return [host_probe_rules(settings, f).restore_text() for f in families(settings)]


class CoalescingWriter:
    """Applies line batches through one ``write(lines)`` call at a time, merging the batches
    of callers that arrive while a write runs (leader/follower, no extra thread). Each
    caller returns only once its own lines were written, or raises the write's error: so a
    burst of enrolments costs a few ``ipset restore`` runs instead of one per pod."""

    def __init__(self, write: Callable[[list[str]], None]) -> None:
        self._write = write
        self._lock = threading.Lock()
        self._pending: list[tuple[list[str], Future[None]]] = []
        self._busy = False
        self.writes = 0

    def submit(self, lines: list[str]) -> None:
        done: Future[None] = Future()
        with self._lock:
            self._pending.append((lines, done))
            leader = not self._busy
            self._busy = True
        while leader:
            with self._lock:
                batch, self._pending = self._pending, []
                if not batch:
                    self._busy = False
                    break
            try:
                self.writes += 1
                self._write([ln for lines_, _ in batch for ln in lines_])
            except BaseException as e:
                for _, f in batch:
                    f.set_exception(e)
            else:
                for _, f in batch:
                    f.set_result(None)
        done.result()


class HostProbe:
    """The real :class:`~node_agent.enrollment.ProbeSet` plus the rule that uses it."""

    def __init__(
        self,
        *,
        ipv6: bool = True,
        node_netns: str = "",
        snat_v4: str = c.HOST_PROBE_SNAT_IPV4,
        snat_v6: str = c.HOST_PROBE_SNAT_IPV6,
        iptables: str = "iptables",
    ) -> None:
        self.ipv6 = ipv6
        self.node_netns = node_netns
        self.snat_v4 = snat_v4
        self.snat_v6 = snat_v6
        self.iptables = iptables
        self._writer = CoalescingWriter(self._restore)

    def _cmd(self, argv: Sequence[str], stdin: str | None = None, check: bool = True) -> str:
        full = list(argv)
        if self.node_netns:
            full = ["nsenter", f"--net={self.node_netns}", "--", *full]
        r = subprocess.run(full, input=stdin, capture_output=True, text=True)
        if check and r.returncode != 0:
            raise RedirectionError(
                f"host probe setup failed: `{' '.join(argv)}`: {r.stderr.strip()} "
                "(the agent needs NET_ADMIN in the node namespace and the ipset/iptables tools)"
            )
        return r.stdout

    def _families(self) -> list[tuple[str, str, str, str]]:
        fams = [(c.PROBE_IPSET_V4, "inet", self.iptables, self.snat_v4)]
        if self.ipv6:
            fams.append(
                (
                    c.PROBE_IPSET_V6,
                    "inet6",
                    self.iptables.replace("iptables", "ip6tables"),
                    self.snat_v6,
                )
            )
        return fams

    def setup(self) -> None:
        """Create the ipsets and install the SNAT rule once (kept if already right)."""
        texts = render_hostprobe(self.ipv6, self.snat_v4, self.snat_v6)
        for (ipset, family, ipt, _snat), text in zip(self._families(), texts, strict=True):
            self._cmd(["ipset", "create", ipset, "hash:ip", "family", family, "comment", "-exist"])
            want = [ln for ln in text.splitlines() if ln.startswith("-A ")]
            saved = self._cmd([f"{ipt}-save", "-t", "nat"], check=False)
            if all(ln in saved.splitlines() for ln in want):
                continue
            self._flush_chain(ipt)
            self._cmd([f"{ipt}-restore", "--noflush"], stdin=text + "\n")
        log.info(
            "host probe rules in place", extra={"fields": {"node_netns": self.node_netns or "self"}}
        )

    def _flush_chain(self, ipt: str) -> None:
        for _ in range(16):  # remove every duplicate jump a crash may have left
            r = subprocess.run(
                (["nsenter", f"--net={self.node_netns}", "--"] if self.node_netns else [])
                + [ipt, "-t", "nat", "-D", "POSTROUTING", "-j", c.CHAIN_POSTROUTING],
                capture_output=True,
            )
            if r.returncode != 0:
                break
        self._cmd([ipt, "-t", "nat", "-F", c.CHAIN_POSTROUTING], check=False)
        self._cmd([ipt, "-t", "nat", "-X", c.CHAIN_POSTROUTING], check=False)

    def describe(self) -> list[str]:
        """The host probe rule and sets as they are now, one line per family (read only)."""
        lines = []
        for ipset, family, ipt, _snat in self._families():
            listed = self._cmd(["ipset", "list", ipset], check=False)
            saved = self._cmd([f"{ipt}-save", "-t", "nat"], check=False)
            rule = f"-A POSTROUTING -j {c.CHAIN_POSTROUTING}" in saved.splitlines()
            if not listed.strip():
                members = "absent"
            else:
                entries = listed.split("Members:", 1)[-1].strip().splitlines()
                members = f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}"
            lines.append(
                f"node: host probe ({family}): ipset {ipset} {members}, nat {c.CHAIN_POSTROUTING} "
                f"rule {'present' if rule else 'absent'}"
            )
        return lines

    def teardown(self) -> None:
        """Remove the rule and the sets (uninstall only; a restart keeps them)."""
        for ipset, _family, ipt, _snat in self._families():
            self._flush_chain(ipt)
            self._cmd(["ipset", "destroy", ipset], check=False)

    def _batch(self, verb: str, uid: str, ips: tuple[str, ...]) -> None:
        lines: list[str] = []
        for ip in ips:
            try:
                v6 = ipaddress.ip_address(ip).version == 6
            except ValueError:
                continue
            if v6 and not self.ipv6:
                continue
            name = c.PROBE_IPSET_V6 if v6 else c.PROBE_IPSET_V4
            extra = f' comment "{uid}"' if verb == "add" else ""
            lines.append(f"{verb} {name} {ip}{extra}")
        if lines:
            self._writer.submit(lines)

    def _restore(self, lines: list[str]) -> None:
        self._cmd(["ipset", "-exist", "restore"], stdin="\n".join(lines) + "\n")

    def add(self, uid: str, ips: tuple[str, ...]) -> None:
        self._batch("add", uid, ips)

    def remove(self, uid: str, ips: tuple[str, ...]) -> None:
        self._batch("del", uid, ips)

    def members(self) -> dict[str, str]:
        """IP -> comment (pod UID) of every entry, for checks and the status commands."""
        out: dict[str, str] = {}
        for ipset, *_ in self._families():
            text = self._cmd(["ipset", "list", ipset], check=False)
            for line in text.splitlines():
                parts = line.split()
                if len(parts) >= 3 and parts[1] == "comment":
                    out[parts[0]] = parts[2].strip('"')
        return out
