"""Kubernetes label selectors (``matchLabels`` / ``matchExpressions``): parse and match.

The semantics of Kubernetes' ``metav1.LabelSelectorAsSelector`` as Istio's enablement
selectors use them: every ``matchLabels`` pair must be present with that value; every
requirement must hold (``In``: the key is present with one of the values; ``NotIn``: the
key is absent or its value is none of them; ``Exists`` / ``DoesNotExist``: presence only);
an empty selector matches everything. ``In``/``NotIn`` need values, ``Exists`` /
``DoesNotExist`` take none; keys and values must be valid label keys and values.

Pure and stdlib-only (the CNI plugin parses the selectors of its conflist entry). Invalid
input raises :class:`~cni_plugin.errors.ConfigError` naming where it is and what to fix.
Unknown fields are an error too (Kubernetes' lenient decoder would drop a misspelt
``matchLabel`` and leave a selector that matches every pod).
"""

from __future__ import annotations

from dataclasses import dataclass

from cni_plugin.errors import ConfigError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
_DNS_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-.")


def _is_label_value(text: str) -> bool:
    """Kubernetes' label value rule: at most 63 of ``[A-Za-z0-9-_.]``, alphanumeric at both
    ends; empty is allowed."""
    if text == "":
        return True
    return (
        len(text) <= 63
        and set(text) <= _NAME_CHARS
        and text[0].isascii()
        and text[0].isalnum()
        and text[-1].isascii()
        and text[-1].isalnum()
    )


def _is_label_key(text: str) -> bool:
    """``[prefix/]name``: name as a non-empty label value, prefix a DNS subdomain."""
    prefix, sep, name = text.rpartition("/")
    if sep and not (
        0 < len(prefix) <= 253
        and set(prefix) <= _DNS_CHARS
        and prefix[0].isalnum()
        and prefix[-1].isalnum()
    ):
        return False
    return name != "" and _is_label_value(name)


@dataclass(frozen=True)
class Requirement:
    """One ``matchExpressions`` entry."""

    key: str
    operator: str
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        if self.operator == "In":
            return present and labels[self.key] in self.values
        if self.operator == "NotIn":
            return not present or labels[self.key] not in self.values
        if self.operator == "Exists":
            return present
        return not present  # DoesNotExist

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key, "operator": self.operator}
        if self.values:  # Go: `values,omitempty`
            out["values"] = list(self.values)
        return out


@dataclass(frozen=True)
class LabelSelector:
    """A parsed, validated selector; ``LabelSelector()`` is the empty one (matches all)."""

    match_labels: tuple[tuple[str, str], ...] = ()
    match_expressions: tuple[Requirement, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.match_labels and not self.match_expressions

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels) and all(
            r.matches(labels) for r in self.match_expressions
        )

    def to_json(self) -> dict[str, Any]:
        """As Kubernetes encodes it (both fields ``omitempty``)."""
        out: dict[str, Any] = {}
        if self.match_labels:
            out["matchLabels"] = dict(self.match_labels)
        if self.match_expressions:
            out["matchExpressions"] = [r.to_json() for r in self.match_expressions]
        return out


def _fail(where: str, problem: str) -> ConfigError:
    return ConfigError(f"{where}: {problem}")


def _requirement(raw: Any, where: str) -> Requirement:
    if not isinstance(raw, dict):
        raise _fail(where, "a matchExpressions entry must be a mapping {key, operator, values}")
    unknown = sorted(set(raw) - {"key", "operator", "values"})
    if unknown:
        raise _fail(
            where, f"unknown field(s) {', '.join(map(str, unknown))}: use key, operator, values"
        )
    key, op, values = raw.get("key"), raw.get("operator"), raw.get("values")
    if not isinstance(key, str) or not _is_label_key(key):
        raise _fail(where, f"key {key!r} is not a valid label key")
    if op not in OPERATORS:
        raise _fail(where, f"operator {op!r} is not one of {', '.join(OPERATORS)}")
    if values is None:
        values = []
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise _fail(where, "values must be a list of strings")
    if op in ("In", "NotIn") and not values:
        raise _fail(where, f"operator {op} needs at least one value")
    if op in ("Exists", "DoesNotExist") and values:
        raise _fail(where, f"operator {op} takes no values: remove them")
    bad = [v for v in values if not _is_label_value(v)]
    if bad:
        raise _fail(where, f"{bad[0]!r} is not a valid label value")
    return Requirement(key, op, tuple(values))


def parse(raw: Any, where: str) -> LabelSelector:
    """A selector from its decoded JSON/YAML form; ``None`` is the empty selector."""
    if raw is None:
        return LabelSelector()
    if not isinstance(raw, dict):
        raise _fail(where, "a label selector must be a mapping (matchLabels, matchExpressions)")
    unknown = sorted(set(raw) - {"matchLabels", "matchExpressions"})
    if unknown:
        raise _fail(
            where,
            f"unknown field(s) {', '.join(map(str, unknown))}: use matchLabels, matchExpressions",
        )
    labels = raw.get("matchLabels") or {}
    if not isinstance(labels, dict):
        raise _fail(where, "matchLabels must be a mapping of label to value")
    pairs: list[tuple[str, str]] = []
    for k, v in labels.items():
        if not isinstance(k, str) or not _is_label_key(k):
            raise _fail(where, f"matchLabels key {k!r} is not a valid label key")
        if not isinstance(v, str) or not _is_label_value(v):
            raise _fail(where, f"matchLabels value {v!r} for {k} is not a valid label value")
        pairs.append((k, v))
    exprs = raw.get("matchExpressions") or []
    if not isinstance(exprs, list):
        raise _fail(where, "matchExpressions must be a list")
    reqs = tuple(_requirement(e, f"{where}.matchExpressions[{i}]") for i, e in enumerate(exprs))
    return LabelSelector(tuple(sorted(pairs)), reqs)
