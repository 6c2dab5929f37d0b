"""How the plugin learns whether a pod is ambient, and both failure policies:
ambient pods fail closed when the agent cannot be reached; a pod that is not ambient
never fails because the agent or the API server is down.

The agent is a stub speaking HTTP on a real unix socket (checks the exact SPEC body);
the API server is an HTTPS stub with a real certificate (kube-apiserver runs only on the
testbed). The plugin runs as a subprocess with a CNI environment, as a runtime runs it.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.plugin_fakes import (
    AgentStub,
    ApiStub,
    cni_env,
    net_conf,
    plugin_form,  # noqa: F401  (autouse: source and built forms)
    run_plugin,
)

AMBIENT = {"istio.io/dataplane-mode": "ambient"}


@pytest.fixture
def run_dir(tmp_path: Any) -> str:
    return str(tmp_path / "run")


@pytest.fixture
def agent(run_dir: str) -> Iterator[AgentStub]:
    stub = AgentStub(run_dir).start()
    yield stub
    stub.stop()


@pytest.fixture
def api() -> Iterator[ApiStub]:
    stub = ApiStub().start()
    yield stub
    stub.stop()


def add(run_dir: str, **conf: Any) -> Any:
    return run_plugin(
        cni_env("ADD"), json.dumps(net_conf(cni_agent_run_dir=run_dir, **conf)).encode()
    )


def ok_result(proc: Any) -> dict[str, Any]:
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    out: dict[str, Any] = json.loads(proc.stdout)
    assert out == net_conf()["prevResult"]  # prevResult untouched (same version)
    return out


def err_result(proc: Any) -> dict[str, Any]:
    assert proc.returncode != 0
    assert b"Traceback" not in proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


def test_ambient_pod_known_to_agent_is_enrolled_with_the_exact_spec_body(
    agent: AgentStub, run_dir: str
) -> None:
    agent.pods[("demo", "app-1")] = {"known": True, "ambient": True, "reason": "ambient"}
    ok_result(add(run_dir))
    (post,) = agent.posts()
    body = json.loads(post.body)
    assert body == {
        "Netns": "/var/run/netns/cni-test",
        "PodName": "app-1",
        "PodNamespace": "demo",
        "IPs": [
            {
                "Interface": 0,
                "Address": {"IP": "10.244.1.5", "Mask": "////AA=="},
                "Gateway": "10.244.1.1",
            }
        ],
    }
    assert list(body) == ["Netns", "PodName", "PodNamespace", "IPs"]


def test_ipv6_mask_is_sixteen_bytes(agent: AgentStub, run_dir: str) -> None:
    agent.pods[("demo", "app-1")] = {"known": True, "ambient": True, "reason": "ambient"}
    prev = net_conf()["prevResult"]
    prev["ips"] = [{"address": "fd00:10:244::5/64", "interface": 0}]
    assert add(run_dir, prevResult=prev).returncode == 0
    ip = json.loads(agent.posts()[0].body)["IPs"][0]
    assert base64.b64decode(ip["Address"]["Mask"]) == b"\xff" * 8 + b"\x00" * 8
    assert ip["Gateway"] == "" and ip["Address"]["IP"] == "fd00:10:244::5"


def test_agent_refusal_fails_the_add_with_its_message(agent: AgentStub, run_dir: str) -> None:
    agent.pods[("demo", "app-1")] = {"known": True, "ambient": True, "reason": "ambient"}
    agent.add_status, agent.add_reply = 500, "ztunnel is not connected"
    err = err_result(add(run_dir))
    assert err["code"] == 100 and "ztunnel is not connected" in err["msg"]


# Istio's agent answers a pod it does not find ambient with a 500 and this text
# (cni/pkg/nodeagent/cni-watcher.go): its plugin only posts ambient pods.
ISTIO_REFUSAL = "pod demo/app-1 is unexpectedly not eligible for ambient enrollment"


def test_istio_agent_refusing_a_non_ambient_pod_passes_it_after_the_api_agrees(
    agent: AgentStub, api: ApiStub, run_dir: str
) -> None:
    agent.add_status, agent.add_reply = 500, ISTIO_REFUSAL
    api.add_pod("demo", "app-1")  # neither pod nor namespace labelled
    api.write_kubeconfig(run_dir)
    proc = add(run_dir)
    ok_result(proc)
    assert len(agent.posts()) == 1
    assert api.requests == ["/api/v1/namespaces/demo/pods/app-1", "/api/v1/namespaces/demo"]
    assert b"says is not ambient; passing through" in proc.stderr


def test_agent_refusing_an_ambient_pod_fails_the_add_even_when_the_api_is_asked(
    agent: AgentStub, api: ApiStub, run_dir: str
) -> None:
    agent.add_status, agent.add_reply = 500, "ztunnel is not connected"
    api.add_pod("demo", "app-1", ns_labels=AMBIENT)
    api.write_kubeconfig(run_dir)
    err = err_result(add(run_dir))
    assert err["code"] == 100 and "ztunnel is not connected" in err["msg"]
    assert len(api.requests) == 2


def test_agent_refusal_with_the_api_down_fails_closed(agent: AgentStub, run_dir: str) -> None:
    agent.add_status, agent.add_reply = 500, ISTIO_REFUSAL
    with open(os.path.join(run_dir, "istio-cni-kubeconfig"), "w") as f:
        f.write("server: https://127.0.0.1:1\ntoken: t\ninsecure-skip-tls-verify: true\n")
    err = err_result(add(run_dir))
    assert err["code"] == 100 and ISTIO_REFUSAL in err["msg"]


def test_non_ambient_pod_known_to_agent_never_touches_the_api(
    agent: AgentStub, run_dir: str
) -> None:
    # No kubeconfig at all: the API path would fail, so success proves it was not taken.
    agent.pods[("demo", "app-1")] = {"known": True, "ambient": False, "reason": "not labelled"}
    proc = add(run_dir)
    ok_result(proc)
    # One round trip: the agent judged the pod from its caches and answered.
    assert [r.method for r in agent.requests] == ["POST"] and len(agent.posts()) == 1
    assert b"not enrolled: not labelled" in proc.stderr


def test_agent_down_non_ambient_pod_succeeds_via_api(api: ApiStub, run_dir: str) -> None:
    api.add_pod("demo", "app-1")
    api.write_kubeconfig(run_dir)
    ok_result(add(run_dir))
    assert api.requests == ["/api/v1/namespaces/demo/pods/app-1", "/api/v1/namespaces/demo"]


def test_agent_down_ambient_pod_fails_closed(api: ApiStub, run_dir: str) -> None:
    api.add_pod("demo", "app-1", ns_labels=AMBIENT)
    api.write_kubeconfig(run_dir)
    err = err_result(add(run_dir))
    assert err["code"] == 11
    assert "is ambient" in err["msg"] and "failing closed" in err["msg"]
    assert "pluginevent.sock" in err["msg"]


def test_agent_down_opted_out_pod_in_ambient_namespace_succeeds(api: ApiStub, run_dir: str) -> None:
    api.add_pod("demo", "app-1", labels={"istio.io/dataplane-mode": "none"}, ns_labels=AMBIENT)
    api.write_kubeconfig(run_dir, insecure=True)
    ok_result(add(run_dir))


def test_api_down_agent_knows_non_ambient_pod_succeeds(agent: AgentStub, run_dir: str) -> None:
    agent.pods[("demo", "app-1")] = {"known": True, "ambient": False, "reason": "x"}
    with open(os.path.join(run_dir, "istio-cni-kubeconfig"), "w") as f:
        f.write("server: https://127.0.0.1:1\ntoken: t\ninsecure-skip-tls-verify: true\n")
    ok_result(add(run_dir))


def test_api_down_pod_unknown_to_agent_is_handed_to_the_agent(
    agent: AgentStub, run_dir: str
) -> None:
    with open(os.path.join(run_dir, "istio-cni-kubeconfig"), "w") as f:
        f.write("server: https://127.0.0.1:1\ntoken: t\ninsecure-skip-tls-verify: true\n")
    agent.add_reply = "not enrolled: neither the pod nor its namespace is labelled ambient"
    ok_result(add(run_dir))
    assert len(agent.posts()) == 1


def test_agent_and_api_both_down_fails_closed_naming_both(run_dir: str) -> None:
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "istio-cni-kubeconfig"), "w") as f:
        f.write("server: https://127.0.0.1:1\ntoken: t\ninsecure-skip-tls-verify: true\n")
    err = err_result(add(run_dir))
    assert err["code"] == 11
    assert "api server unavailable" in err["msg"] and "pluginevent.sock" in err["msg"]


def test_a_reachable_agent_is_the_only_judge(agent: AgentStub, api: ApiStub, run_dir: str) -> None:
    # The agent looks up pods it has not seen itself; the plugin never adds an API call.
    api.add_pod("demo", "app-1", labels=AMBIENT)
    api.write_kubeconfig(run_dir)
    ok_result(add(run_dir))
    assert api.requests == [] and [r.method for r in agent.requests] == ["POST"]


def test_sidecar_pod_is_left_alone(api: ApiStub, run_dir: str) -> None:
    api.add_pod("demo", "app-1", ns_labels=AMBIENT, annotations={"sidecar.istio.io/status": "{}"})
    api.write_kubeconfig(run_dir)
    ok_result(add(run_dir))


@pytest.mark.parametrize(
    ("case", "env_args", "conf"),
    [
        ("excluded namespace", "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns", {}),
        ("own agent pod", "K8S_POD_NAMESPACE=istio-cni;K8S_POD_NAME=istio-cni-node-abcde", {}),
        ("not a k8s pod", "IgnoreUnknown=1", {}),
        ("ambient disabled", "K8S_POD_NAMESPACE=demo;K8S_POD_NAME=x", {"ambient_enabled": False}),
    ],
)
def test_non_candidates_need_neither_agent_nor_api(
    case: str, env_args: str, conf: dict[str, Any], run_dir: str
) -> None:
    body = json.dumps(net_conf(cni_agent_run_dir=run_dir, **conf)).encode()
    proc = run_plugin(cni_env("ADD", CNI_ARGS=env_args), body)
    ok_result(proc)


def test_ambient_pod_without_ips_is_a_config_error(agent: AgentStub, run_dir: str) -> None:
    agent.pods[("demo", "app-1")] = {"known": True, "ambient": True, "reason": "ambient"}
    prev = dict(net_conf()["prevResult"], ips=[])
    err = err_result(add(run_dir, prevResult=prev))
    assert err["code"] == 7 and "no IPs" in err["msg"]
    assert agent.posts() == []  # nothing asked of the agent


def test_pod_without_ips_known_not_ambient_passes(agent: AgentStub, run_dir: str) -> None:
    agent.pods[("demo", "app-1")] = {"known": True, "ambient": False, "reason": "not labelled"}
    prev = dict(net_conf()["prevResult"], ips=[])
    proc = add(run_dir, prevResult=prev)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == prev
    assert [r.method for r in agent.requests] == ["GET"]


def test_pod_without_ips_agent_down_and_ambient_fails_closed(api: ApiStub, run_dir: str) -> None:
    api.add_pod("demo", "app-1", ns_labels=AMBIENT)
    api.write_kubeconfig(run_dir)
    err = err_result(add(run_dir, prevResult=dict(net_conf()["prevResult"], ips=[])))
    assert err["code"] == 11 and "is ambient" in err["msg"] and "failing closed" in err["msg"]


def test_pod_without_ips_unknown_to_the_agent_is_handed_to_it(
    agent: AgentStub, run_dir: str
) -> None:
    prev = dict(net_conf()["prevResult"], ips=[])
    proc = add(run_dir, prevResult=prev)
    assert proc.returncode == 0, proc.stderr
    assert [r.method for r in agent.requests] == ["GET", "POST"]
    assert json.loads(agent.posts()[0].body)["IPs"] == []


@pytest.mark.parametrize(
    ("case", "content", "code", "words"),
    [
        ("missing", None, 11, "does not exist yet"),
        ("a directory", "DIR", 5, "cannot read kubeconfig"),
        (
            "no token",
            "server: https://127.0.0.1:6443\ninsecure-skip-tls-verify: true\n",
            7,
            "no token",
        ),
        ("not https", "server: http://127.0.0.1:6443\ntoken: x\n", 7, "not an https"),
        ("no trust", "server: https://127.0.0.1:6443\ntoken: x\n", 7, "certificate-authority"),
        (
            "bad ca",
            "server: https://127.0.0.1:6443\ntoken: x\ncertificate-authority-data: !!\n",
            7,
            "base64",
        ),
        ("binary", b"\xff\xfe\x00", 7, "cannot read kubeconfig"),
    ],
)
def test_unusable_kubeconfig_is_a_cni_error(
    case: str, content: str | bytes | None, code: int, words: str, run_dir: str
) -> None:
    os.makedirs(run_dir)
    path = os.path.join(run_dir, "istio-cni-kubeconfig")
    if content == "DIR":
        os.mkdir(path)
    elif isinstance(content, bytes):
        with open(path, "wb") as f:
            f.write(content)
    elif content is not None:
        with open(path, "w") as f:
            f.write(content)
    before = sorted(os.listdir(run_dir))
    err = err_result(add(run_dir))  # no agent: the API path needs the kubeconfig
    assert err["code"] == code, err
    assert words in err["msg"] and "istio-cni-kubeconfig" in err["msg"]
    assert sorted(os.listdir(run_dir)) == before  # nothing changed


def test_plugin_logs_reach_the_agent_log_socket(agent: AgentStub, run_dir: str) -> None:
    import socket
    import threading

    received: list[bytes] = []
    path = os.path.join(run_dir, "log.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(
            next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(
                b":"
            )[1]
        )
        while len(body) < length:
            body += conn.recv(65536)
        received.append(head + b"\r\n\r\n" + body)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    agent.pods[("demo", "app-1")] = {"known": True, "ambient": True, "reason": "ambient"}
    ok_result(add(run_dir))
    t.join(5)
    srv.close()
    assert received and received[0].startswith(b"POST /log HTTP/1.1")
    lines = json.loads(received[0].partition(b"\r\n\r\n")[2])
    records = [json.loads(s) for s in lines]
    assert all({"level", "time", "msg"} <= set(r) for r in records)
    assert any(r["msg"] == "node agent answered the add" for r in records)


def test_a_full_agent_backlog_is_waited_out_not_reported_as_down(tmp_path: Any) -> None:
    import _socket
    import socket
    import threading
    import time

    from cni_plugin import agent_client

    path = str(tmp_path / "s.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(0)
    fillers: list[_socket.socket] = []  # socket.socket is a subclass
    try:
        for _ in range(4):  # fill the backlog: further non-blocking connects get EAGAIN
            f: _socket.socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            f.setblocking(False)
            try:
                f.connect(path)
            except BlockingIOError:
                f.close()
                break
            fillers.append(f)

        def drain() -> None:
            time.sleep(0.3)
            srv.settimeout(2)
            for _ in range(len(fillers) + 1):
                conn, _ = srv.accept()
                conn.close()

        t = threading.Thread(target=drain)
        t.start()
        t0 = time.monotonic()
        sock = agent_client._connect(path, 3.0)
        sock.close()
        assert 0.2 < time.monotonic() - t0 < 3.0
        t.join()
        with pytest.raises(TimeoutError, match="backlog"):
            for _ in range(8):  # nobody accepts any more: the deadline is honoured
                s = agent_client._connect(path, 0.2)
                fillers.append(s)
    finally:
        for f in fillers:
            f.close()
        srv.close()


SELECT_TEAM = [{"namespaceSelector": {"matchLabels": {"team": "a"}}}]


def test_agent_down_the_entrys_selectors_judge_the_pod(api: ApiStub, run_dir: str) -> None:
    # Selected by the conflist entry's enablement_selectors: fail closed.
    api.add_pod("demo", "app-1", ns_labels={"team": "a"})
    api.write_kubeconfig(run_dir)
    err = err_result(add(run_dir, enablement_selectors=SELECT_TEAM))
    assert err["code"] == 11 and "is ambient" in err["msg"]
    # Labelled ambient but not selected: these selectors do not read that label.
    api.add_pod("other", "app-2", labels=AMBIENT, ns_labels=AMBIENT)
    ok_result(
        run_plugin(
            cni_env(
                "ADD",
                CNI_ARGS="K8S_POD_NAMESPACE=other;K8S_POD_NAME=app-2;K8S_POD_UID=u-2",
            ),
            json.dumps(
                net_conf(cni_agent_run_dir=run_dir, enablement_selectors=SELECT_TEAM)
            ).encode(),
        )
    )


def test_agent_down_a_bad_selector_in_the_entry_is_a_config_error(
    api: ApiStub, run_dir: str
) -> None:
    api.add_pod("demo", "app-1")
    api.write_kubeconfig(run_dir)
    err = err_result(add(run_dir, enablement_selectors=[{"podSelector": {"matchLabel": {}}}]))
    assert err["code"] == 7
    assert "enablement_selectors[0].podSelector" in err["msg"] and "matchLabel" in err["msg"]


def test_not_chained_no_prev_result_ambient_pod_is_posted(agent: AgentStub, run_dir: str) -> None:
    """CHAINED_CNI_PLUGIN=false (Multus): no prevResult at all; the ambient pod is handed
    to the agent without addresses, as Istio's plugin does, and the ADD succeeds."""
    agent.pods[("demo", "app-1")] = {"known": True, "ambient": True, "reason": "ambient"}
    conf = net_conf(cni_agent_run_dir=run_dir)
    del conf["prevResult"]
    proc = run_plugin(cni_env("ADD"), json.dumps(conf).encode())
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert json.loads(proc.stdout)["cniVersion"] == conf["cniVersion"]
    (post,) = agent.posts()
    body = json.loads(post.body)
    assert body["IPs"] == [] and body["PodName"] == "app-1"
