"""Host side of kubelet probes with native nftables (Istio 1.28+ ``nativeNftables``).

Role: the nftables counterpart of :class:`node_agent.host_probe.HostProbe`, with the same
methods (``setup``, ``ensure``, ``sync``, ``describe``, ``teardown``, ``add``, ``remove``,
``members``), so the agent picks either (``NATIVE_NFTABLES``, Istio's ``nativeNftables``).
In the node namespace, table ``inet istio-ambient-nat`` holds the probe sets
``istio-inpod-probes-v4``/``-v6`` (one element per enrolled pod address, comment = pod UID)
and the ``postrouting`` SNAT rule of ``reference/istio-1.28/nftables/hostprobe*.golden``,
which matches kubelet by its socket's UID (nftables has no ``--socket-exists``).

Invariants:
- Every change is one libnftables transaction, made on a short-lived thread inside the
  node namespace when ``node_netns`` is given (tests pass a throwaway one), else in the
  agent's own; no thread of ours ever changes namespace for longer than one call.
- ``setup`` is idempotent and keeps the sets' elements (the rules' ``flush table`` leaves
  set elements alone), so an agent restart drops no pod's probes.
- ``remove_rules`` takes out the chain and its rules and keeps the sets (Istio's
  ``DeleteHostRules``); ``teardown`` deletes the table, leaving the namespace as it was,
  and refuses every write after it (an enrolment in flight cannot bring the table back).
- Self-healing (issue 17 item 7, as for iptables): ``ensure`` reinstalls the chain when it
  drifted (missing, changed, a rule added or removed) or a set vanished; ``sync`` makes the
  sets hold exactly the enrolled pods' addresses, in one transaction.
- :func:`kubelet_uid` finds kubelet's UID the way Istio does (first process named
  ``kubelet`` or ``kubelite`` with "kubelet" in its arguments, or ``k3s``).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from cni_plugin import constants as c
from cni_plugin.errors import ConfigError, RedirectionError
from cni_plugin.netns import run_in_netns
from cni_plugin.redirection.nftables_backend import (
    NftContext,
    first_line,
    libnftables_context,
    parse_table_listing,
)
from cni_plugin.redirection.nftables_rules import (
    FAMILY,
    NAT_TABLE,
    POSTROUTING,
    host_probe_ruleset,
    host_probe_sets_text,
)
from cni_plugin.redirection.probe_set import probe_delta
from cni_plugin.redirection.settings import RedirectSettings

T = TypeVar("T")
log = logging.getLogger("node_agent.host_probe")
_UID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
TABLE = f"{FAMILY} {NAT_TABLE}"
# (comm, whether an argument must mention "kubelet"), in Istio's order of preference.
KUBELET_PROCESSES: tuple[tuple[str, bool], ...] = (
    ("kubelet", True),
    ("kubelite", True),
    ("k3s", False),
)


def is_kubelet(comm: str, args: Sequence[str]) -> bool:
    """Whether a process with this ``comm`` and argument vector hosts kubelet."""
    for name, needs_arg in KUBELET_PROCESSES:
        if comm == name:
            return not needs_arg or any("kubelet" in a.lower() for a in args)
    return False


def real_uid(status: str) -> int | None:
    """The real UID from a ``/proc/<pid>/status`` text (first field of ``Uid:``)."""
    for line in status.splitlines():
        if line.startswith("Uid:"):
            fields = line.split()
            return int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else None
    return None


def kubelet_uid(proc_root: str = "/proc") -> int:
    """UID of the node's kubelet, from ``proc_root`` (the host's /proc, mounted into the
    agent's container); :class:`ConfigError` when there is none to be seen."""
    root = Path(proc_root)
    try:
        pids = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())
    except OSError as e:
        raise ConfigError(f"cannot list processes in {proc_root}: {e.strerror}") from None
    for pid in pids:
        try:
            comm = (root / str(pid) / "comm").read_text().strip()
            if comm not in (name for name, _ in KUBELET_PROCESSES):
                continue
            args = (root / str(pid) / "cmdline").read_bytes().split(b"\0")
            if not is_kubelet(comm, [a.decode(errors="replace") for a in args if a]):
                continue
            uid = real_uid((root / str(pid) / "status").read_text())
        except OSError:
            continue  # the process exited while we looked
        if uid is not None:
            return uid
    raise ConfigError(
        f"no kubelet process found in {proc_root}: native nftables host probes match "
        "kubelet by its UID, so the agent needs the host's /proc (hostPID or a /proc mount)"
    )


class NftablesHostProbe:
    """The probe sets and SNAT rule in the node namespace, through libnftables."""

    variant = "nftables"  # what the agent logs where the iptables probe says legacy/nft

    def __init__(
        self,
        *,
        kubelet_uid: int,
        ipv6: bool = True,
        node_netns: str = "",
        snat_v4: str = c.HOST_PROBE_SNAT_IPV4,
        snat_v6: str = c.HOST_PROBE_SNAT_IPV6,
        nft_factory: Callable[[], NftContext] = libnftables_context,
    ) -> None:
        self.kubelet_uid = kubelet_uid
        self.ipv6 = ipv6
        self.node_netns = node_netns
        self.settings = RedirectSettings(
            ipv6=ipv6, probe_snat_ipv4=snat_v4, probe_snat_ipv6=snat_v6
        )
        self._nft_factory = nft_factory
        # Serialises changes with teardown; set once torn down (uninstall).
        self._lock = threading.Lock()
        self._torn_down = False

    def render(self) -> str:
        """The ``nft -f`` text ``setup`` feeds: the sets, then Istio's hostprobe golden."""
        return (
            host_probe_sets_text(self.ipv6)
            + host_probe_ruleset(self.settings, self.kubelet_uid).text()
        )

    def setup(self) -> None:
        """Create the sets (elements kept if they exist) and (re)install the rule."""
        with self._lock:
            if self._torn_down:
                return
            self._run(self.render(), "installing the host probe rules")
        log.info(
            "host probe rules in place",
            extra={
                "fields": {
                    "node_netns": self.node_netns or "self",
                    "variant": self.variant,
                    "kubelet_uid": self.kubelet_uid,
                }
            },
        )

    def drift(self) -> list[str]:
        """What differs from the rendered rules and sets, one line each ([] = in place)."""
        table = host_probe_ruleset(self.settings, self.kubelet_uid).tables[0]
        listing = self._in_node(lambda: _list_table(self._nft_factory()))
        if listing is None:
            return [f"table {TABLE} absent"]
        chains, others = parse_table_listing(listing)
        out: list[str] = []
        for name in self._set_names():
            if not any(o.split()[:2] == ["set", name] for o in others):
                out.append(f"set {name} absent")
        expected = table.expected_chains()
        for chain in sorted(chains.keys() - expected.keys()):
            out.append(f"chain {chain} is not ours")
        for chain, (header, rules) in expected.items():
            have = chains.get(chain)
            if have is None:
                out.append(f"chain {chain} absent")
            elif have != (header, list(rules)):
                out.append(f"chain {chain} differs: {have[0]}; {have[1]}")
        return out

    def ensure(self) -> bool:
        """Sets present, chain holding exactly the rule; True when something had to be
        repaired (the whole table is re-fed: the sets keep their elements). Nothing after
        :meth:`teardown`."""
        with self._lock:
            if self._torn_down:
                return False
            drifted = self.drift()
            if not drifted:
                return False
            self._run(self.render(), "repairing the host probe rules")
        log.info("host probe rule (re)installed", extra={"fields": {"drift": drifted[:4]}})
        return True

    def describe(self) -> list[str]:
        """The host probe rule and sets as they are now, one line (read only)."""
        members = self.members()
        drifted = self.drift()
        state = "in place" if not drifted else "; ".join(drifted[:3])
        return [
            f"node: host probe (nftables, kubelet uid {self.kubelet_uid}): table {TABLE} "
            f"{state}, {len(members)} entr{'y' if len(members) == 1 else 'ies'} in "
            + ", ".join(self._set_names())
        ]

    def remove_rules(self) -> None:
        """Delete the SNAT chain and its rules; the sets and their elements stay."""
        self._run(
            f"add table {TABLE}\nflush table {TABLE}\n"
            f"add chain {TABLE} {POSTROUTING}\ndelete chain {TABLE} {POSTROUTING}\n",
            "removing the host probe rules",
        )

    def teardown(self) -> None:
        """Delete the table: rules, sets and elements (uninstall only). Writes after this
        are refused."""
        with self._lock:
            self._torn_down = True
            self._run(f"add table {TABLE}\ndelete table {TABLE}\n", "removing the host probe table")

    def add(self, uid: str, ips: tuple[str, ...]) -> None:
        _check_uid(uid)
        lines = [
            f'add element {TABLE} {s} {{ {ip} comment "{uid}" }}' for s, ip in self._by_set(ips)
        ]
        self._write(lines, f"adding pod {uid} to the host probe sets")

    def remove(self, uid: str, ips: tuple[str, ...]) -> None:
        present = self.members()
        # Only the pod's own entries: an address reused by a newer pod keeps its entry.
        lines = [
            f"delete element {TABLE} {s} {{ {ip} }}"
            for s, ip in self._by_set(ips)
            if present.get(ip) == uid
        ]
        self._write(lines, f"removing pod {uid} from the host probe sets")

    def sync(self, enrolled: Mapping[str, tuple[str, ...]], keep: set[str] | None = None) -> int:
        """Make the sets hold exactly ``enrolled``'s addresses (uid -> ips): missing ones
        added (a changed owner re-labelled), stale ones pruned (never one in ``keep``), in
        one transaction. Returns the number of entries changed."""
        members = self.members()
        adds, dels = probe_delta(members, enrolled, keep or set())
        for uid in set(adds.values()):
            _check_uid(uid)
        by_ip = dict((ip, s) for s, ip in self._by_set((*adds, *dels)))
        lines = [
            f"delete element {TABLE} {by_ip[ip]} {{ {ip} }}"
            for ip in [*dels, *(a for a in adds if a in members)]
            if ip in by_ip
        ]
        lines += [
            f'add element {TABLE} {by_ip[ip]} {{ {ip} comment "{uid}" }}'
            for ip, uid in adds.items()
            if ip in by_ip
        ]
        self._write(lines, "syncing the host probe sets")
        if lines:
            log.info(
                "host probe set synced",
                extra={"fields": {"added": len(adds), "pruned": len(dels)}},
            )
        return len(lines)

    def members(self) -> dict[str, str]:
        """IP -> comment (pod UID) of every element of the probe sets."""
        names = self._set_names()
        texts = self._in_node(lambda: [_list_set_json(self._nft_factory(), n) for n in names])
        out: dict[str, str] = {}
        for text in texts:
            for obj in json.loads(text or "{}").get("nftables", []):
                for elem in obj.get("set", {}).get("elem", []):
                    e = elem.get("elem", {}) if isinstance(elem, dict) else {}
                    if "val" in e:
                        out[str(e["val"])] = str(e.get("comment", ""))
        return out

    # -- helpers -------------------------------------------------------------------------
    def _set_names(self) -> list[str]:
        return [c.PROBE_IPSET_V4, *([c.PROBE_IPSET_V6] if self.ipv6 else [])]

    def _by_set(self, ips: Sequence[str]) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for ip in ips:
            try:
                addr = ipaddress.ip_address(ip)
            except ValueError:
                continue  # not an address: nothing a probe could reach
            if addr.version == 6 and not self.ipv6:
                continue
            out.append((c.PROBE_IPSET_V6 if addr.version == 6 else c.PROBE_IPSET_V4, str(addr)))
        return out

    def _in_node(self, work: Callable[[], T]) -> T:
        if self.node_netns:
            return run_in_netns(self.node_netns, work)
        return work()

    def _write(self, lines: list[str], what: str) -> None:
        if not lines:
            return
        with self._lock:
            if self._torn_down:
                return  # uninstalled: an enrolment still in flight must not write
            self._run("\n".join(lines) + "\n", what)

    def _run(self, script: str, what: str) -> None:
        def work() -> None:
            rc, _, err = self._nft_factory().cmd(script)
            if rc != 0:
                raise RedirectionError(
                    f"{what} in {self.node_netns or 'the node namespace'} failed: "
                    f"{first_line(err)}; nothing was changed (the agent needs NET_ADMIN there "
                    "and a kernel with nf_tables)"
                )

        self._in_node(work)


def _check_uid(uid: str) -> None:
    if not uid or len(uid) > 128 or not set(uid) <= _UID_CHARS:
        # The UID becomes nft text (an element comment): a Kubernetes UID never fails.
        raise RedirectionError(
            f"pod UID {uid!r} cannot label a host probe entry: expected a Kubernetes UID"
        )


def _list_table(nft: NftContext) -> str | None:
    """The host probe table as ``nft list table`` text, or None when it does not exist."""
    nft.set_json_output(False)
    rc, out, _ = nft.cmd(f"list table {TABLE}")
    return out if rc == 0 else None


def _list_set_json(nft: NftContext, name: str) -> str:
    """The set as libnftables JSON, or "" when it does not exist."""
    nft.set_json_output(True)
    rc, out, _ = nft.cmd(f"list set {TABLE} {name}")
    return out if rc == 0 else ""
