"""Chart parity with Istio's own istio-cni chart (issue 17 item 9), rendered side by side.

Istio's chart is read from Go's module cache (``bench.istio_source``: ``go mod download`` of
``istio.io/istio`` at ``bench.istio_peer.DEFAULT_VERSION``), never copied here. Both charts are
rendered by Helm's own engine with the values files in ``tests/chart_values/`` (what a user of
Istio's chart brings), and the fields those values change are compared. Where the two charts
differ on purpose, the difference is listed in ``OUR_DEFAULTS`` / ``normalise`` below and in
docs/istio-parity.md, and a test keeps that list equal to the charts' real differences.

Istio's chart is a prerequisite like the Istio peer: a fetch failure fails these tests with
its one-line reason; ``ICNI_ISTIO_CHART=skip`` turns that into a visible skip (offline work).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench.istio_peer import PeerBuildError
from bench.istio_source import ensure_chart
from install import render_manifests

VALUES_DIR = Path(__file__).resolve().parent.parent / "chart_values"
GOLDEN_DIR = Path(__file__).resolve().parent.parent / "golden" / "chart"
USER_FILES = sorted(VALUES_DIR.glob("*.yaml"))
# Our chart's defaults where they differ from Istio's, on purpose (docs/istio-parity.md):
# Istio's chart is rendered with these under the user's values, so that both describe the
# same settings and every other field must match.
OUR_DEFAULTS: dict[str, Any] = {
    "image": "istio-cni-py",  # our image (Istio's: install-cni)
    "global": {"hub": "localhost", "tag": "dev", "logAsJson": True},  # our build; JSON logs
    "ambient": {"shareHostNetworkNamespace": True},  # until the agent runs in its own netns
}
# Keys Istio's templates read that its values.yaml does not list.
TEMPLATE_ONLY_KEYS = ["profile", "compatibilityVersion", "platform", "global.profile",
                      "global.platform", "cni.ambient.enabled"]  # fmt: skip
# Env entries only Istio's Go agent reads (its sidecar repair controller; Go's runtime).
ISTIO_ONLY_ENV = {"REPAIR_NODE_NAME", "REPAIR_RUN_AS_DAEMON", "REPAIR_SIDECAR_ANNOTATION",
                  "GOMEMLIMIT", "GOMAXPROCS"}  # fmt: skip
# Labels derived from each chart's own name and version.
VERSION_LABELS = {"app.kubernetes.io/version", "helm.sh/chart"}


@pytest.fixture(scope="module")
def istio_chart() -> Path:
    try:
        return ensure_chart()
    except PeerBuildError as e:
        if os.environ.get("ICNI_ISTIO_CHART") == "skip":
            pytest.skip(f"Istio's chart not available (ICNI_ISTIO_CHART=skip): {e}")
        pytest.fail(f"Istio's istio-cni chart could not be fetched: {e} "
                    "(or set ICNI_ISTIO_CHART=skip to skip these tests visibly)")  # fmt: skip


def render(chart: Path | str, values: Mapping[str, Any]) -> list[dict[str, Any]]:
    from helm_python.chart import Chart

    with Chart.load(str(chart)) as c:
        out = c.render(copy.deepcopy(dict(values)), name="istio-cni", namespace="istio-system")
    texts = [text for key, text in sorted(out.items()) if key.endswith(".yaml")]
    return [d for text in texts for d in yaml.safe_load_all(text) if d]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) <= 1, [d["metadata"]["name"] for d in found]
    return found[0] if found else None


def merged(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        out[k] = (
            merged(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
        )
    return out


def leaves(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key path, value) of every leaf; an empty mapping is a leaf."""
    for k, v in tree.items():
        if isinstance(v, Mapping) and v:
            yield from leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def nested(path: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    *parents, last = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return out


def istio_defaults(chart: Path) -> dict[str, Any]:
    values = yaml.safe_load((chart / "values.yaml").read_text())
    defaults: dict[str, Any] = values["_internal_defaults_do_not_set"]
    return defaults


def our_defaults() -> dict[str, Any]:
    values = yaml.safe_load(Path(render_manifests.CHART, "values.yaml").read_text())
    defaults: dict[str, Any] = values["_internal_defaults_do_not_set"]
    return defaults


# -- (1) every key of Istio's values.yaml is accepted ----------------------------------------
def test_every_key_of_istios_values_is_accepted(istio_chart: Path) -> None:
    paths = dict(leaves(istio_defaults(istio_chart)))
    assert len(paths) > 60 and {"env", "global.logAsJson", "seLinuxOptions"} <= set(paths)
    refused = {}
    from helm_python.chart import Chart

    with Chart.load(render_manifests.CHART) as chart:  # `helm template` once per key
        for path, value in [*paths.items(), *((p, "") for p in TEMPLATE_ONLY_KEYS)]:
            if path == "cni.ambient.enabled":
                value = True
            try:
                out = chart.render(nested(path, value), name="istio-cni", namespace="istio-cni")
                assert "istio-cni/templates/daemonset.yaml" in out
            except Exception as e:  # collected: one report of every refusal
                refused[path] = " ".join(str(e).split())[-160:]
    assert refused == {}
    # ... and all of them at once, as a user copying Istio's values.yaml would set them
    ds = one(render(render_manifests.CHART, istio_defaults(istio_chart)), "DaemonSet")
    assert ds is not None


def test_our_values_are_istios_keys_plus_our_documented_own(istio_chart: Path) -> None:
    """The chart's own extra keys are exactly the ones docs/istio-parity.md lists."""
    ours, theirs = dict(leaves(our_defaults())), dict(leaves(istio_defaults(istio_chart)))
    own = {"logLevel", "systemNamespace", "ambient.redirectMode", "ambient.redirectFallback",
           "ambient.ebpfPinRoot", "ambient.hostCgroup2Root"}  # fmt: skip
    assert set(ours) - set(theirs) == own
    assert set(theirs) - set(ours) == set()
    doc = Path(render_manifests.HERE).parent.joinpath("docs", "istio-parity.md").read_text()
    for key in sorted(own):
        assert f"`{key}`" in doc, f"docs/istio-parity.md does not list our own key {key}"


def test_default_differences_are_exactly_the_documented_ones(istio_chart: Path) -> None:
    ours, theirs = dict(leaves(our_defaults())), dict(leaves(istio_defaults(istio_chart)))
    differ = {p for p in set(ours) & set(theirs) if ours[p] != theirs[p]}
    assert differ == {p for p, _ in leaves(OUR_DEFAULTS)}
    doc = Path(render_manifests.HERE).parent.joinpath("docs", "istio-parity.md").read_text()
    for key in sorted(differ):
        assert f"`{key}`" in doc, f"docs/istio-parity.md does not explain the default of {key}"


def test_a_machine_without_go_gets_one_line_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no `go` here
    with pytest.raises(PeerBuildError, match=r"^go not found on PATH: install Go"):
        ensure_chart()


# -- (2) unknown keys are refused, naming the key ---------------------------------------------
@pytest.mark.parametrize(
    ("values", "where", "key"),
    [
        ({"bogus": 1}, "''", "'bogus'"),
        ({"ambient": {"dnscapture": False}}, "'/ambient'", "'dnscapture'"),
        ({"global": {"meshID": "m1"}}, "'/global'", "'meshID'"),
        ({"cni": {"repair": {"enable": True}}}, "'/cni/repair'", "'enable'"),
        ({"defaults": {"hub": "x"}}, "''", "'defaults'"),
        ({"seLinuxOptions": {"typ": "spc_t"}}, "'/seLinuxOptions'", "'typ'"),
    ],
)
def test_an_unknown_key_is_refused_naming_it(values: dict[str, Any], where: str, key: str) -> None:
    from helm_python.errors import HelmError

    with pytest.raises(HelmError) as err:
        render(render_manifests.CHART, values)
    text = str(err.value)
    assert f"at {where}: additional properties {key} not allowed" in text, text


# -- (3) the DaemonSet (and its companions) as Istio's chart renders them ---------------------
def normalise(ds: dict[str, Any], user: Mapping[str, Any], istio: bool) -> dict[str, Any]:
    """The DaemonSet fields users' values change, in comparable form."""
    meta, tmpl = ds["metadata"], ds["spec"]["template"]
    spec = tmpl["spec"]
    (c,) = spec["containers"]
    image = c["image"]
    profile = user.get("profile") or (user.get("global") or {}).get("profile")
    sets_variant = "variant" in user or "variant" in (user.get("global") or {})
    if istio and profile == "ambient" and not sets_variant:
        # Istio's ambient profile picks its distroless image; ours ships one image
        image = image.removesuffix("-distroless")
    env = [e for e in c.get("env", []) if e["name"] not in ISTIO_ONLY_ENV]
    mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    return {
        "labels": {k: v for k, v in meta["labels"].items() if k not in VERSION_LABELS},
        "name": meta["name"],
        "selector": ds["spec"]["selector"],
        "updateStrategy": ds["spec"].get("updateStrategy"),
        "podLabels": {
            k: v for k, v in tmpl["metadata"]["labels"].items() if k not in VERSION_LABELS
        },
        "podAnnotations": tmpl["metadata"].get("annotations"),
        "hostNetwork": spec.get("hostNetwork"),
        "dnsPolicy": spec.get("dnsPolicy"),
        "nodeSelector": spec.get("nodeSelector"),
        "affinity": spec.get("affinity"),
        "tolerations": spec.get("tolerations"),
        "priorityClassName": spec.get("priorityClassName"),
        "serviceAccountName": spec.get("serviceAccountName"),
        "terminationGracePeriodSeconds": spec.get("terminationGracePeriodSeconds"),
        "image": image,
        "imagePullPolicy": c.get("imagePullPolicy"),
        "args": c.get("args") or [],
        "securityContext": c.get("securityContext"),
        "env": env,
        "envFrom": c.get("envFrom"),
        "resources": c.get("resources") or None,
        "ports": c.get("ports"),
        "readinessProbe": c.get("readinessProbe"),
        "containerName": c["name"],
        # the mounts and host paths both charts have (ours adds the xtables lock, and
        # mounts the ambient ones whatever ambient.enabled says)
        "mounts": mounts,
        "volumes": volumes,
    }


def compare(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    """Fields that differ, field -> (ours, Istio's); mounts/volumes by common name."""
    out: dict[str, Any] = {}
    for field in ours:
        a, b = ours[field], theirs[field]
        if field in ("mounts", "volumes"):
            a = {k: v for k, v in a.items() if k in b}
            b = {k: v for k, v in b.items() if k in a}
        if a != b:
            out[field] = (a, b)
    return out


def renders(istio_chart: Path, user: Mapping[str, Any]) -> tuple[list[Any], list[Any]]:
    return render(render_manifests.CHART, user), render(istio_chart, merged(OUR_DEFAULTS, user))


@pytest.mark.parametrize("path", USER_FILES, ids=[p.stem for p in USER_FILES])
def test_the_daemonset_matches_istios_for_a_users_values(istio_chart: Path, path: Path) -> None:
    user = yaml.safe_load(path.read_text())
    ours, theirs = renders(istio_chart, user)
    ds_ours, ds_theirs = one(ours, "DaemonSet"), one(theirs, "DaemonSet")
    assert (ds_ours is None) == (ds_theirs is None)
    if ds_ours is not None and ds_theirs is not None:
        assert compare(normalise(ds_ours, user, False), normalise(ds_theirs, user, True)) == {}


@pytest.mark.parametrize("path", USER_FILES, ids=[p.stem for p in USER_FILES])
def test_the_companion_objects_match_istios(istio_chart: Path, path: Path) -> None:
    """ConfigMap (every key both have), ServiceAccount pull secrets, ResourceQuota,
    NetworkPolicy, the NetworkAttachmentDefinition and the OpenShift SCC rule."""
    user = yaml.safe_load(path.read_text())
    ours, theirs = renders(istio_chart, user)
    for kind in ("ConfigMap", "ServiceAccount", "ResourceQuota", "NetworkPolicy",
                 "NetworkAttachmentDefinition", "ClusterRole", "ClusterRoleBinding"):  # fmt: skip
        a, b = _base(ours, kind), _base(theirs, kind)
        assert (a is None) == (b is None), kind
        if a is None or b is None:
            continue
        assert a["metadata"]["name"] == b["metadata"]["name"], kind
        assert _labels(a) == _labels(b), kind
        if kind == "ConfigMap":
            common = set(a["data"]) & set(b["data"])
            assert {"AMBIENT_ENABLED", "EXCLUDE_NAMESPACES", "CHAINED_CNI_PLUGIN"} <= common
            assert {k: a["data"][k] for k in common} == {k: b["data"][k] for k in common}
            for name in user.get("env") or {}:
                assert a["data"][name] == b["data"][name]
        elif kind == "ServiceAccount":
            assert a.get("imagePullSecrets") == b.get("imagePullSecrets")
        elif kind in ("ResourceQuota", "NetworkPolicy"):
            assert a["spec"] == b["spec"], kind
        elif kind == "ClusterRole":
            scc = [r for r in a["rules"] if "security.openshift.io" in r["apiGroups"]]
            assert scc == [r for r in b["rules"] if "security.openshift.io" in r["apiGroups"]]


def _base(docs: list[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    """The one object of ``kind``; for RBAC the base istio-cni one (Istio adds repair roles,
    we add the ambient ones)."""
    if not kind.startswith("ClusterRole"):
        return one(docs, kind)
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == "istio-cni"]
    return found[0] if found else None


def _labels(doc: dict[str, Any]) -> dict[str, str]:
    return {
        k: v for k, v in (doc["metadata"].get("labels") or {}).items() if k not in VERSION_LABELS
    }


@pytest.mark.parametrize("path", USER_FILES, ids=[p.stem for p in USER_FILES])
def test_our_rendering_of_a_users_values_is_the_golden_file(path: Path) -> None:
    """Our chart's whole output for each values file, against tests/golden/chart/ (ours
    only: Istio's rendering is never committed). ICNI_WRITE_GOLDEN=1 rewrites them."""
    from helm_python.chart import Chart

    with Chart.load(render_manifests.CHART) as c:
        out = c.render(yaml.safe_load(path.read_text()), name="istio-cni", namespace="istio-cni")
    text = "".join(
        f"# Source: {key}\n{body.strip()}\n---\n"
        for key, body in sorted(out.items())
        if key.endswith(".yaml") and body.strip()
    )
    golden = GOLDEN_DIR / f"{path.stem}.yaml"
    if os.environ.get("ICNI_WRITE_GOLDEN") == "1":
        GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert golden.is_file(), f"{golden} missing: ICNI_WRITE_GOLDEN=1 writes it"
    assert text == golden.read_text(), f"{golden} differs (ICNI_WRITE_GOLDEN=1 rewrites it)"


def test_istios_own_values_file_renders_istios_daemonset(istio_chart: Path) -> None:
    """A user who copies Istio's whole values.yaml (its defaults, as settings) gets Istio's
    DaemonSet: its image, text logs, the agent in its own network namespace."""
    user = istio_defaults(istio_chart)
    ours, theirs = renders(istio_chart, user)
    ds_ours, ds_theirs = one(ours, "DaemonSet"), one(theirs, "DaemonSet")
    assert ds_ours is not None and ds_theirs is not None
    a, b = normalise(ds_ours, user, False), normalise(ds_theirs, user, True)
    assert a["image"] == f"{user['global']['hub']}/install-cni:{user['global']['tag']}"
    assert a["args"] == ["--log_output_level=info"] and a["hostNetwork"] is None
    assert compare(a, b) == {}
