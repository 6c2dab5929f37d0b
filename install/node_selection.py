"""Does a DaemonSet's pod template still select a node? Pure logic over API dicts.

Used by the stop decision (:mod:`install.teardown`): a DaemonSet that still exists but whose
``nodeSelector`` or required node affinity no longer matches this node will not bring our
pod back here, so the stop is an uninstall from this node, as newer Istio decides it.

Semantics are the scheduler's for the two fields a DaemonSet honours for placement:
- ``nodeSelector``: every key present on the node with exactly that value;
- ``affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution``: the terms are
  ORed, a term's ``matchExpressions`` and ``matchFields`` ANDed; a term with neither
  matches nothing; operators ``In``, ``NotIn``, ``Exists``, ``DoesNotExist``, ``Gt``,
  ``Lt`` (integers); ``matchFields`` knows ``metadata.name`` only.
Preferred affinity and taints do not decide placement here (taints are tolerated by the
chart's DaemonSet). Inputs are the API's JSON shape (camelCase keys).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _requirement(req: Mapping[str, Any], values: Mapping[str, str]) -> bool:
    key = str(req.get("key", ""))
    op = req.get("operator", "")
    wanted = [str(v) for v in req.get("values") or []]
    present = key in values
    if op == "In":
        return present and values[key] in wanted
    if op == "NotIn":
        return not present or values[key] not in wanted
    if op == "Exists":
        return present
    if op == "DoesNotExist":
        return not present
    if op in ("Gt", "Lt") and present and len(wanted) == 1:
        try:
            have, bound = int(values[key]), int(wanted[0])
        except ValueError:
            return False
        return have > bound if op == "Gt" else have < bound
    return False  # unknown operator or malformed: the scheduler would not match either


def _term(term: Mapping[str, Any], labels: Mapping[str, str], fields: Mapping[str, str]) -> bool:
    exprs = term.get("matchExpressions") or []
    field_exprs = term.get("matchFields") or []
    if not exprs and not field_exprs:
        return False
    return all(_requirement(r, labels) for r in exprs) and all(
        _requirement(r, fields) for r in field_exprs
    )


def selects_node(pod_spec: Mapping[str, Any], node: Mapping[str, Any]) -> bool:
    """True when a pod with ``pod_spec`` may be placed on ``node`` (both API dicts)."""
    meta = node.get("metadata") or {}
    labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
    fields = {"metadata.name": str(meta.get("name", ""))}
    for key, value in (pod_spec.get("nodeSelector") or {}).items():
        if labels.get(str(key)) != str(value):
            return False
    required = ((pod_spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    ) or None
    if required is None:
        return True
    return any(_term(t, labels, fields) for t in required.get("nodeSelectorTerms") or [])
