"""The Helm chart and plain manifests, rendered with Helm's own engine and checked against
SPEC §8: names, labels, priority, capabilities, mounts, RBAC, values with Istio's names,
and the seed's IstioCNI (profile ambient) mapping."""

from __future__ import annotations

import os
import re
from typing import Any

import pytest
import yaml

from install import render_manifests
from install.istiocni_resource import helm_release

CONTAINERFILE = os.path.join(os.path.dirname(render_manifests.HERE), "install", "Containerfile")


def docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def by_kind(items: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in items if d["kind"] == kind]


@pytest.fixture(scope="module")
def seed() -> list[dict[str, Any]]:
    return docs(render_manifests.manifests())


def test_committed_manifests_are_the_chart_rendering() -> None:
    assert render_manifests.main(["--check"]) == 0


def test_chart_lints_clean() -> None:
    from helm_python.chart import lint

    for values in (
        {},
        {"profile": "ambient"},
        {"profile": "ambient", "ambient": {"redirectMode": "ebpf"}},
    ):
        report = lint(render_manifests.CHART, values)
        assert report["errors"] == [], report
        assert not [m for m in report["messages"] if m["severity"] >= 3], report


def test_daemonset_shape(seed: list[dict[str, Any]]) -> None:
    (ns,) = by_kind(seed, "Namespace")
    assert ns["metadata"]["name"] == "istio-cni"
    (ds,) = by_kind(seed, "DaemonSet")
    assert ds["metadata"]["name"] == "istio-cni-node"
    assert ds["metadata"]["namespace"] == "istio-cni"
    tmpl = ds["spec"]["template"]
    assert tmpl["metadata"]["labels"]["istio.io/dataplane-mode"] == "none"
    assert tmpl["metadata"]["labels"]["sidecar.istio.io/inject"] == "false"
    spec = tmpl["spec"]
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["serviceAccountName"] == "istio-cni"
    (c,) = spec["containers"]
    caps = c["securityContext"]["capabilities"]
    assert caps["drop"] == ["ALL"]
    assert caps["add"] == ["NET_ADMIN", "NET_RAW", "SYS_PTRACE", "SYS_ADMIN", "DAC_OVERRIDE"]
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert mounts == {
        "/host/opt/cni/bin",
        "/host/proc",
        "/host/etc/cni/net.d",
        "/var/run/istio-cni",
        "/host/var/run/netns",
        "/var/run/ztunnel",
        "/run/xtables.lock",
    }
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8000}
    assert c["command"] == ["istio-cni-entrypoint", "run"]
    env = {e["name"] for e in c["env"]}
    assert {"NODE_NAME", "POD_NAMESPACE", "POD_NAME"} <= env
    # The seed's pod shares the host network namespace: nothing to switch to (as Istio's
    # chart, which sets ALLOW_SWITCH_TO_HOST_NS only for a pod that does not; 17.5).
    assert spec["hostNetwork"] is True
    assert "ALLOW_SWITCH_TO_HOST_NS" not in env
    own = docs("\n---\n".join(render_manifests.render(
        {"profile": "ambient", "ambient": {"shareHostNetworkNamespace": False}}, "istio-cni"
    ).values()))  # fmt: skip
    (ds,) = by_kind(own, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert "hostNetwork" not in pod
    (own_c,) = pod["containers"]
    assert {"name": "ALLOW_SWITCH_TO_HOST_NS", "value": "true"} in own_c["env"]
    hostpaths = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"]}
    assert hostpaths["cni-bin-dir"] == "/opt/cni/bin"
    assert hostpaths["cni-net-dir"] == "/etc/cni/net.d"
    assert hostpaths["cni-netns-dir"] == "/var/run/netns"
    # The host's xtables lock, shared with kubelet and kube-proxy (issue 14.6).
    lock = next(v["hostPath"] for v in spec["volumes"] if v["name"] == "xtables-lock")
    assert lock == {"path": "/run/xtables.lock", "type": "FileOrCreate"}


def test_configmap_carries_spec_environment(seed: list[dict[str, Any]]) -> None:
    (cm,) = by_kind(seed, "ConfigMap")
    data = cm["data"]
    assert data["AMBIENT_ENABLED"] == "true"  # the ambient profile
    assert data["AMBIENT_DNS_CAPTURE"] == "true"  # newest Istio's default (1.24: false)
    assert data["AMBIENT_IPV6"] == "true"
    assert data["CHAINED_CNI_PLUGIN"] == "true"
    assert data["EXCLUDE_NAMESPACES"] == "kube-system"
    assert data["INSTALL_CNI"] == "true"
    from node_agent.config import AgentConfig

    cfg = AgentConfig.from_env({**data, "NODE_NAME": "n1", "POD_NAMESPACE": "istio-cni"})
    assert cfg.ambient_enabled and cfg.install_cni and cfg.excluded_namespaces == ("kube-system",)


def test_rbac_is_exactly_what_the_agent_uses(seed: list[dict[str, Any]]) -> None:
    rules = sorted(
        (
            tuple(r["apiGroups"]),
            tuple(r["resources"]),
            tuple(sorted(r["verbs"])),
            tuple(r.get("resourceNames", ())),
        )
        for role in by_kind(seed, "ClusterRole")
        for r in role["rules"]
    )
    assert rules == [
        (("",), ("pods", "nodes", "namespaces"), ("get", "list", "watch"), ()),
        (("",), ("pods/status",), ("patch",), ()),
        (("apps",), ("daemonsets",), ("get",), ("istio-cni-node",)),
    ]
    for binding in by_kind(seed, "ClusterRoleBinding"):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "istio-cni", "namespace": "istio-cni"}
        ]


def test_values_keep_istio_names() -> None:
    with open(os.path.join(render_manifests.CHART, "values.yaml")) as f:
        values = yaml.safe_load(f)
    d = values["_internal_defaults_do_not_set"]
    for key in (
        "cniBinDir",
        "cniConfDir",
        "cniConfFileName",
        "cniNetnsDir",
        "excludeNamespaces",
        "chained",
    ):
        assert key in d
    assert set(d["ambient"]) >= {"enabled", "dnsCapture", "ipv6", "reconcileIptablesOnStartup"}


def test_user_values_override_profile_and_defaults() -> None:
    out = render_manifests.render(
        {
            "profile": "ambient",
            "cniConfDir": "/custom/net.d",
            "cniConfFileName": "10-x.conflist",
            "excludeNamespaces": ["kube-system", "istio-system"],
            "ambient": {"dnsCapture": True, "redirectMode": "ebpf"},
        },
        "istio-cni",
    )
    items = docs("\n---\n".join(out.values()))
    (cm,) = by_kind(items, "ConfigMap")
    assert cm["data"]["AMBIENT_ENABLED"] == "true"
    assert cm["data"]["AMBIENT_DNS_CAPTURE"] == "true"
    assert cm["data"]["CNI_CONF_NAME"] == "10-x.conflist"
    assert cm["data"]["EXCLUDE_NAMESPACES"] == "kube-system,istio-system"
    (ds,) = by_kind(items, "DaemonSet")
    c = ds["spec"]["template"]["spec"]["containers"][0]
    assert {"BPF", "PERFMON"} <= set(c["securityContext"]["capabilities"]["add"])
    paths = {v["name"]: v["hostPath"]["path"] for v in ds["spec"]["template"]["spec"]["volumes"]}
    assert paths["cni-net-dir"] == "/custom/net.d" and paths["bpffs"] == "/sys/fs/bpf"


def test_without_a_profile_ambient_is_off() -> None:
    items = docs("\n---\n".join(render_manifests.render({}, "istio-cni").values()))
    (cm,) = by_kind(items, "ConfigMap")
    assert cm["data"]["AMBIENT_ENABLED"] == "false"
    assert len(by_kind(items, "ClusterRole")) == 1  # no pods/status patch without ambient


def test_unknown_profile_fails_clearly() -> None:
    from helm_python.errors import HelmError

    with pytest.raises(HelmError, match="unknown profile"):
        render_manifests.render({"profile": "nope"}, "istio-cni")


def test_istiocni_resource_mapping() -> None:
    ns, values = helm_release(
        {
            "apiVersion": "sailoperator.io/v1",
            "kind": "IstioCNI",
            "metadata": {"name": "default"},
            "spec": {
                "namespace": "istio-cni",
                "profile": "ambient",
                "values": {"cni": {"cniConfDir": "/etc/cni/net.d", "ambient": {"ipv6": False}}},
            },
        }
    )
    assert ns == "istio-cni"
    assert values == {
        "profile": "ambient",
        "cniConfDir": "/etc/cni/net.d",
        "ambient": {"ipv6": False},
    }
    from cni_plugin.errors import ConfigError

    with pytest.raises(ConfigError, match="IstioCNI"):
        helm_release({"kind": "Deployment"})


def test_containerfile_ships_agent_and_plugin() -> None:
    with open(CONTAINERFILE) as f:
        text = f.read()
    assert re.search(
        r"^COPY --from=build /src/build/istio-cni.d /opt/cni/bin/istio-cni.d$", text, re.M
    )
    assert "RUN ln -s istio-cni.d/istio-cni /opt/cni/bin/istio-cni" in text
    assert "scripts/build-plugin.sh bundled-cpython" in text
    assert "scripts/plugin_bundle.py" in text  # the bundler the build script runs
    assert re.search(r'^ENTRYPOINT \["/usr/local/bin/istio-cni-entrypoint"\]$', text, re.M)
    assert "COPY install/image/entrypoint.sh /usr/local/bin/istio-cni-entrypoint" in text
    from install.config import InstallConfig

    assert InstallConfig().cni_bin_source_dir == "/opt/cni/bin"  # where the image puts it


def _rendered(values: dict[str, Any]) -> list[dict[str, Any]]:
    return docs("\n---\n".join(render_manifests.render(values, "istio-cni").values()))


def test_backend_values_reach_the_agent_config() -> None:
    """ambient.redirectMode / redirectFallback / ebpfPinRoot / hostCgroup2Root become the
    environment the agent reads; BPF, PERFMON, bpffs and the host cgroup v2 root only with
    the ebpf backend (SPEC §8)."""
    from node_agent.config import AgentConfig

    plain = _rendered({"profile": "ambient"})
    (cm,) = by_kind(plain, "ConfigMap")
    assert cm["data"]["AMBIENT_REDIRECT_MODE"] == "iptables"
    assert not {"AMBIENT_REDIRECT_FALLBACK", "AMBIENT_EBPF_PIN_ROOT", "HOST_CGROUP2_ROOT"} & set(
        cm["data"]
    )
    (ds,) = by_kind(plain, "DaemonSet")
    c = ds["spec"]["template"]["spec"]["containers"][0]
    assert not {"BPF", "PERFMON"} & set(c["securityContext"]["capabilities"]["add"])
    assert not {"/sys/fs/bpf", "/host/sys/fs/cgroup"} & {m["mountPath"] for m in c["volumeMounts"]}

    ebpf = _rendered(
        {
            "profile": "ambient",
            "ambient": {
                "redirectMode": "ebpf",
                "redirectFallback": "iptables",
                "hostCgroup2Root": "/sys/fs/cgroup/unified",
            },
        }
    )
    (cm,) = by_kind(ebpf, "ConfigMap")
    cfg = AgentConfig.from_env({**cm["data"], "NODE_NAME": "n1"})
    assert (cfg.backend, cfg.backend_fallback) == ("ebpf", "iptables")
    assert cfg.bpf_pin_root == "/sys/fs/bpf/istio-cni"
    assert cfg.host_cgroup2_root == "/host/sys/fs/cgroup"
    (ds,) = by_kind(ebpf, "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    c = spec["containers"][0]
    assert c["securityContext"]["capabilities"]["add"][-2:] == ["BPF", "PERFMON"]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["bpffs"]["mountPath"] == "/sys/fs/bpf"
    assert mounts["host-cgroup2"]["mountPath"] == cfg.host_cgroup2_root
    assert cfg.bpf_pin_root.startswith(mounts["bpffs"]["mountPath"] + "/")
    paths = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"]}
    assert paths["bpffs"] == "/sys/fs/bpf" and paths["host-cgroup2"] == "/sys/fs/cgroup/unified"


def test_enablement_selectors_reach_the_agent_and_the_installer() -> None:
    """ambient.enablementSelectors -> AMBIENT_ENABLEMENT_SELECTOR (YAML, as Istio's ConfigMap
    renders it); the default is the 1.24 rule; a user's list replaces it whole."""
    from cni_plugin.enablement import DEFAULT_SELECTORS
    from install.config import InstallConfig
    from node_agent.config import AgentConfig

    (cm,) = by_kind(_rendered({"profile": "ambient"}), "ConfigMap")
    cfg = AgentConfig.from_env({**cm["data"], "NODE_NAME": "n1"})
    assert cfg.enablement_selectors == DEFAULT_SELECTORS
    assert InstallConfig.from_env(cm["data"]).enablement_selectors == DEFAULT_SELECTORS

    mine = [{"namespaceSelector": {"matchLabels": {"team": "payments"}}}]
    (cm,) = by_kind(
        _rendered({"profile": "ambient", "ambient": {"enablementSelectors": mine}}), "ConfigMap"
    )
    (only,) = AgentConfig.from_env({**cm["data"], "NODE_NAME": "n1"}).enablement_selectors
    assert only.pod.empty and only.namespace.matches({"team": "payments"})
    assert not only.namespace.matches({"istio.io/dataplane-mode": "ambient"})


@pytest.mark.parametrize(
    ("version", "dns", "reconcile"),
    [
        (None, "true", "true"),  # ours: newest Istio's defaults
        ("1.24", "false", "false"),
        (1.24, "false", "false"),  # --set compatibilityVersion=1.24 is a number
        ("1.25", "true", "false"),
        ("1.28", "true", "false"),
        ("1.29", "true", "true"),
        (1.3, "true", "true"),  # --set compatibilityVersion=1.30
    ],
)
def test_compatibility_version_brings_back_earlier_defaults(
    version: object, dns: str, reconcile: str
) -> None:
    values: dict[str, Any] = {"profile": "ambient"}
    if version is not None:
        values["compatibilityVersion"] = version
    (cm,) = by_kind(_rendered(values), "ConfigMap")
    assert cm["data"]["AMBIENT_DNS_CAPTURE"] == dns
    assert cm["data"]["AMBIENT_RECONCILE_POD_RULES_ON_STARTUP"] == reconcile
    # A user's own value still wins over the compatibility profile.
    values["ambient"] = {"dnsCapture": True}
    (cm,) = by_kind(_rendered(values), "ConfigMap")
    assert cm["data"]["AMBIENT_DNS_CAPTURE"] == "true"


def test_unknown_compatibility_version_fails_clearly() -> None:
    from helm_python.errors import HelmError

    with pytest.raises(HelmError, match=r"unknown compatibility version 1\.2:"):
        render_manifests.render({"compatibilityVersion": "1.2"}, "istio-cni")


def test_istio_owned_and_multus_values_reach_the_installer() -> None:
    from install import conf_layout
    from install.config import InstallConfig

    plain = _rendered({"profile": "ambient"})
    (cm,) = by_kind(plain, "ConfigMap")
    assert cm["data"]["ISTIO_OWNED_CNI_CONFIG"] == "false"
    assert "ISTIO_OWNED_CNI_CONF_FILENAME" not in cm["data"]
    assert by_kind(plain, "NetworkAttachmentDefinition") == []

    (cm,) = by_kind(_rendered({"profile": "ambient", "istioOwnedCNIConfig": True}), "ConfigMap")
    cfg = InstallConfig.from_env(cm["data"])
    assert cfg.istio_owned_config and cfg.istio_owned_filename == "02-istio-cni.conflist"
    (cm,) = by_kind(
        _rendered(
            {
                "profile": "ambient",
                "istioOwnedCNIConfig": True,
                "istioOwnedCNIConfigFileName": "00-mesh.conflist",
            }
        ),
        "ConfigMap",
    )
    assert InstallConfig.from_env(cm["data"]).istio_owned_filename == "00-mesh.conflist"

    # OpenShift's shape (Istio's platform-openshift values).
    multus = _rendered(
        {
            "profile": "ambient",
            "chained": False,
            "provider": "multus",
            "cniConfDir": "/etc/cni/multus/net.d",
            "cniConfFileName": "istio-cni.conf",
        }
    )
    (nad,) = by_kind(multus, "NetworkAttachmentDefinition")
    assert nad["apiVersion"] == "k8s.cni.cncf.io/v1"
    assert (nad["metadata"]["name"], nad["metadata"]["namespace"]) == ("istio-cni", "default")
    (cm,) = by_kind(multus, "ConfigMap")
    cfg = InstallConfig.from_env(cm["data"])
    layout = conf_layout.layout(
        chained=cfg.chained, istio_owned=cfg.istio_owned_config, ambient_enabled=True
    )
    assert layout == conf_layout.STANDALONE and cfg.cni_conf_name == "istio-cni.conf"


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"ambient": {"enabled": "yes"}}, "'/ambient/enabled': got string, want boolean"),
        ({"cniBinDir": 5}, "'/cniBinDir': got number, want string"),
        ({"excludeNamespaces": "kube-system"}, "'/excludeNamespaces': got string, want array"),
        ({"terminationGracePeriodSeconds": "30s"}, "'/terminationGracePeriodSeconds'"),
        ({"ambient": {"redirectMode": "ebpf2"}}, "'/ambient/redirectMode'"),
        ({"pullPolicy": "Sometimes"}, "'/pullPolicy'"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_in_one_line_naming_it(
    values: dict[str, Any], named: str
) -> None:
    """Helm's engine checks values.schema.json before rendering (so ``helm install`` fails
    before anything is created); the testbed's one-line form of that report names the value
    (the real ``helm install`` is tests/testbed/test_plugin_deploy.py)."""
    from helm_python.errors import HelmError

    from testbed.daemonset import one_line

    with pytest.raises(HelmError) as e:
        render_manifests.render({"profile": "ambient", **values}, "istio-cni")
    line = one_line(str(e.value))
    refused = "chart values refused (an unknown key or a wrong type): "
    assert "\n" not in line and line.startswith(refused), line
    assert named in line, line


def test_a_refused_start_is_in_the_pod_status(seed: list[dict[str, Any]]) -> None:
    """A start refused for bad input (e.g. ebpf without a cgroup v2 hierarchy) writes one line
    and exits 1; kubelet copies that line into the pod's status only with this policy."""
    (ds,) = by_kind(seed, "DaemonSet")
    (c,) = ds["spec"]["template"]["spec"]["containers"]
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
