"""The eBPF backend in real namespaces: agent restart and adoption, exact removal (also
next to someone else's clsact filter and pre-set sysctls), the gap before ztunnel listens,
and the availability probe's messages. Pins live under a per-test root, always removed."""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from cni_plugin.bpf import image
from cni_plugin.bpf.availability import cgroup2_root, require_bpffs
from cni_plugin.bpf.backend import EbpfBackend
from cni_plugin.errors import ConfigError
from cni_plugin.netns import Netns, run_in_netns
from cni_plugin.redirection.settings import RedirectSettings
from tests.netns.bpf_support import CACHE_DIR, skip_if_unavailable

pytestmark = pytest.mark.netns

POD, PEER = "198.51.100.2", "198.51.100.1"
SETTINGS = RedirectSettings()
SYSCTLS = ("net.ipv4.conf.lo.accept_local", "net.ipv4.conf.lo.route_localnet")


@dataclass
class Pod:
    ns: str
    peer: str
    path: str
    backend: EbpfBackend
    pin_root: Path


def _sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def pod(make_netns: Callable[[str], str]) -> Iterator[Pod]:
    skip_if_unavailable()
    ns, peer = make_netns("bpfpod"), make_netns("bpfpeer")
    _sh("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", "eth0",
        "netns", peer)  # fmt: skip
    for n, addr in ((ns, POD), (peer, PEER)):
        _sh("ip", "-n", n, "addr", "add", f"{addr}/24", "dev", "eth0")
        _sh("ip", "-n", n, "link", "set", "eth0", "up")
    pin_root = Path(f"/sys/fs/bpf/icnit-be-{secrets.token_hex(4)}")
    backend = EbpfBackend(pin_root=str(pin_root), cache_dir=CACHE_DIR)
    try:
        yield Pod(ns, peer, f"/run/netns/{ns}", backend, pin_root)
    finally:
        shutil.rmtree(pin_root, ignore_errors=True)
    assert not pin_root.exists()


def _state(p: Pod) -> dict[str, str]:
    return {
        "qdisc": _sh("tc", "-n", p.ns, "qdisc", "show"),
        "filters": "".join(
            _sh("tc", "-n", p.ns, "filter", "show", "dev", dev, d)
            for dev in ("lo", "eth0")
            for d in ("ingress", "egress")
        ),
        "rules": _sh("ip", "-n", p.ns, "rule") + _sh("ip", "-n", p.ns, "-6", "rule"),
        # Table 100 is ours; the others change on their own while the veth comes up
        # (carrier, IPv6 link-local), which is not ours to compare.
        "routes": _table_100(p.ns, "-4") + _table_100(p.ns, "-6"),
        "sysctl": _sh("ip", "netns", "exec", p.ns, "sysctl", *SYSCTLS),
    }


def _table_100(ns: str, fam: str) -> str:
    """Routes of table 100; empty whether the table never existed or was emptied (the
    kernel keeps an emptied table allocated, invisibly, until the namespace goes)."""
    done = subprocess.run(["ip", "-n", ns, fam, "route", "show", "table", "100"],
                          capture_output=True, text=True)  # fmt: skip
    return done.stdout if done.returncode == 0 else ""


def _listener(path: str, port: int) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen(8)
        s.settimeout(5)
        return s

    return run_in_netns(path, make)


def _client(path: str) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket()
        s.settimeout(5)
        return s

    return run_in_netns(path, make, host_netns=None)


@contextmanager
def _outbound_connection(
    pod: Pod, outbound: socket.socket, port: int, timeout: float = 5
) -> Iterator[tuple[socket.socket, socket.socket]]:
    """An app in the pod dials PEER:``port``; the redirection hands the connection to
    ``outbound`` (the pod's 15001 listener). Yields (the app's socket, the accepted one),
    both closed on exit."""
    app = run_in_netns(pod.path, socket.socket)
    with app:
        app.settimeout(timeout)
        app.connect((PEER, port))
        conn, _ = outbound.accept()
        with conn:
            yield app, conn


def _original_dst(conn: socket.socket) -> tuple[int, str, int]:
    """(family, address, port) that SO_ORIGINAL_DST answers for an accepted IPv4 connection."""
    raw = conn.getsockopt(socket.SOL_IP, 80, 16)  # 80: SO_ORIGINAL_DST
    family = int.from_bytes(raw[0:2], "little")
    return family, socket.inet_ntoa(raw[4:8]), int.from_bytes(raw[2:4], "big")


def test_restart_adopts_and_keeps_redirecting(pod: Pod) -> None:
    pod.backend.apply(pod.path, SETTINGS)
    with Netns.open(pod.path) as ns:
        pod_dir = pod.pin_root / "pods" / str(ns.inode)
    assert {p.name for p in pod_dir.iterdir()} == {"state", "istio_ingress", "istio_egress"}
    attached = _state(pod)
    # A new agent: nothing in memory, not even the compiled image; only bpffs and the cache.
    image._loaded.clear()
    fresh = EbpfBackend(pin_root=str(pod.pin_root), cache_dir=CACHE_DIR)
    assert fresh.check(pod.path, SETTINGS).ok
    fresh.apply(pod.path, SETTINGS)
    assert _state(pod) == attached, "adoption must not re-attach anything"
    outbound = _listener(pod.path, 15001)
    with outbound, _listener(pod.peer and f"/run/netns/{pod.peer}", 80) as real:
        with _outbound_connection(pod, outbound, 80) as (app, conn):
            assert conn.getsockname() == ("127.0.0.1", 15001)
            app.sendall(b"ping")
            assert conn.recv(4) == b"ping"
            conn.sendall(b"pong")
            assert app.recv(4) == b"pong"
        real.settimeout(0.2)
        with pytest.raises(TimeoutError):
            real.accept()  # the peer itself never saw the connection


def test_remove_restores_everything_next_to_foreign_filters(pod: Pod) -> None:
    # Someone else's clsact filter on eth0 and a pre-set sysctl must survive us.
    _sh("tc", "-n", pod.ns, "qdisc", "add", "dev", "eth0", "clsact")
    _sh("tc", "-n", pod.ns, "filter", "add", "dev", "eth0", "ingress", "pref", "7", "protocol",
        "ip", "u32", "match", "u32", "0", "0", "classid", "1:1")  # fmt: skip
    _sh("ip", "netns", "exec", pod.ns, "sysctl", "-q", "net.ipv4.conf.lo.route_localnet=1")
    before = _state(pod)
    pod.backend.apply(pod.path, SETTINGS)
    assert _state(pod) != before
    assert pod.backend.check(pod.path, SETTINGS).ok
    pod.backend.remove(pod.path, SETTINGS)
    assert _state(pod) == before
    assert not any((pod.pin_root / "pods").iterdir())
    report = pod.backend.check(pod.path, SETTINGS)
    assert not report.ok and not report.extra
    pod.backend.remove(pod.path, SETTINGS)  # absent: still fine
    assert _state(pod) == before


def test_inbound_before_ztunnel_listens_waits_then_lands_on_15006(pod: Pod) -> None:
    """The gap between installing redirection and ztunnel opening its listeners: the SYN
    is dropped (never delivered around ztunnel), the client retransmits, and the connection
    lands on 15006 as soon as it exists."""
    pod.backend.apply(pod.path, SETTINGS)
    app = _listener(pod.path, 8080)
    client = _client(f"/run/netns/{pod.peer}")
    result: dict[str, object] = {}

    def connect() -> None:
        try:
            client.connect((POD, 8080))
            result["ok"] = True
        except OSError as e:
            result["error"] = e

    t = threading.Thread(target=connect)
    t.start()
    time.sleep(0.3)
    assert not result, "the connection must wait for ztunnel, neither fail nor bypass it"
    with app, client, _listener(pod.path, 15006) as inbound:
        t.join(timeout=6)
        assert result == {"ok": True}
        conn, _ = inbound.accept()
        with conn:
            assert conn.getsockname() == (POD, 8080), "original destination kept"
        app.settimeout(0.2)
        with pytest.raises(TimeoutError):
            app.accept()
    assert pod.backend.counters(SETTINGS)["no_listener"] >= 1


def test_render_names_hooks_and_routes() -> None:
    text = EbpfBackend(pin_root="/sys/fs/bpf/icnit-render").render(SETTINGS)
    for needle in ("lo ingress", "egress", "istio_ingress", "istio_egress", "clsact",
                   "fwmark 0x111/0xfff lookup 100", "local 0.0.0.0/0 dev lo table 100",
                   "local ::/0", "accept_local", "getsockopt"):  # fmt: skip
        assert needle in text, needle
    assert not Path("/sys/fs/bpf/icnit-render").exists(), "render must not touch bpffs"


def test_probe_and_config_errors_name_the_fix(tmp_path: Path) -> None:
    skip_if_unavailable()
    assert EbpfBackend(pin_root=f"/sys/fs/bpf/icnit-probe-{secrets.token_hex(3)}",
                       cache_dir=CACHE_DIR).probe().ok  # fmt: skip
    with pytest.raises(ConfigError, match="mount -t bpf"):
        require_bpffs(tmp_path)
    with pytest.raises(ConfigError, match="cgroup2"):
        cgroup2_root(str(tmp_path))


def test_bulk_transfer_through_outbound_capture(pod: Pod) -> None:
    """Large (GSO-sized) segments survive the egress rewrite and the turn back into lo."""
    pod.backend.apply(pod.path, SETTINGS)
    blob = bytes(range(256)) * 16384  # 4 MiB
    with (
        _listener(pod.path, 15001) as outbound,
        _outbound_connection(pod, outbound, 80, timeout=10) as (app, conn),
    ):
        conn.settimeout(10)
        assert _carried(app, conn, blob) == blob
        assert _carried(conn, app, blob) == blob  # and the reply, back the other way


def _carried(src: socket.socket, dst: socket.socket, blob: bytes) -> bytes:
    """Send ``blob`` from ``src`` on a thread (it is larger than the socket buffers) and
    return the first len(blob) bytes ``dst`` receives."""
    sender = threading.Thread(target=src.sendall, args=(blob,))
    sender.start()
    got = bytearray()
    while len(got) < len(blob):
        got += dst.recv(1 << 16)
    sender.join()
    return bytes(got)


def test_prune_deletes_pins_of_vanished_pods(pod: Pod) -> None:
    pod.backend.apply(pod.path, SETTINGS)
    with Netns.open(pod.path) as ns:
        inode = ns.inode
    stale = pod.pin_root / "pods" / "12345"
    stale.mkdir()
    assert pod.backend.prune({inode}) == [12345]
    assert not stale.exists()
    assert (pod.pin_root / "pods" / str(inode) / "state").exists()


def test_dual_stack_listener_gets_ipv4_original_destination(pod: Pod) -> None:
    """ztunnel binds [::]:15001 dual-stack; an IPv4 connection accepted there has a
    v4-mapped peer, and SO_ORIGINAL_DST (SOL_IP, asked first) must still answer."""
    pod.backend.apply(pod.path, SETTINGS)

    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET6)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", 15001))
        s.listen(8)
        s.settimeout(5)
        return s

    with (
        run_in_netns(pod.path, make) as outbound,
        _outbound_connection(pod, outbound, 8443) as (_, conn),
    ):
        assert conn.getpeername()[0] == f"::ffff:{POD}"
        assert _original_dst(conn) == (socket.AF_INET, PEER, 8443)


def test_original_destination_with_conntrack_active_in_the_pod(pod: Pod) -> None:
    """Another netfilter user in the pod (here: conntrack matches) activates conntrack; it
    then answers SO_ORIGINAL_DST itself with the loopback address it saw (checked by hand:
    127.0.0.1:15001 without the getsockopt program). The program must still answer the
    real original destination."""
    for chain in ("OUTPUT", "INPUT"):
        _sh("ip", "netns", "exec", pod.ns, "iptables-legacy", "-A", chain, "-m", "conntrack",
            "--ctstate", "NEW", "-j", "ACCEPT")  # fmt: skip
    pod.backend.apply(pod.path, SETTINGS)
    with (
        _listener(pod.path, 15001) as outbound,
        _outbound_connection(pod, outbound, 8443) as (_, conn),
    ):
        tracked = _sh("ip", "netns", "exec", pod.ns, "cat", "/proc/net/nf_conntrack")
        assert "dport=15001" in tracked, "conntrack must be tracking the connection"
        assert _original_dst(conn)[1:] == (PEER, 8443)


def test_concurrent_applies_compile_once_and_all_succeed(
    make_netns: Callable[[str], str], tmp_path: Path
) -> None:
    """An agent enrols pods on several threads: with nothing compiled yet, concurrent
    applies must not run bcc twice at once (it corrupts its heap) and must all succeed."""
    skip_if_unavailable()
    names = [make_netns("bpfconc") for _ in range(4)]
    pin_root = Path(f"/sys/fs/bpf/icnit-conc-{secrets.token_hex(4)}")
    backend = EbpfBackend(pin_root=str(pin_root), cache_dir=str(tmp_path))
    image._loaded.clear()
    errors: list[BaseException] = []

    def apply(ns: str) -> None:
        try:
            backend.apply(f"/run/netns/{ns}", SETTINGS)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=apply, args=(ns,)) for ns in names]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors
        assert all(backend.check(f"/run/netns/{ns}", SETTINGS).ok for ns in names)
        assert len(list(tmp_path.glob("redirect-*.json"))) == 1, "compiled once, cached once"
    finally:
        shutil.rmtree(pin_root, ignore_errors=True)


def test_lost_node_objects_are_reported_and_rebuilt_by_apply(pod: Pod) -> None:
    pod.backend.apply(pod.path, SETTINGS)
    for link in pod.pin_root.glob("node-*/getsockopt_link"):
        link.unlink()
    report = pod.backend.check(pod.path, SETTINGS)
    assert any("getsockopt_link" in m for m in report.missing), report
    pod.backend.apply(pod.path, SETTINGS)
    assert pod.backend.check(pod.path, SETTINGS).ok
    with (
        _listener(pod.path, 15001) as outbound,
        _outbound_connection(pod, outbound, 8443) as (_, conn),
    ):
        assert _original_dst(conn)[1:] == (PEER, 8443)  # answered by the rebuilt link


VIRT_GW, VM = "203.0.113.1", "203.0.113.2"


def _add_vm(pod: Pod, make_netns: Callable[[str], str]) -> str:
    """A VM namespace behind the pod's interface virt0 (KubeVirt style)."""
    vm = make_netns("bpfvm")
    _sh("ip", "link", "add", "virt0", "netns", pod.ns, "type", "veth", "peer", "name", "eth0",
        "netns", vm)  # fmt: skip
    _sh("ip", "-n", pod.ns, "addr", "add", f"{VIRT_GW}/24", "dev", "virt0")
    _sh("ip", "-n", vm, "addr", "add", f"{VM}/24", "dev", "eth0")
    for n, dev in ((pod.ns, "virt0"), (vm, "eth0")):
        _sh("ip", "-n", n, "link", "set", dev, "up")
    _sh("ip", "-n", vm, "route", "add", "default", "via", VIRT_GW)
    return vm


def _virt0_filters(p: Pod) -> str:
    return "".join(_sh("tc", "-n", p.ns, "filter", "show", "dev", "virt0", d)
                   for d in ("ingress", "egress"))  # fmt: skip


def test_virtual_interface_gets_its_own_program_and_goes_exactly(
    pod: Pod, make_netns: Callable[[str], str]
) -> None:
    _add_vm(pod, make_netns)
    virt = RedirectSettings(virtual_interfaces=("virt0", "absent0"))
    before = (_state(pod), _virt0_filters(pod))
    pod.backend.apply(pod.path, virt)
    with Netns.open(pod.path) as ns:
        pod_dir = pod.pin_root / "pods" / str(ns.inode)
    assert {p.name for p in pod_dir.iterdir()} == {
        "state", "istio_ingress", "istio_egress", "istio_virt_ingress", "virt"
    }  # fmt: skip
    filters = _virt0_filters(pod)
    assert "istio_virt_ingress" in filters and "istio_egress" in filters
    assert "istio_virt_ingress" not in _state(pod)["filters"]  # lo and eth0 keep theirs
    report = pod.backend.check(pod.path, virt)
    assert report.ok, report
    assert any("absent0" in n for n in report.notes)
    applied = (_state(pod), filters)
    pod.backend.apply(pod.path, virt)
    assert (_state(pod), _virt0_filters(pod)) == applied, "a second apply changes nothing"

    # The interface's address changed: check says so, the next apply follows it.
    _sh("ip", "-n", pod.ns, "addr", "del", f"{VIRT_GW}/24", "dev", "virt0")
    _sh("ip", "-n", pod.ns, "addr", "add", "203.0.113.9/24", "dev", "virt0")
    stale = pod.backend.check(pod.path, virt)
    assert any("virtual interface addresses" in m for m in stale.missing), stale
    pod.backend.apply(pod.path, virt)
    assert pod.backend.check(pod.path, virt).ok

    # The pod's annotation went away: virt0 is an ordinary interface again.
    plain = RedirectSettings()
    pod.backend.apply(pod.path, plain)
    assert pod.backend.check(pod.path, plain).ok
    assert "istio_virt_ingress" not in _virt0_filters(pod)
    assert not (pod_dir / "virt").exists() and not (pod_dir / "istio_virt_ingress").exists()

    pod.backend.apply(pod.path, virt)
    pod.backend.remove(pod.path, virt)
    _sh("ip", "-n", pod.ns, "addr", "del", "203.0.113.9/24", "dev", "virt0")
    _sh("ip", "-n", pod.ns, "addr", "add", f"{VIRT_GW}/24", "dev", "virt0")
    assert (_state(pod), _virt0_filters(pod)) == before
    assert not any((pod.pin_root / "pods").iterdir())


def test_vm_original_destination_with_conntrack_active_in_the_pod(
    pod: Pod, make_netns: Callable[[str], str]
) -> None:
    """As for the pod's own clients: with conntrack active, the kernel answers
    SO_ORIGINAL_DST with the virtual interface's address it saw; the program must answer
    the real destination, and ztunnel's replies must leave with the peer's address."""
    vm = _add_vm(pod, make_netns)
    for chain in ("PREROUTING", "INPUT"):
        _sh("ip", "netns", "exec", pod.ns, "iptables-legacy", "-t", "mangle", "-A", chain,
            "-m", "conntrack", "--ctstate", "NEW", "-j", "ACCEPT")  # fmt: skip
    pod.backend.apply(pod.path, RedirectSettings(virtual_interfaces=("virt0",)))
    with _listener(pod.path, 15001) as outbound:
        client = run_in_netns(f"/run/netns/{vm}", socket.socket)
        with client:
            client.settimeout(5)
            client.connect((PEER, 8443))
            conn, peer = outbound.accept()
            with conn:
                assert peer[0] == VM and conn.getsockname() == (VIRT_GW, 15001)
                tracked = _sh("ip", "netns", "exec", pod.ns, "cat", "/proc/net/nf_conntrack")
                assert "dport=15001" in tracked, "conntrack must be tracking the connection"
                assert _original_dst(conn)[1:] == (PEER, 8443)
                assert client.getpeername() == (PEER, 8443)
                conn.sendall(b"pong")
                assert client.recv(4) == b"pong"
