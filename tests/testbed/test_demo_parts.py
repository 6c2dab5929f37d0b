"""The demo's pieces without the testbed: bookinfo's manifests and its app scripts (real
busybox, real HTTP, in a throwaway namespace), the capture's TLS/plaintext verdicts, the
``ss`` parser."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cni_plugin.netns import run_in_netns
from testbed.bookinfo import manifests as M
from testbed.demo_capture import Flow, VethCapture, summarise, tls_records
from testbed.demo_node import listening_ports

BUSYBOX = Path("/bin/busybox")
IP = shutil.which("ip") or "/sbin/ip"  # absolute: the apps' PATH holds busybox applets only


# --- manifests -----------------------------------------------------------------------------
def test_waves_start_every_workload_after_what_it_calls() -> None:
    waves = [[w.name for w in wave] for wave in M.waves()]
    assert waves == [
        ["details-v1", "ratings-v1", "reviews-v1"],
        ["reviews-v2", "reviews-v3"],
        ["productpage-v1"],
    ]
    cyclic = (M.Workload("a", "v1", calls=("b",)), M.Workload("b", "v1", calls=("a",)))
    with pytest.raises(ValueError, match="cycle"):
        M.waves(cyclic)


def test_upstream_env_uses_pod_ips_and_keeps_v4_out_of_productpage() -> None:
    ips = {"details-v1": "10.0.0.3", "reviews-v1": "10.0.0.4", "reviews-v2": "10.0.0.5",
           "reviews-v4": "10.0.0.9", "ratings-v1": "10.0.0.6"}  # fmt: skip
    page = next(w for w in M.BOOKINFO if w.app == "productpage")
    assert M.upstream_env(page, ips) == {
        "DETAILS": "10.0.0.3:9080",
        "REVIEWS": "10.0.0.4:9080 10.0.0.5:9080",
    }
    assert M.upstream_env(M.LATE, ips) == {
        "RATINGS": "10.0.0.6:9080",
        "STARTUP_CALL": "10.0.0.6:9080/ratings/0",
    }
    with pytest.raises(ValueError, match="no ratings pod"):
        M.upstream_env(M.LATE, {"details-v1": "10.0.0.3"})


def test_each_app_has_its_own_service_account_and_a_probe() -> None:
    pods = [M.pod(w, "img", {}) for w in (*M.BOOKINFO, M.LATE)]
    sas = {p["metadata"]["labels"]["app"]: p["spec"]["serviceAccountName"] for p in pods}
    assert sas == {a: f"bookinfo-{a}" for a in ("details", "ratings", "reviews", "productpage")}
    made = {o["metadata"]["name"] for o in M.objects() if o["kind"] == "ServiceAccount"}
    assert set(sas.values()) | {M.CLIENT} == made
    for p in pods:
        probe = p["spec"]["containers"][0]["readinessProbe"]
        assert probe["httpGet"] == {"path": "/health", "port": M.PORT}
    cm = next(o for o in M.objects() if o["kind"] == "ConfigMap")
    assert set(cm["data"]) == {"start.sh", "serve.sh"}


# --- the app scripts, for real -----------------------------------------------------------------
@pytest.fixture
def applets(tmp_path: Path) -> Path:
    """A PATH dir of busybox applets, as in the image (the host's nc/wget differ)."""
    if not BUSYBOX.exists():
        pytest.skip("busybox-static not installed (make setup)")
    d = tmp_path / "bin"
    d.mkdir()
    for name in ("sh", "nc", "wget", "shuf", "timeout", "printf", "dirname", "cat"):
        (d / name).symlink_to(BUSYBOX)
    return d


@pytest.fixture
def apps(make_netns: Callable[[str], str], applets: Path) -> Iterator[Callable[..., None]]:
    ns = make_netns("bookinfo")
    started: list[subprocess.Popen[bytes]] = []

    def start(port: int, **env: str) -> None:
        proc = subprocess.Popen(
            [IP, "netns", "exec", ns, str(applets / "sh"), str(M.SCRIPTS_DIR / "start.sh")],
            env={"PATH": str(applets), "PORT": str(port), "HOSTNAME": f"h{port}", **env},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        started.append(proc)

    start.ns = ns  # type: ignore[attr-defined]
    start.procs = started  # type: ignore[attr-defined]
    yield start
    for proc in started:  # each app is its own process group: nc and its handlers go too
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in started:
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def get(ns: str, applets: Path, url: str) -> tuple[int, str]:
    done = subprocess.run(
        ["ip", "netns", "exec", ns, str(applets / "wget"), "-qO-", url],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    return done.returncode, done.stdout + done.stderr


@pytest.mark.netns
def test_bookinfo_scripts_answer_and_call_their_upstreams(
    apps: Callable[..., None], applets: Path
) -> None:
    lo = "127.0.0.1"
    apps(9101, SERVICE="ratings", VERSION="v1")
    apps(9102, SERVICE="details", VERSION="v1")
    apps(9103, SERVICE="reviews", VERSION="v1")
    apps(9104, SERVICE="reviews", VERSION="v2", RATINGS=f"{lo}:9101")
    apps(9105, SERVICE="productpage", VERSION="v1", DETAILS=f"{lo}:9102",
         REVIEWS=f"{lo}:9103 {lo}:9104")  # fmt: skip
    apps(9106, SERVICE="reviews", VERSION="v4", RATINGS=f"{lo}:9101",
         STARTUP_CALL=f"{lo}:9101/ratings/0")  # fmt: skip
    ns = apps.ns  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    while get(ns, applets, f"http://{lo}:9105/health") != (0, "ok\n"):
        assert time.monotonic() < deadline, "productpage never answered /health"
        time.sleep(0.1)
    versions = set()
    for _ in range(12):
        rc, body = get(ns, applets, f"http://{lo}:9105/productpage")
        assert rc == 0, body
        assert body.startswith("productpage-v1: The Comedy of Errors")
        assert '"author":"William Shakespeare"' in body and "unavailable" not in body
        versions.add(body.split('"version":"')[1][:2])
        if versions == {"v1", "v2"}:
            break
    assert versions == {"v1", "v2"}, "productpage should spread over both reviews"
    rc, v2 = get(ns, applets, f"http://{lo}:9104/reviews/0")
    assert '"ratings":{"id":0,"ratings":{"Reviewer1":5' in v2
    rc, missing = get(ns, applets, f"http://{lo}:9105/nope")
    assert rc != 0 and "404" in missing
    # a dead upstream is reported in the body, the page still answers
    rc, body = get(ns, applets, f"http://{lo}:9103/reviews/0")
    assert rc == 0 and '"ratings"' not in body
    v4 = apps.procs[-1]  # type: ignore[attr-defined]
    os.killpg(v4.pid, signal.SIGTERM)
    out = v4.communicate(timeout=10)[0].decode()
    assert "reviews-v4 (h9106) starting on :9106" in out
    assert 'first connection: GET http://127.0.0.1:9101/ratings/0 -> {"id":0' in out


# --- capture verdicts ---------------------------------------------------------------------------
def test_tls_records_cover_a_real_tls_stream_and_not_plaintext() -> None:
    # handshake record header + body, then application data cut by the end of the capture
    stream = bytes([22, 3, 1, 0, 4]) + b"abcd" + bytes([23, 3, 3, 0, 100]) + b"x" * 10
    assert tls_records(stream) == (["handshake", "application_data"], len(stream))
    assert tls_records(b"GET / HTTP/1.1\r\n\r\n") == ([], 0)
    flows = [Flow("10.1.0.2", 40000, "10.1.0.3", 15008, {1: stream}),
             Flow("10.1.0.3", 9080, "10.1.0.2", 40001, {5: b"HTTP/1.1 200 OK\r\n"}),
             Flow("10.1.0.1", 5000, "10.1.0.3", 9080, {9: b"GET /health"})]  # fmt: skip
    s = summarise(flows, "10.1.0.0/24", "10.1.0.1")
    assert [x["all_tls"] for x in s["streams"]] == [True, False]  # the gateway's probe skipped
    assert s["plaintext_streams"] == 1 and s["ports"] == [9080, 15008]


def test_flow_reassembles_out_of_order_and_retransmitted_segments() -> None:
    f = Flow("a", 1, "b", 2, {100: b"hello ", 106: b"world", 103: b"lo wo"})
    assert f.stream() == b"hello world"


@pytest.mark.netns
def test_capture_on_a_veth_sees_tls_as_tls(
    make_netns: Callable[[str], str], tmp_path: Path
) -> None:
    """A real TLS 1.3 exchange between two namespaces, captured on the veth between them."""
    a, b = make_netns("cap-a"), make_netns("cap-b")
    subprocess.run(["ip", "-n", a, "link", "add", "vcap", "type", "veth", "peer", "name",
                    "vcap", "netns", b], check=True)  # fmt: skip
    for ns, ip in ((a, "10.1.0.2"), (b, "10.1.0.3")):
        subprocess.run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "vcap"], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "vcap", "up"], check=True)
    pem = tmp_path / "server.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", "/CN=t",
                    "-keyout", str(pem), "-out", str(pem) + ".crt"],
                   check=True, capture_output=True)  # fmt: skip
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(str(pem) + ".crt", str(pem))

    def listen() -> socket.socket:
        s = socket.socket()
        s.bind(("10.1.0.3", 15008))
        s.listen(1)
        return s

    srv = run_in_netns(f"/run/netns/{b}", listen)
    cap = VethCapture(f"/run/netns/{a}", "vcap")
    try:

        def serve() -> None:
            conn, _ = srv.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(tls.recv(100).upper())

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        client = run_in_netns(f"/run/netns/{a}", socket.socket)
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        with ctx.wrap_socket(client) as tls:
            tls.connect(("10.1.0.3", 15008))
            tls.sendall(b"GET / HTTP/1.1 William Shakespeare")
            assert tls.recv(100) == b"GET / HTTP/1.1 WILLIAM SHAKESPEARE"
        t.join(5)
        time.sleep(0.2)
    finally:
        flows = cap.stop()
        srv.close()
    s = summarise(flows, "10.1.0.0/24", "10.1.0.1")
    assert len(s["streams"]) == 2 and s["ports"] == [15008]
    assert all(x["all_tls"] and not x["plaintext_markers"] for x in s["streams"]), s
    assert s["bytes"] == s["tls_bytes"] > 500


# --- ss parsing ---------------------------------------------------------------------------
def test_listening_ports_from_ss() -> None:
    ss = """Netid State  Recv-Q Send-Q Local Address:Port  Peer Address:PortProcess
udp   UNCONN 0      0                  *:15053            *:*
tcp   LISTEN 0      2                  *:9080             *:*
tcp   LISTEN 0      100             [::]:15008           [::]:*
tcp   LISTEN 0      100        127.0.0.1:15001            0.0.0.0:*
"""
    assert listening_ports(ss) == {"tcp": [9080, 15001, 15008], "udp": [15053]}
