"""The agent's view of Kubernetes objects: small immutable records parsed from API JSON.

Pure (no client import): :mod:`node_agent.kube` hands raw JSON dicts here, and the rest of
the agent sees only :class:`PodInfo` and :class:`NamespaceInfo`. Keeping just the fields
the agent reads keeps memory flat with thousands of pods.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cni_plugin import constants as c
from cni_plugin.enablement import PodFacts

TERMINAL_PHASES = ("Succeeded", "Failed")


@dataclass(frozen=True)
class NamespaceInfo:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    resource_version: str = ""

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> NamespaceInfo:
        meta = obj.get("metadata") or {}
        return cls(
            name=meta.get("name", ""),
            labels=dict(meta.get("labels") or {}),
            resource_version=meta.get("resourceVersion", ""),
        )


@dataclass(frozen=True)
class PodInfo:
    uid: str
    namespace: str
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    host_network: bool = False
    phase: str = ""
    ips: tuple[str, ...] = ()
    service_account: str = ""
    node_name: str = ""
    deleting: bool = False
    resource_version: str = ""

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> PodInfo:
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        ips = tuple(p["ip"] for p in status.get("podIPs") or () if p.get("ip"))
        if not ips and status.get("podIP"):
            ips = (status["podIP"],)
        return cls(
            uid=meta.get("uid", ""),
            namespace=meta.get("namespace", ""),
            name=meta.get("name", ""),
            labels=dict(meta.get("labels") or {}),
            annotations=dict(meta.get("annotations") or {}),
            host_network=bool(spec.get("hostNetwork")),
            phase=status.get("phase", ""),
            ips=ips,
            service_account=spec.get("serviceAccountName") or spec.get("serviceAccount") or "",
            node_name=spec.get("nodeName", ""),
            deleting=bool(meta.get("deletionTimestamp")),
            resource_version=meta.get("resourceVersion", ""),
        )

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL_PHASES

    @property
    def redirection_annotation(self) -> str | None:
        return self.annotations.get(c.REDIRECTION_ANNOTATION)

    def facts(self, namespace: NamespaceInfo | None) -> PodFacts:
        return PodFacts(
            namespace=self.namespace,
            labels=self.labels,
            annotations=self.annotations,
            host_network=self.host_network,
            namespace_labels=namespace.labels if namespace else {},
        )
