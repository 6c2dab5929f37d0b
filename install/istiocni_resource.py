"""The operator-facing ``IstioCNI`` resource (seed: ``spec.profile: ambient``,
``spec.namespace: istio-cni``) mapped onto this chart's Helm release.

As in the Sail operator: ``spec.namespace`` is the release namespace, ``spec.profile`` the
chart's ``profile`` value, and ``spec.values.cni.<key>`` become the chart's top-level
values with Istio's names (``cniBinDir``, ``ambient.enabled``, ...), and
``spec.values.global`` the chart's ``global`` (hub, tag, logAsJson, platform, ...). Pure: no
cluster.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cni_plugin.errors import ConfigError

DEFAULT_NAMESPACE = "istio-cni"


def helm_release(doc: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(release namespace, chart values) for an ``IstioCNI`` document."""
    if doc.get("kind") != "IstioCNI":
        raise ConfigError(f"expected kind IstioCNI, got {doc.get('kind')!r}")
    spec = doc.get("spec") or {}
    if not isinstance(spec, Mapping):
        raise ConfigError("IstioCNI spec must be a mapping")
    namespace = str(spec.get("namespace") or DEFAULT_NAMESPACE)
    values: dict[str, Any] = {}
    cni = ((spec.get("values") or {}).get("cni")) or {}
    if not isinstance(cni, Mapping):
        raise ConfigError("IstioCNI spec.values.cni must be a mapping")
    values.update(cni)
    glob = (spec.get("values") or {}).get("global")
    if glob is not None:
        if not isinstance(glob, Mapping):
            raise ConfigError("IstioCNI spec.values.global must be a mapping")
        values["global"] = dict(glob)
    if spec.get("profile"):
        values["profile"] = str(spec["profile"])
    return namespace, values
