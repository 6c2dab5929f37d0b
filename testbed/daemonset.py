"""Our chart on the testbed, installed the way users install it: Helm's own engine (PyPI
``helm-python-sdk``, the library ``install.render_manifests`` already renders with) against
the node's API server, the seed's ``IstioCNI`` settings, and the image from
:mod:`testbed.agent_image` imported into the node's containerd (no registry).

Role: ``install`` / ``upgrade`` / ``uninstall`` the ``istio-cni`` release, and wait until the
``istio-cni-node`` pod is Ready (kubelet's readiness probe on ``/readyz``) or report, in one
line, why it is not (image missing, crash loop with the agent's last log line, a value the
chart refuses). Testbed-specific values are only the host paths the node really has.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Mapping
from typing import Any

from cni_plugin.bpf.availability import cgroup2_root
from cni_plugin.errors import ConfigError
from install.istiocni_resource import helm_release
from install.render_manifests import CHART, SEED
from testbed import daemons
from testbed.agent_image import AgentImage
from testbed.build import ensure_binaries
from testbed.node import Testbed

RELEASE = "istio-cni"
SELECTOR = "k8s-app=istio-cni-node"
CONTAINER = "install-cni"
# Waiting reasons that will not resolve by themselves: report them at once.
STUCK = ("ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull", "InvalidImageName",
         "CreateContainerConfigError", "CreateContainerError", "CrashLoopBackOff",
         "RunContainerError")  # fmt: skip


class DaemonSetError(RuntimeError):
    """The release could not be installed or its pod did not become Ready (one line)."""


def import_image(bed: Testbed, image: AgentImage, tags: tuple[str, ...] = ()) -> None:
    """``ctr images import`` the archive into the node's containerd; extra ``tags`` name
    the same image again (an upgrade to a changed tag of the same build)."""
    lay = bed.layout
    bins = ensure_binaries(bed.cache, bed.kubernetes_version)  # cached: a stamp check
    repo = image.ref.rsplit(":", 1)[0]
    for argv in (
        daemons.ctr_argv(lay, bins, "images", "import", "--snapshotter=native",
                         str(image.tarball)),
        *(daemons.ctr_argv(lay, bins, "images", "tag", "--force", image.ref, f"{repo}:{t}")
          for t in tags),
    ):  # fmt: skip
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            raise DaemonSetError(f"{' '.join(argv[2:])}: {proc.stderr.strip()}")


def values(info: Mapping[str, Any], backend: str, image_ref: str) -> dict[str, Any]:
    """The seed's IstioCNI values plus what this node really has: its CNI dirs, the image,
    the backend, and for ebpf the pin root private to the instance and the host's cgroup v2."""
    _, vals = helm_release(SEED)
    repo, tag = image_ref.rsplit(":", 1)
    hub, name = repo.rsplit("/", 1)
    vals.update({"hub": hub, "image": name, "tag": tag, "pullPolicy": "Never",
                 "cniBinDir": info["cni_bin_dir"], "cniConfDir": info["cni_conf_dir"]})  # fmt: skip
    ambient: dict[str, Any] = {"redirectMode": backend}
    if backend == "ebpf":
        try:
            cgroup = cgroup2_root()
        except ConfigError as e:
            raise DaemonSetError(str(e)) from None
        ambient.update({"ebpfPinRoot": info["bpf_pin_root"], "hostCgroup2Root": cgroup})
    vals["ambient"] = {**vals.get("ambient", {}), **ambient}
    return vals


def _config(bed: Testbed) -> Any:
    from helm_python.config import Config

    return Config(kubeconfig_path=str(bed.layout.kubeconfig), namespace=helm_namespace())


def helm_namespace() -> str:
    return helm_release(SEED)[0]


def _helm(action: str, call: Any) -> dict[str, Any]:
    from helm_python.errors import HelmError

    try:
        out: dict[str, Any] = call()
    except HelmError as e:
        raise DaemonSetError(f"helm {action} failed: {one_line(str(e))}") from None
    return out


def one_line(message: str) -> str:
    """Helm's multi-line schema report as one line: the offending values, else everything."""
    lines = [ln.strip(" -") for ln in message.strip().splitlines() if ln.strip()]
    wrong = [ln.removeprefix("at ") for ln in lines if ln.startswith("at '")]
    if wrong:
        return ("chart values refused (an unknown key or a wrong type): " + "; ".join(wrong)
                + " (types: install/helm/istio-cni/values.schema.json)")  # fmt: skip
    return " ".join(lines) or "no message"


def install(bed: Testbed, vals: Mapping[str, Any]) -> dict[str, Any]:
    """``helm install istio-cni install/helm/istio-cni -n istio-cni`` with ``vals``."""
    ns = helm_namespace()
    with _config(bed) as cfg:
        return _helm("install", lambda: cfg.install(CHART, RELEASE, dict(vals), namespace=ns))


def upgrade(bed: Testbed, vals: Mapping[str, Any]) -> dict[str, Any]:
    ns = helm_namespace()
    with _config(bed) as cfg:
        return _helm("upgrade", lambda: cfg.upgrade(CHART, RELEASE, dict(vals), namespace=ns))


def uninstall(bed: Testbed) -> dict[str, Any]:
    with _config(bed) as cfg:
        return _helm("uninstall", lambda: cfg.uninstall(RELEASE))


def agent_pods(bed: Testbed) -> list[dict[str, Any]]:
    out = bed.kubectl("get", "pods", "-n", helm_namespace(), "-l", SELECTOR, "-o", "json")
    return list(json.loads(out.stdout)["items"])


def last_words(container_status: Mapping[str, Any]) -> str:
    """The last line the container wrote before it last exited, from the pod's status
    (``lastState.terminated.message``: kubelet copies the log's tail there for a container
    with ``terminationMessagePolicy: FallbackToLogsOnError`` that failed)."""
    term = (container_status.get("lastState") or {}).get("terminated") or {}
    lines = [ln.strip() for ln in str(term.get("message") or "").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _why_not_ready(bed: Testbed, pod: dict[str, Any]) -> str | None:
    """A one-line reason when the pod is stuck in a way waiting will not fix."""
    name = pod["metadata"]["name"]
    for st in (pod.get("status") or {}).get("containerStatuses") or []:
        waiting = (st.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in STUCK:
            msg = " ".join(str(waiting.get("message", "")).split())[:300]
            last = ""
            said = last_words(st)
            if said:  # the pod's own status (the chart's FallbackToLogsOnError)
                last = f"; its last log line: {said[:300]}"
            elif st.get("restartCount"):
                logs = bed.kubectl("logs", "-n", helm_namespace(), name, "-c", CONTAINER,
                                   "--previous", "--tail=1", check=False).stdout  # fmt: skip
                last = f"; its last log line: {logs.strip()[:300]}" if logs.strip() else ""
            return f"pod {name}: {waiting['reason']}: {msg}{last}"
    return None


def wait_ready(bed: Testbed, timeout: float = 120.0, not_uid: str = "") -> dict[str, Any]:
    """The ``istio-cni-node`` pod once Ready (other than ``not_uid``: a rollout's new pod)."""
    deadline = time.monotonic() + timeout
    last = "no istio-cni-node pod yet (is the DaemonSet scheduled? kubectl describe ds)"
    while time.monotonic() < deadline:
        for pod in agent_pods(bed):
            if pod["metadata"]["uid"] == not_uid or pod["metadata"].get("deletionTimestamp"):
                continue
            conds = (pod.get("status") or {}).get("conditions") or []
            if any(c["type"] == "Ready" and c["status"] == "True" for c in conds):
                return pod
            stuck = _why_not_ready(bed, pod)
            if stuck:
                raise DaemonSetError(stuck)
            last = f"pod {pod['metadata']['name']} phase {pod['status'].get('phase')}, not Ready"
        time.sleep(0.5)
    raise DaemonSetError(f"istio-cni-node not Ready after {timeout:g}s: {last}")


def wait_gone(bed: Testbed, timeout: float = 90.0) -> None:
    """Until no ``istio-cni-node`` pod is left (the agent's cleanup ran on its way out)."""
    deadline = time.monotonic() + timeout
    while agent_pods(bed):
        if time.monotonic() > deadline:
            names = [p["metadata"]["name"] for p in agent_pods(bed)]
            raise DaemonSetError(f"istio-cni-node pods still there {timeout:g}s after "
                                 f"uninstall: {names}")  # fmt: skip
        time.sleep(0.3)


def set_flags(values: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``--set`` pairs of a values dict (as an operator would type them)."""
    out: list[tuple[str, Any]] = []
    for k, v in values.items():
        if isinstance(v, dict):
            out += set_flags(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", str(v).lower() if isinstance(v, bool) else v))
    return out
