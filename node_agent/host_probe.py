"""Host side of kubelet probes: the probe ipsets and the nat SNAT rule in the node namespace.

Kubelet probes come from the node; ztunnel's in-pod rules let traffic from
``169.254.7.127`` through uncaptured. So on the node, TCP from local sockets to an enrolled
pod IP is SNATed to that address: ipset ``istio-inpod-probes-v4`` (``-v6``), type
``hash:ip`` with comment = pod UID, and the ``ISTIO_POSTRT`` nat rule of
``reference/istio-1.24/iptables/hostprobe*.golden``, with the jump inserted *first* in
``POSTROUTING`` as newer Istio does (a rule another component inserts ahead of ours cannot
SNAT or drop the probes first). Everything runs in the node namespace: the one the agent
runs in, or ``node_netns`` when given (tests pass a throwaway one), via ``nsenter`` so no
thread of ours ever changes namespace. Idempotent throughout.

The xtables variant is the one the in-pod backend detected (or detected the same way), so
the rule lands where kubelet's and kube-proxy's rules are; every write waits on the xtables
lock (``-w``), which the DaemonSet shares with the host (``/run/xtables.lock``).

Self-healing: :meth:`HostProbe.ensure` puts the rule back (first) when it drifted, and
:meth:`HostProbe.sync` makes the sets hold exactly the enrolled pods' addresses, in one
``ipset restore`` whatever the count; the agent runs both after every reconcile pass and
:meth:`sync` after adopting pods at start (a node restart empties the sets). After
:meth:`HostProbe.teardown` (uninstall) every write is refused, so an enrolment still in
flight cannot bring back what was removed.
"""

from __future__ import annotations

import ipaddress
import logging
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future

from cni_plugin import constants as c
from cni_plugin.errors import RedirectionError
from cni_plugin.redirection.iptables_restore import detect_variant, emptied_tables_script
from cni_plugin.redirection.iptables_rules import Family, families, host_probe_rules
from cni_plugin.redirection.probe_set import probe_delta as probe_delta  # its home before
from cni_plugin.redirection.settings import RedirectSettings

JUMP = f"-A POSTROUTING -j {c.CHAIN_POSTROUTING}"
LOCK_WAIT = ("-w", "5")  # seconds to wait for the xtables lock held by kubelet/kube-proxy

log = logging.getLogger("node_agent.host_probe")


def render_hostprobe(
    ipv6: bool, snat_v4: str = c.HOST_PROBE_SNAT_IPV4, snat_v6: str = c.HOST_PROBE_SNAT_IPV6
) -> list[str]:
    """``iptables-restore --noflush`` inputs, one per family: [v4] or [v4, v6]. Joined by a
    newline they are exactly ``hostprobe*.golden`` (the iptables rule model renders them)."""
    settings = RedirectSettings(ipv6=ipv6, probe_snat_ipv4=snat_v4, probe_snat_ipv6=snat_v6)
    return [host_probe_rules(settings, f).restore_text() for f in families(settings)]


def insert_first(text: str) -> str:
    """Restore input of :func:`render_hostprobe` with the jump inserted at the top of
    ``POSTROUTING`` instead of appended."""
    return text.replace(JUMP, f"-I POSTROUTING 1 -j {c.CHAIN_POSTROUTING}")


def rule_in_place(saved: str, text: str) -> bool:
    """Whether ``iptables-save -t nat`` output ``saved`` holds the rules of restore input
    ``text`` exactly once each, the jump being the first rule of ``POSTROUTING``. Pure."""
    lines = saved.splitlines()
    post = [ln for ln in lines if ln.startswith("-A POSTROUTING ")]
    want = [ln for ln in text.splitlines() if ln.startswith("-A ")]
    return post[:1] == [JUMP] and all(lines.count(ln) == 1 for ln in want)


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
        variant: str | None = None,
    ) -> None:
        self.ipv6 = ipv6
        self.node_netns = node_netns
        self.snat_v4 = snat_v4
        self.snat_v6 = snat_v6
        self._variant = variant
        self._writer = CoalescingWriter(self._restore)
        # Serialises rule/set changes with teardown; set once torn down (uninstall).
        self._lock = threading.Lock()
        self._torn_down = False

    @property
    def variant(self) -> str:
        """``legacy`` or ``nft``: given by the agent (the in-pod backend's), else detected."""
        if self._variant is None:
            self._variant = detect_variant()[0]
        return self._variant

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
        v = self.variant
        fams = [(c.PROBE_IPSET_V4, "inet", f"iptables-{v}", self.snat_v4)]
        if self.ipv6:
            fams.append((c.PROBE_IPSET_V6, "inet6", f"ip6tables-{v}", self.snat_v6))
        return fams

    def setup(self) -> None:
        """Create the sets and put the rule in place (kept if already right)."""
        self.ensure()
        log.info(
            "host probe rules in place",
            extra={"fields": {"node_netns": self.node_netns or "self", "variant": self.variant}},
        )

    def ensure(self) -> bool:
        """Sets present, rule present once and first in ``POSTROUTING``; True when
        something had to be repaired. Nothing after :meth:`teardown`."""
        texts = render_hostprobe(self.ipv6, self.snat_v4, self.snat_v6)
        repaired = False
        with self._lock:
            if self._torn_down:
                return False
            for (ipset, family, ipt, _snat), text in zip(self._families(), texts, strict=True):
                self._cmd(
                    ["ipset", "create", ipset, "hash:ip", "family", family, "comment", "-exist"]
                )
                saved = self._cmd([f"{ipt}-save", "-t", "nat"], check=False)
                if rule_in_place(saved, text):
                    continue
                self._flush_chain(ipt)
                self._cmd(
                    [f"{ipt}-restore", "--noflush", *LOCK_WAIT], stdin=insert_first(text) + "\n"
                )
                repaired = True
        if repaired:
            log.info("host probe rule (re)installed first in POSTROUTING")
        return repaired

    def _flush_chain(self, ipt: str) -> None:
        for _ in range(16):  # remove every duplicate jump a crash may have left
            r = subprocess.run(
                (["nsenter", f"--net={self.node_netns}", "--"] if self.node_netns else [])
                + [ipt, *LOCK_WAIT, "-t", "nat", "-D", "POSTROUTING", "-j", c.CHAIN_POSTROUTING],
                capture_output=True,
            )
            if r.returncode != 0:
                break
        self._cmd([ipt, *LOCK_WAIT, "-t", "nat", "-F", c.CHAIN_POSTROUTING], check=False)
        self._cmd([ipt, *LOCK_WAIT, "-t", "nat", "-X", c.CHAIN_POSTROUTING], check=False)

    def describe(self) -> list[str]:
        """The host probe rule and sets as they are now, one line per family (read only)."""
        lines = []
        for ipset, family, ipt, _snat in self._families():
            listed = self._cmd(["ipset", "list", ipset], check=False)
            saved = self._cmd([f"{ipt}-save", "-t", "nat"], check=False)
            rule = JUMP in saved.splitlines()
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
        """Remove the rule and the sets (uninstall only; a restart keeps them). Both
        families are cleaned whatever ``ipv6`` says (an earlier run may have had it on).
        Writes after this are refused."""
        with self._lock:
            self._torn_down = True
            v = self.variant
            for ipset, ipt, family in (
                (c.PROBE_IPSET_V4, f"iptables-{v}", Family.IPV4),
                (c.PROBE_IPSET_V6, f"ip6tables-{v}", Family.IPV6),
            ):
                self._flush_chain(ipt)
                self._cmd(["ipset", "destroy", ipset], check=False)
                if v == "nft":
                    self._drop_emptied_nat(family)

    def _drop_emptied_nat(self, family: Family) -> None:
        """The nf_tables ``nat`` table our restore created, when nothing else is left in it
        (the namespace as before the install; a node's kube-proxy keeps it alive)."""
        fam = "ip" if family is Family.IPV4 else "ip6"
        try:
            listing = self._cmd(["nft", "-j", "list", "ruleset", fam], check=False)
            script = emptied_tables_script(listing, family, ["nat"])
            if script:
                self._cmd(["nft", "-f", "-"], stdin=script, check=False)
        except OSError as e:  # no nft tool here: the empty table stays, harmlessly
            log.warning("empty nat table kept", extra={"fields": {"error": str(e)}})

    def _line(self, verb: str, uid: str, ip: str) -> str | None:
        try:
            v6 = ipaddress.ip_address(ip).version == 6
        except ValueError:
            return None
        if v6 and not self.ipv6:
            return None
        name = c.PROBE_IPSET_V6 if v6 else c.PROBE_IPSET_V4
        extra = f' comment "{uid}"' if verb == "add" else ""
        return f"{verb} {name} {ip}{extra}"

    def _batch(self, verb: str, uid: str, ips: tuple[str, ...]) -> None:
        lines = [ln for ln in (self._line(verb, uid, ip) for ip in ips) if ln is not None]
        if lines:
            self._writer.submit(lines)

    def _restore(self, lines: list[str]) -> None:
        with self._lock:
            if self._torn_down:
                return  # uninstalled: an enrolment still in flight must not write
            self._cmd(["ipset", "-exist", "restore"], stdin="\n".join(lines) + "\n")

    def add(self, uid: str, ips: tuple[str, ...]) -> None:
        self._batch("add", uid, ips)

    def remove(self, uid: str, ips: tuple[str, ...]) -> None:
        self._batch("del", uid, ips)

    def sync(self, enrolled: Mapping[str, tuple[str, ...]], keep: set[str] | None = None) -> int:
        """Make the sets hold exactly ``enrolled``'s addresses (uid -> ips): missing ones
        added, stale ones pruned (never one in ``keep``), all in one batch. Returns the
        number of entries changed."""
        adds, dels = probe_delta(self.members(), enrolled, keep or set())
        lines = [ln for ip, uid in adds.items() if (ln := self._line("add", uid, ip))]
        lines += [ln for ip in dels if (ln := self._line("del", "", ip))]
        if lines:
            self._writer.submit(lines)
            log.info(
                "host probe set synced",
                extra={"fields": {"added": len(adds), "pruned": len(dels)}},
            )
        return len(lines)

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
