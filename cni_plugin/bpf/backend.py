"""The eBPF redirection backend: tc programs, socket assignment and one policy route.

Per pod, ``apply`` (inside the pod namespace, on a short-lived thread) does:
1. ``net.ipv4.conf.lo.{accept_local,route_localnet}=1`` (old values kept in the pod's state
   map): packets turned back into lo by ``istio_egress`` carry the pod's own source address
   and, when sent to ztunnel, the destination 127.0.0.1;
2. the SPEC §6 policy route: ``fwmark 0x111/0xfff lookup 100`` -> ``local 0.0.0.0/0 dev lo``
   (and IPv6), which makes the turned-back packets local whatever their destination;
3. a clsact qdisc (only where none exists) and our filters: ``istio_ingress`` on lo and on
   every Ethernet interface, ``istio_egress`` on every Ethernet interface;
4. the pod's pins: ``<pin_root>/pods/<netns inode>/{state,istio_ingress,istio_egress}``.
Programs and their maps are shared by all pods of one settings variant (see
:mod:`cni_plugin.bpf.programs`). Any failure undoes the steps already taken.

``remove`` undoes exactly that (filters, the qdiscs we created, the sysctl, the routes, the
pins); ``check`` compares the namespace with what ``apply`` would leave, changing nothing.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from cni_plugin.bpf import image as image_mod
from cni_plugin.bpf import pod, programs, tc, virtual
from cni_plugin.bpf.availability import (
    DEFAULT_PIN_ROOT,
    Availability,
    cgroup2_root,
    probe,
    require_bpffs,
)
from cni_plugin.bpf.image import TC_PROGRAMS, VIRT_PROGRAM, ProgramImage
from cni_plugin.constants import DEFAULT_RUN_DIR
from cni_plugin.errors import ConfigError, IstioCniError, RedirectionError
from cni_plugin.netns import Netns
from cni_plugin.redirection import policy_routes
from cni_plugin.redirection.backend import CheckReport
from cni_plugin.redirection.settings import RedirectSettings, checked_virtual_interfaces
from cni_plugin.rtnetlink import (
    IPV4_DEVCONF_ACCEPT_LOCAL,
    IPV4_DEVCONF_ROUTE_LOCALNET,
    Link,
    Rtnl,
)

__all__ = ["Availability", "EbpfBackend", "cgroup2_root", "probe"]
log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_CACHE_DIR = f"{DEFAULT_RUN_DIR}/bpf-cache"  # compiled image, reused across restarts
_HOST_NETNS = "/proc/self/ns/net"
LO = (1, "lo")
# lo's devconf values apply sets to 1 (and the PodState field keeping the value before)
DEVCONF = (
    (IPV4_DEVCONF_ACCEPT_LOCAL, "accept_local_orig"),
    (IPV4_DEVCONF_ROUTE_LOCALNET, "route_localnet_orig"),
)


class EbpfBackend:
    """:class:`~cni_plugin.redirection.backend.RedirectionBackend` over tc BPF programs."""

    name = "ebpf"

    def __init__(
        self,
        pin_root: str = DEFAULT_PIN_ROOT,
        cache_dir: str | None = DEFAULT_CACHE_DIR,
        host_netns: str | None = _HOST_NETNS,
        cgroup: str | None = None,
        inbound_nat: bool = False,
    ) -> None:
        self.pin_root = Path(pin_root)
        self.cache_dir = cache_dir
        self.host_netns = host_netns
        self.cgroup = cgroup
        # Inbound by port rewrite even where bpf_sk_assign accepts ztunnel's SO_REUSEPORT
        # listeners (the path Linux < 6.5 takes anyway); for tests and as an escape hatch.
        self.inbound_nat = inbound_nat
        self._variants: dict[str, programs.Pinned] = {}  # open across applies (no reload)
        self._variants_lock = threading.Lock()  # applies run on several agent threads

    # -- protocol ------------------------------------------------------------------------
    def render(self, settings: RedirectSettings) -> str:
        pods = f"{self.pin_root}/pods/<netns inode>"
        lines = [
            f"# ebpf backend: programs from {image_mod.SOURCE_DIR / 'redirect.c'}",
            f"programs (shared by this variant): {self.pin_root}/progs/<build>-"
            f"f{programs.settings_flags(settings, self.inbound_nat)}-<probe addresses in hex>/"
            "{istio_ingress,istio_egress,cfg,counters}",
            f"node: {self.pin_root}/node-<build>/{{nat,getsockopt_link}}: istio_getsockopt on "
            f"cgroup {self.cgroup or 'v2 root'} answers SO_ORIGINAL_DST for 15001/15053",
            f"cfg: dns_capture={settings.dns_capture} bypass_inbound={settings.bypass_inbound} "
            f"ipv6={settings.ipv6} probe={settings.probe_snat_ipv4},{settings.probe_snat_ipv6}",
            "tc qdisc add dev lo clsact (unless present)",
            f"tc filter add dev lo ingress prio {tc.PRIO} handle {tc.HANDLE} bpf da istio_ingress",
            "for each Ethernet interface IF of the pod:",
            "  tc qdisc add dev IF clsact (unless present)",
            f"  tc filter add dev IF ingress prio {tc.PRIO} handle {tc.HANDLE} bpf da "
            "istio_ingress",
            f"  tc filter add dev IF egress prio {tc.PRIO} handle {tc.HANDLE} bpf da istio_egress",
            *virtual.describe(settings, pods),
            "sysctl -w net.ipv4.conf.lo.accept_local=1 net.ipv4.conf.lo.route_localnet=1 "
            "(previous values kept in the state map)",
            *policy_routes.describe_all(settings),
            f"pins: {pods}/{{state,istio_ingress,istio_egress}}",
        ]
        return "\n".join(lines) + "\n"

    def apply(self, netns_path: str, settings: RedirectSettings) -> None:
        checked_virtual_interfaces(settings)  # a bad name changes nothing
        img = self._image()
        # The namespace is validated before anything is loaded or pinned for it.
        with Netns.open(netns_path, host_netns=self.host_netns) as ns:
            shared = self._variant(img, settings)
            directory = pod.pod_dir(self.pin_root, ns.inode)
            ns.run(lambda: self._converge(directory, img, shared, settings))

    def _variant(self, img: ProgramImage, settings: RedirectSettings) -> programs.Pinned:
        """The variant's programs, kept open while their pins exist (one stat per apply)."""
        with self._variants_lock:
            return self._variant_locked(img, settings)

    def _variant_locked(self, img: ProgramImage, settings: RedirectSettings) -> programs.Pinned:
        node_dir = programs.node_dir(self.pin_root, img)
        if not all((node_dir / n).exists() for n in programs.NODE_PINS):
            # The node objects went (pins removed): programs bound to the old map go too,
            # so the ones loaded next share the new map with the new getsockopt program.
            for v in self._variants.values():
                v.close()
            self._variants.clear()
            for d in (self.pin_root / "progs").glob(f"{img.version:08x}-*"):
                shutil.rmtree(d, ignore_errors=True)
            shutil.rmtree(node_dir, ignore_errors=True)
        name = programs.variant_name(img, settings, self.inbound_nat)
        cached = self._variants.get(name)
        if cached is not None and (cached.path / "istio_ingress").exists():
            return cached
        if cached is not None:
            cached.close()
        require_bpffs(self.pin_root)
        cgroup = cgroup2_root(self.cgroup)
        try:
            node = programs.node_objects(img, self.pin_root, cgroup)
            try:
                shared = programs.variant_objects(
                    img, settings, self.pin_root, node, self.inbound_nat
                )
            finally:
                node.close()  # the pinned link keeps istio_getsockopt attached
        except OSError as e:
            raise RedirectionError(f"loading the redirection programs failed: {e}") from None
        self._variants[name] = shared
        return shared

    def remove(self, netns_path: str, settings: RedirectSettings) -> None:
        def work(directory: Path) -> None:
            with Rtnl() as nl:
                _teardown(nl, directory, settings)

        self._in_netns(netns_path, work)

    def check(self, netns_path: str, settings: RedirectSettings) -> CheckReport:
        img = self._image()
        shared = programs.existing_variant(img, settings, self.pin_root, self.inbound_nat)
        try:
            return self._in_netns(netns_path, lambda d: _check(d, img, shared, settings))
        finally:
            if shared is not None:
                shared.close()

    # -- helpers -------------------------------------------------------------------------
    def probe(self) -> Availability:
        return probe(str(self.pin_root), self.cache_dir, self.cgroup)

    def pinned_pods(self) -> set[int]:
        """Netns inodes of the pods that have pins (``pods/<inode>``)."""
        pods = self.pin_root / "pods"
        return {int(d.name) for d in (pods.iterdir() if pods.is_dir() else []) if d.name.isdigit()}

    def prune(self, live_netns_inodes: set[int], candidates: set[int] | None = None) -> list[int]:
        """Delete the pins of pods whose namespace is gone (the agent removes rules only from
        pods that still exist): every ``pods/<inode>`` not in ``live_netns_inodes``.

        ``candidates`` (from :meth:`pinned_pods`, taken *before* the live namespaces were
        listed) limits the deletion to pins that existed then, so a pod enrolled while the
        caller was listing namespaces is never pruned."""
        pruned: list[int] = []
        for inode in sorted(self.pinned_pods()):
            if inode in live_netns_inodes or (candidates is not None and inode not in candidates):
                continue
            pod.delete(self.pin_root / "pods" / str(inode))
            pruned.append(inode)
        return pruned

    def uninstall_node(self) -> bool:
        """Remove the node-wide and variant objects once no pod uses them (agent uninstall,
        tests). True when removed; the getsockopt link detaches as its pin goes."""
        pods = self.pin_root / "pods"
        if pods.is_dir() and any(pods.iterdir()):
            return False
        shutil.rmtree(self.pin_root, ignore_errors=True)
        return True

    def counters(self, settings: RedirectSettings) -> dict[str, int]:
        """The variant's packet counters (shared by its pods), or {} when not loaded."""
        shared = programs.existing_variant(self._image(), settings, self.pin_root, self.inbound_nat)
        if shared is None:
            return {}
        try:
            return shared.counters()
        finally:
            shared.close()

    def _image(self) -> ProgramImage:
        return image_mod.load_image(self.cache_dir)

    def _in_netns(self, netns_path: str, work: Callable[[Path], T]) -> T:
        with Netns.open(netns_path, host_netns=self.host_netns) as ns:
            directory = pod.pod_dir(self.pin_root, ns.inode)
            return ns.run(lambda: work(directory))

    def _converge(
        self,
        directory: Path,
        img: ProgramImage,
        shared: programs.Pinned,
        settings: RedirectSettings,
    ) -> None:
        with Rtnl() as nl:
            links = nl.links()
            state = pod.read_state(directory)
            if state is None and not directory.exists():
                # A pod we never enrolled: install straight away (filters are replaced in
                # place, so even leftovers of a crashed attempt cannot double up).
                _install(nl, directory, img, shared, settings, links)
                return
            virt_ids, virt_missing = virtual.check(nl, links, directory, settings)
            wanted = _wanted(links, shared, virt_ids)
            present = {a.key for a in tc.ours(nl, links)}
            if (
                state is not None
                and state.version == img.version
                and present == wanted
                and not virt_missing
                and all(_lo(links).devconf(k) == 1 for k, _ in DEVCONF)
                and all(pod.pinned_prog_id(directory, n) == shared.prog_id(n) for n in TC_PROGRAMS)
            ):
                policy_routes.install(settings, nl)  # adds only what is missing
                return
            _teardown(nl, directory, settings)
            _install(nl, directory, img, shared, settings, nl.links())


def _lo(links: list[Link]) -> Link:
    for link in links:
        if link.index == LO[0]:
            return link
    raise RedirectionError("the namespace has no loopback device: is it a pod namespace?")


def _wanted(
    links: list[Link], shared: programs.Pinned, virt: dict[int, int]
) -> set[tuple[int, str, str, int]]:
    """Our filters as ``tc.ours`` lists them; ``virt``: ifindex -> the pod's own
    ``istio_virt_ingress`` id on its virtual interfaces."""
    ifaces, _ = tc.pod_interfaces(links)
    ing, eg = "istio_ingress", "istio_egress"
    out = {(LO[0], tc.INGRESS, ing, shared.prog_id(ing))}
    for idx, _name in ifaces:
        if idx in virt:
            out.add((idx, tc.INGRESS, VIRT_PROGRAM, virt[idx]))
        else:
            out.add((idx, tc.INGRESS, ing, shared.prog_id(ing)))
        out.add((idx, tc.EGRESS, eg, shared.prog_id(eg)))
    return out


def _install(
    nl: Rtnl,
    directory: Path,
    img: ProgramImage,
    shared: programs.Pinned,
    settings: RedirectSettings,
    links: list[Link],
) -> None:
    undo: list[Callable[[], None]] = []
    own: programs.Pinned | None = None  # the pod's istio_virt_ingress and virt map, if any
    try:
        addrs = virtual.addresses(nl, links, settings)
        if addrs:
            own = virtual.load(img, shared, directory.parent.parent, addrs)
        state = pod.PodState(img.version)
        lo = _lo(links)
        for key, attr in DEVCONF:
            old = lo.devconf(key)
            if old != 1:
                nl.set_devconf(LO[0], key, 1)
                setattr(state, attr, old)
                undo.append(lambda k=key, o=old: nl.set_devconf(LO[0], k, o))  # type: ignore[misc]
        added = policy_routes.install(settings, nl)
        undo.append(lambda: policy_routes.undo(added, settings, nl))
        ifaces, skipped = tc.pod_interfaces(links)
        if skipped:
            log.warning("not an Ethernet interface, left unredirected: %s", ", ".join(skipped))
        for idx, _name in [LO, *ifaces]:
            if nl.add_clsact(idx):
                state.created_qdiscs.append(idx)
                undo.append(lambda i=idx: nl.del_clsact(i))  # type: ignore[misc]
            dirs = [tc.INGRESS] if idx == LO[0] else [tc.INGRESS, tc.EGRESS]
            for d in dirs:
                prog = "istio_ingress" if d == tc.INGRESS else "istio_egress"
                fds = shared.fds
                if own is not None and d == tc.INGRESS and idx in addrs:
                    prog, fds = VIRT_PROGRAM, own.fds
                tc.attach(nl, idx, d, fds[prog], prog)
                undo.append(lambda i=idx, dd=d: tc.detach(nl, i, dd))  # type: ignore[misc]
        undo.append(lambda: pod.delete(directory))
        pins = {n: shared.fds[n] for n in TC_PROGRAMS} | (own.fds if own is not None else {})
        pod.write(directory, state, pins)
    except (OSError, IstioCniError, Exception) as e:
        for step in reversed(undo):
            with contextlib.suppress(Exception):
                step()
        if isinstance(e, ConfigError):
            raise
        raise RedirectionError(
            f"attaching the redirection programs failed ({e}); nothing was left behind"
        ) from None
    finally:
        if own is not None:
            own.close()  # pinned and attached, or undone


def _teardown(nl: Rtnl, directory: Path, settings: RedirectSettings) -> None:
    """Remove everything of ours from the namespace and the pod's pins; absent is fine."""
    state = pod.read_state(directory)
    touched: set[int] = set()
    for a in tc.ours(nl):
        tc.detach(nl, a.ifindex, a.direction)
        touched.add(a.ifindex)
    # Qdiscs: the ones we created (state), else any we emptied; never one still in use.
    # Interfaces gone since (a VM's, or a pod whose recycled netns inode left its pins)
    # took their qdiscs with them.
    candidates = set(state.created_qdiscs) if state is not None else touched
    for idx in candidates & {link.index for link in nl.links()}:
        if tc.remaining_filters(nl, idx) == 0:
            nl.del_clsact(idx)
    for key, attr in DEVCONF:
        old = getattr(state, attr) if state is not None else pod.UNTOUCHED
        if old != pod.UNTOUCHED:
            nl.set_devconf(LO[0], key, old)
    policy_routes.uninstall(settings, nl)
    pod.delete(directory)


def _check(
    directory: Path,
    img: ProgramImage,
    shared: programs.Pinned | None,
    settings: RedirectSettings,
) -> CheckReport:
    missing: list[str] = []
    extra: list[str] = []
    notes: list[str] = []
    with Rtnl() as nl:
        links = nl.links()
        names = {link.index: link.name for link in links}
        present = {a.key for a in tc.ours(nl, links)}
        if shared is None:
            missing.append(f"programs of this variant pinned under {img.version:08x}")
            wanted: set[tuple[int, str, str, int]] = set()
            ifaces, _ = tc.pod_interfaces(links)
            for idx, _n in [LO, *ifaces]:
                missing.append(f"tc filters on {names.get(idx, idx)}")
        else:
            virt_ids, virt_missing = virtual.check(nl, links, directory, settings)
            wanted = _wanted(links, shared, virt_ids)
            missing += virt_missing
            notes.append("counters: " + ", ".join(f"{k}={v}" for k, v in shared.counters().items()))
        for idx, d, prog, pid in sorted(wanted - present):
            missing.append(f"tc filter {d} dev {names.get(idx, idx)} bpf {prog} (prog id {pid})")
        for idx, d, prog, pid in sorted(present - wanted):
            extra.append(f"tc filter {d} dev {names.get(idx, idx)} bpf {prog} (prog id {pid})")
        node_dir = programs.node_dir(directory.parent.parent, img)
        for n in programs.NODE_PINS:
            if not (node_dir / n).exists():
                missing.append(f"node object {node_dir / n}")
        state = pod.read_state(directory)
        if state is None:
            missing.append(f"pod state map {directory / pod.STATE}")
        elif state.version != img.version:
            extra.append(f"programs of an older build {state.version:08x} (re-apply upgrades)")
        if shared is not None:
            for n in TC_PROGRAMS:
                if pod.pinned_prog_id(directory, n) != shared.prog_id(n):
                    missing.append(f"pin {directory / n} of the attached program")
        for key, attr in DEVCONF:
            if _lo(links).devconf(key) != 1:
                missing.append(f"sysctl net.ipv4.conf.lo.{attr.removesuffix('_orig')}=1")
        rmissing, rextra = policy_routes.check(settings)
        missing += rmissing
        extra += rextra
        _, skipped = tc.pod_interfaces(links)
        if skipped:
            notes.append("not redirected (not Ethernet): " + ", ".join(skipped))
        notes += virtual.notes(links, settings)
    return CheckReport(tuple(missing), tuple(extra), tuple(notes))
