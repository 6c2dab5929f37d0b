"""A short, honest end-to-end show of what exists today (``make demo``).

Two throwaway namespaces ("pod" and "peer") joined by a veth; in the pod a stand-in for
ztunnel's outbound listener (15001), on the peer a server on port 80. Then, with the real
operator command: ``istio-cni-agent redirect apply`` installs Istio's rules in the pod; a
connection from the pod to peer:80 is captured by 15001, which recovers the original
destination with SO_ORIGINAL_DST; ``check`` confirms; ``remove`` deletes everything and
``check`` shows it gone. The namespaces are always deleted, even on failure or Ctrl-C.
(The full walkthrough on a real Kubernetes node replaces this later.)
"""

from __future__ import annotations

import secrets
import socket
import subprocess
import sys
import threading

from cni_plugin.netns import run_in_netns

POD_IP, PEER_IP = "198.51.100.2", "198.51.100.1"  # documentation prefix, namespaces only
SO_ORIGINAL_DST = 80


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check)


def agent(*args: str) -> subprocess.CompletedProcess[str]:
    done = sh(sys.executable, "-m", "node_agent.cli", "redirect", *args, check=False)
    print(f"$ istio-cni-agent redirect {' '.join(args)}   (exit {done.returncode})")
    lines = (done.stdout + done.stderr).strip().splitlines()
    for line in lines[:4]:
        print(f"    {line}")
    if len(lines) > 5:
        print(f"    ... ({len(lines) - 5} more lines)")
    if len(lines) > 4:
        print(f"    {lines[-1]}")
    return done


def listener(ns_path: str, port: int) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen(8)
        s.settimeout(5)
        return s

    return run_in_netns(ns_path, make)


def serve_once(sock: socket.socket, name: str, seen: list[str]) -> None:
    conn, _ = sock.accept()
    with conn:
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        orig = f"{socket.inet_ntoa(raw[4:8])}:{int.from_bytes(raw[2:4], 'big')}"
        seen.append(f"{name} accepted a connection; SO_ORIGINAL_DST = {orig}")
        conn.sendall(name.encode())


def main() -> int:
    tag = secrets.token_hex(3)
    pod, peer = f"icndemo-pod-{tag}", f"icndemo-peer-{tag}"
    pod_path, peer_path = f"/run/netns/{pod}", f"/run/netns/{peer}"
    socks: list[socket.socket] = []
    try:
        print(f"1. throwaway namespaces {pod} and {peer}, joined by a veth")
        for ns in (pod, peer):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", "eth0", "netns", pod, "type", "veth",
           "peer", "name", "eth0", "netns", peer)  # fmt: skip
        for ns, ip in ((pod, POD_IP), (peer, PEER_IP)):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
        standin, server = listener(pod_path, 15001), listener(peer_path, 80)
        socks += [standin, server]
        print("   pod: ztunnel stand-in on :15001; peer: a server on :80")

        print("\n2. install Istio's in-pod redirection with the operator command")
        if agent("apply", "--netns", pod_path, "--dns-capture").returncode != 0:
            return 1

        print(f"\n3. the pod's app connects to {PEER_IP}:80")
        seen: list[str] = []
        threads = [threading.Thread(target=serve_once, args=(s, n, seen), daemon=True)
                   for s, n in ((standin, "ztunnel:15001"), (server, "peer:80"))]  # fmt: skip
        for t in threads:
            t.start()
        client = run_in_netns(pod_path, socket.socket)
        with client:
            client.settimeout(5)
            client.connect((PEER_IP, 80))
            answered = client.recv(64).decode()
        threads[0].join(timeout=5)
        print(f"   answered by {answered!r}; {seen[0] if seen else 'nothing recorded'}")
        captured = answered == "ztunnel:15001" and f"{PEER_IP}:80" in (seen or [""])[0]

        print("\n4. check: is everything apply installs in place?")
        agent("check", "--netns", pod_path, "--dns-capture")

        print("\n5. remove, then check again: everything must be gone")
        agent("remove", "--netns", pod_path)
        after = agent("check", "--netns", pod_path, "--dns-capture")
        leftovers = [ln for ln in after.stdout.splitlines() if ln.startswith("extra:")]
        save = sh("ip", "netns", "exec", pod, "iptables-save").stdout
        rules = sh("ip", "-n", pod, "rule").stdout
        left = [ln for ln in save.splitlines() + rules.splitlines() if "ISTIO" in ln or
                "lookup 100" in ln]  # fmt: skip
        print(f"   ISTIO chains/rules or table-100 rules left in the pod: {len(left)}")
        ok = captured and after.returncode == 1 and not leftovers and not left
        print(f"\n{'demo OK' if ok else 'demo FAILED'}: captured={captured}, clean after remove="
              f"{not leftovers and not left}")  # fmt: skip
        return 0 if ok else 1
    finally:
        for s in socks:
            s.close()
        for ns in (pod, peer):
            sh("ip", "netns", "del", ns, check=False)
        print(f"(namespaces {pod} and {peer} deleted)")


if __name__ == "__main__":
    sys.exit(main())
