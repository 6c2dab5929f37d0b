"""Conflist merge and kubeconfig against Istio 1.24's golden files, byte for byte."""

from __future__ import annotations

import os

import pytest

from install import conflist, kubeconfig

# CI lays shared/ beside the clone: a missing oracle fails the test, never skips it.
REF = os.path.join(
    os.path.dirname(os.path.abspath(__file__)),
    "..",
    "..",
    "..",
    "shared",
    "reference",
    "istio-1.24",
    "install",
)

# The settings the goldens were produced with (reference/README.md).
GOLDEN_ENTRY = conflist.PluginEntry(
    plugin_log_level="debug",
    cni_agent_run_dir="/path/to/kubeconfig",
    ambient_enabled=False,
    exclude_namespaces="",
    pod_namespace="my-namespace",
)


def ref(name: str) -> bytes:
    assert os.path.isfile(os.path.join(REF, name)), f"golden {name} missing under {REF}"
    with open(os.path.join(REF, name), "rb") as f:
        return f.read()


@pytest.mark.parametrize(
    ("given", "golden", "new_name"),
    [
        ("bridge.conf", "bridge.conf.golden", "bridge.conflist"),
        ("list.conflist", "list.conflist.golden", "list.conflist"),
        ("list-no-istio.conflist", "list.conflist.golden", "list-no-istio.conflist"),
        ("list-with-istio.conflist", "list-with-istio.conflist.golden", "list-with-istio.conflist"),
    ],
)
def test_merge_matches_istio_goldens(given: str, golden: str, new_name: str) -> None:
    out, name = conflist.merge(ref(given), given, GOLDEN_ENTRY)
    assert out == ref(golden)
    assert name == new_name


def test_merging_twice_is_stable() -> None:
    once, _ = conflist.merge(ref("list.conflist"), "list.conflist", GOLDEN_ENTRY)
    twice, _ = conflist.merge(once, "list.conflist", GOLDEN_ENTRY)
    assert once == twice


@pytest.mark.parametrize(
    ("name", "words"),
    [("invalid-arr.conflist", "holds a JSON list"), ("invalid-map.conflist", "no 'plugins'")],
)
def test_invalid_inputs_are_rejected_with_a_clear_message(name: str, words: str) -> None:
    with pytest.raises(conflist.ConflistError) as e:
        conflist.merge(ref(name), name, GOLDEN_ENTRY)
    assert words in str(e.value) and name in str(e.value)
    assert "CNI_CONF_NAME" in str(e.value)  # says what to do


def test_not_json_is_rejected() -> None:
    with pytest.raises(conflist.ConflistError, match="not valid JSON"):
        conflist.merge(b"{", "x.conflist", GOLDEN_ENTRY)


def test_choose_skips_invalid_files_in_sorted_order() -> None:
    files = {
        "00-invalid-arr.conflist": ref("invalid-arr.conflist"),
        "01-invalid-map.conflist": ref("invalid-map.conflist"),
        "02-notes.txt": b"hello",
        "10-bridge.conf": ref("bridge.conf"),
        "20-list.conflist": ref("list.conflist"),
    }
    assert conflist.choose(files) == "10-bridge.conf"
    del files["10-bridge.conf"]
    assert conflist.choose(files) == "20-list.conflist"
    assert conflist.choose({"a.conf": b'{"name": "x"}'}) is None  # a .conf needs a type


def test_exclusions_render_like_istio() -> None:
    entry = conflist.PluginEntry(
        "info", "/var/run/istio-cni", True, "kube-system,istio-system", "istio-cni"
    )
    assert entry.to_dict()["exclude_namespaces"] == ["kube-system", "istio-system"]
    assert GOLDEN_ENTRY.to_dict()["exclude_namespaces"] == [""]


def test_go_escaping_and_numbers() -> None:
    out = conflist.dumps({"b": "<a&b>", "a": 1500.0, "c": 1.5})
    assert out == b'{\n  "a": 1500,\n  "b": "\\u003ca\\u0026b\\u003e",\n  "c": 1.5\n}\n'
    parsed = conflist.loads(b'{"mtu": 1500.0}', "x")
    assert conflist.dumps(parsed) == b'{\n  "mtu": 1500\n}\n'


def test_without_entry_removes_only_istio() -> None:
    merged, _ = conflist.merge(ref("list.conflist"), "list.conflist", GOLDEN_ENTRY)
    stripped = conflist.without_entry(merged, "list.conflist")
    assert not conflist.has_entry(stripped, "list.conflist")
    assert (
        conflist.loads(stripped, "x")["plugins"]
        == conflist.loads(ref("list.conflist"), "x")["plugins"]
    )


@pytest.mark.parametrize(
    ("golden", "host", "ca"),
    [
        ("kubeconfig-tls", "10.96.0.1", True),
        ("kubeconfig-skip-tls", "10.96.0.1", False),
        ("kubeconfig-newhost", "50.76.2.1", True),
    ],
)
def test_kubeconfig_matches_istio_goldens(golden: str, host: str, ca: bool) -> None:
    text = kubeconfig.render(
        kubeconfig.server_url(host, "443"),
        "service_account_token_string",
        ref("kube-ca.crt") if ca else None,
    )
    assert text.encode() == ref(golden)


def test_kubeconfig_ipv6_server() -> None:
    assert kubeconfig.server_url("fd00::1", "6443") == "https://[fd00::1]:6443"


def test_plugin_reads_what_the_installer_writes(tmp_path: object) -> None:
    from cni_plugin import kube_lookup

    path = os.path.join(str(tmp_path), "kc")
    with open(path, "wb") as f:
        f.write(ref("kubeconfig-tls"))
    kc = kube_lookup.load_kubeconfig(path)
    assert (kc.host, kc.port, kc.token, kc.insecure) == (
        "10.96.0.1",
        443,
        "service_account_token_string",
        False,
    )
    assert kc.ca_pem is not None and kc.ca_pem.encode() == ref("kube-ca.crt")


# -- newer Istio: enablement selectors in the entry (SPEC §9) ------------------------------

OURS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "golden", "install")

# The chart's default ambient.enablementSelectors, as the ConfigMap renders it (toYaml).
CHART_SELECTOR_YAML = """\
- podSelector:
    matchLabels:
      istio.io/dataplane-mode: ambient
- namespaceSelector:
    matchLabels:
      istio.io/dataplane-mode: ambient
  podSelector:
    matchExpressions:
    - key: istio.io/dataplane-mode
      operator: NotIn
      values:
      - none
"""


def test_selectors_from_the_chart_are_written_as_istio_encodes_them() -> None:
    from install.config import InstallConfig

    cfg = InstallConfig.from_env({"AMBIENT_ENABLEMENT_SELECTOR": CHART_SELECTOR_YAML})
    entry = conflist.PluginEntry(
        "info", "/var/run/istio-cni", True, "kube-system", "istio-cni", cfg.enablement_selectors
    )
    out, _ = conflist.merge(ref("list.conflist"), "list.conflist", entry)
    with open(os.path.join(OURS, "list-selectors.conflist.golden"), "rb") as f:
        assert out == f.read()


def test_without_the_setting_the_entry_is_the_1_24_one() -> None:
    from install.config import InstallConfig

    assert InstallConfig.from_env({}).enablement_selectors is None
    assert "enablement_selectors" not in GOLDEN_ENTRY.to_dict()
    # An explicit empty list is kept: the plugin then selects no pod, as Istio's does.
    cfg = InstallConfig.from_env({"AMBIENT_ENABLEMENT_SELECTOR": "[]"})
    assert cfg.enablement_selectors == ()
    entry = conflist.PluginEntry("info", "/r", True, "", "ns", cfg.enablement_selectors)
    assert entry.to_dict()["enablement_selectors"] == []


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ("- podSelector: [unclosed", "is not valid YAML (line 1)"),
        ("podSelector: {}", "must be a list"),
        ("- podSelector: {matchLabels: {a: 1}}", "not a valid label value"),
    ],
)
def test_a_bad_selector_setting_is_one_line_naming_the_variable(raw: str, words: str) -> None:
    from cni_plugin.errors import ConfigError
    from install.config import InstallConfig

    with pytest.raises(ConfigError) as e:
        InstallConfig.from_env({"AMBIENT_ENABLEMENT_SELECTOR": raw})
    assert "AMBIENT_ENABLEMENT_SELECTOR" in str(e.value) and words in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("env", "want"),
    [
        ({}, "info"),
        ({"PLUGIN_LOG_LEVEL": "error"}, "error"),
        ({"PLUGIN_LOG_LEVEL": "error", "LOG_LEVEL": "debug"}, "error"),  # default scope only
        ({"PLUGIN_LOG_LEVEL": "info", "LOG_LEVEL": "default:info,cni-plugin:debug"}, "debug"),
        ({"PLUGIN_LOG_LEVEL": "info", "LOG_LEVEL": "cni-plugin:debug,all:Warning"}, "warn"),
    ],
)
def test_plugin_level_follows_the_cni_plugin_scope_as_istio(env: dict[str, str], want: str) -> None:
    """Istio's agent writes its cni-plugin scope's level into the plugin's config."""
    from install.config import InstallConfig

    assert InstallConfig.from_env(env).plugin_log_level == want
