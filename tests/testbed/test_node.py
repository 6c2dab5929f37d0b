"""The real single-node Kubernetes: node Ready, pods through the API, CNI ADD/DEL, cgroups.

Everything here runs against real etcd, kube-apiserver, controller-manager, scheduler,
kubelet, containerd, runc and the real bridge + host-local CNI chain.
"""

from __future__ import annotations

import ipaddress
import json
import time
from typing import Any

import pytest

from testbed.node import Testbed
from tests.testbed import pods as P

pytestmark = [pytest.mark.testbed, pytest.mark.timeout(1800)]


def test_node_is_ready_with_its_ip(testbed_node: Testbed, testbed_info: dict[str, Any]) -> None:
    nodes = json.loads(testbed_node.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    assert [n["metadata"]["name"] for n in nodes] == [testbed_info["node"]]
    status = nodes[0]["status"]
    assert {"type": "InternalIP", "address": testbed_info["node_ip"]} in status["addresses"]
    ready = [c for c in status["conditions"] if c["type"] == "Ready"]
    assert ready and ready[0]["status"] == "True", ready
    # The human-readable form says so too.
    table = testbed_node.kubectl("get", "nodes").stdout
    assert f"{testbed_info['node']}   Ready" in table, table


def test_info_has_the_promised_keys(testbed_info: dict[str, Any]) -> None:
    for key in (
        "kubeconfig",
        "server",
        "node",
        "node_netns",
        "cni_bin_dir",
        "cni_conf_dir",
        "run_dir",
        "ztunnel_socket",
        "images",
    ):
        assert key in testbed_info, key
    assert {"pause", "httpd", "busybox"} <= set(testbed_info["images"])


def test_pods_get_ip_netns_cgroup_and_cni_del(
    testbed_node: Testbed, testbed_info: dict[str, Any], kube_namespace: str
) -> None:
    bed, ns, images = testbed_node, kube_namespace, testbed_info["images"]
    ports = {"web-a": 8080, "web-b": 9090}
    specs = [P.httpd_pod(n, images["httpd"], p) for n, p in ports.items()]
    specs.append(P.client_pod("client", images["busybox"]))
    names = [s["metadata"]["name"] for s in specs]

    started = time.monotonic()
    bed.kubectl("apply", "-f", "-", input=P.manifest(ns, specs))
    P.wait_ready(bed, ns, names)
    print(f"create-to-Ready for {len(names)} pods: {time.monotonic() - started:.2f}s")

    items = json.loads(bed.kubectl("get", "pods", "-n", ns, "-o", "json").stdout)["items"]
    by_name = {p["metadata"]["name"]: p for p in items}
    cidr = ipaddress.ip_network(testbed_info["pod_cidr"])
    netns_files = P.node_netns_files(bed)
    seen_ips: set[str] = set()
    for name in names:
        pod = by_name[name]
        uid, ip = pod["metadata"]["uid"], pod["status"]["podIP"]
        assert ipaddress.ip_address(ip) in cidr, (name, ip)
        assert ip not in seen_ips
        seen_ips.add(ip)
        # host-local's reservation (visible from the host through the bound /var/lib/cni).
        reservation = bed.layout.ipam_dir / ip
        assert reservation.exists(), f"no IPAM reservation for {name} {ip}"
        # kubelet's cgroup layout: <root>/kubepods/<qos>/pod<uid>/<container>.
        cg = P.pod_cgroup_dirs(bed, uid)
        assert cg, f"no pod{uid} cgroup for {name}"
        assert all(
            str(d).split("/")[5:7] == [bed.layout.cgroup_root.strip("/"), "kubepods"] for d in cg
        ), cg
        pids = P.pod_pids(bed, uid)
        assert len(pids) >= 2, f"{name}: expected pause + app processes, got {pids}"
        for pid in pids:
            with open(f"/proc/{pid}/cgroup") as f:
                assert f"pod{uid}" in f.read()
        # Every process of the pod shares one netns, which is a /var/run/netns/cni-* file
        # inside the node's mount namespace, and the pod IP is configured there.
        inodes = {P.netns_inode(pid) for pid in pids}
        assert len(inodes) == 1, inodes
        (inode,) = inodes
        assert inode in netns_files, f"{name}: netns {inode} not among {netns_files}"
        assert netns_files[inode].startswith("/var/run/netns/cni-")
        pid = min(pids)
        addr = bed.node_exec(["nsenter", f"--net=/proc/{pid}/ns/net", "ip", "-4", "-o", "addr"])
        assert f"inet {ip}/" in addr.stdout, addr.stdout

    # Real traffic: from the node (as kubelet's probes) and from the client pod (kubectl exec).
    for name, port in ports.items():
        ip = by_name[name]["status"]["podIP"]
        assert bed.node_http_get(ip, port).strip() == name
        via_pod = bed.kubectl(
            "exec", "-n", ns, "client", "--", "timeout", "5", "wget", "-qO-", f"http://{ip}:{port}/"
        )
        assert via_pod.stdout.strip() == name

    # Delete: CNI DEL releases each IP, the cni-* netns and the pod cgroups go away.
    uids = {n: by_name[n]["metadata"]["uid"] for n in names}
    bed.kubectl("delete", "pods", "--all", "-n", ns, "--wait=true", "--timeout=60s")
    deadline = time.monotonic() + 60
    while True:
        left_ips = [ip for ip in seen_ips if (bed.layout.ipam_dir / ip).exists()]
        left_ns = set(P.node_netns_files(bed)) & set(netns_files)
        left_cg = [d for u in uids.values() for d in P.pod_cgroup_dirs(bed, u, v1_only=True)]
        if not (left_ips or left_ns or left_cg):
            break
        assert time.monotonic() < deadline, (left_ips, left_ns, left_cg)
        time.sleep(0.5)


def test_namespace_deletion_completes(testbed_node: Testbed) -> None:
    """The controller-manager runs: a deleted namespace goes away instead of Terminating."""
    name = f"icni-tb-t-del{int(time.time()) % 100000}"
    testbed_node.kubectl("create", "namespace", name)
    testbed_node.kubectl("delete", "namespace", name, "--wait=true", "--timeout=60s")
    got = testbed_node.kubectl("get", "namespace", name, check=False)
    assert got.returncode != 0 and "NotFound" in got.stderr
