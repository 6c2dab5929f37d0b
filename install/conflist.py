"""Choosing the primary CNI config and merging the istio-cni entry into it (pure, no I/O).

Behaviour of Istio 1.24's installer, checked against ``reference/istio-1.24/install``:
- the chosen file is ``CNI_CONF_NAME`` or else the first valid ``.conf``/``.conflist`` in
  sorted order (the kubelet's rule); invalid files are skipped when choosing;
- in a ``.conflist`` any old ``type: istio-cni`` entry is removed and ours appended last;
- a ``.conf`` becomes a ``.conflist`` named ``k8s-pod-network``, ``cniVersion`` ``0.3.1``,
  holding the original (without its ``cniVersion``) and then ours;
- output: sorted keys, 2-space indent, trailing newline (Go's ``json.MarshalIndent``,
  including its escaping of ``<``, ``>``, ``&`` and numbers decoded as float64).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cni_plugin.constants import PLUGIN_TYPE
from cni_plugin.enablement import EnablementSelector, selectors_to_json
from cni_plugin.errors import ConfigError

CONF_EXTENSIONS = (".conf", ".conflist")
CONVERTED_NAME = "k8s-pod-network"
CONVERTED_VERSION = "0.3.1"


class ConflistError(ConfigError):
    """An existing CNI config that cannot take the istio-cni entry (the message says why)."""


@dataclass(frozen=True)
class PluginEntry:
    """The istio-cni entry's settings (SPEC §3 config fields)."""

    plugin_log_level: str
    cni_agent_run_dir: str
    ambient_enabled: bool
    exclude_namespaces: str  # comma-separated, as in EXCLUDE_NAMESPACES; "" -> [""]
    pod_namespace: str
    # None: no ``enablement_selectors`` key (the 1.24 entry; the plugin then uses the
    # default selectors). Newer Istio always writes the key; its chart always sets them.
    enablement_selectors: tuple[EnablementSelector, ...] | None = None
    # None: no ``native_nftables`` key (NATIVE_NFTABLES off: the 1.24 entry); True: written
    # as newer Istio's installer writes it. The plugin accepts it and applies no rules
    # itself (pods' rules are the agent's, which reads NATIVE_NFTABLES).
    native_nftables: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "type": PLUGIN_TYPE,
            "name": PLUGIN_TYPE,
            "plugin_log_level": self.plugin_log_level,
            "cni_agent_run_dir": self.cni_agent_run_dir,
            "ambient_enabled": self.ambient_enabled,
            # Go's strings.Split("", ",") is [""]: Istio renders no exclusions that way.
            "exclude_namespaces": self.exclude_namespaces.split(","),
            "pod_namespace": self.pod_namespace,
            "dns": {},
            "ipam": {},
        }
        if self.enablement_selectors is not None:
            entry["enablement_selectors"] = selectors_to_json(self.enablement_selectors)
        if self.native_nftables is not None:
            entry["native_nftables"] = self.native_nftables
        return entry


def _go_number(text: str) -> int | float:
    # Go decodes JSON numbers into float64 and prints integral values without a fraction.
    value = float(text)
    return int(value) if value.is_integer() and abs(value) < 1e21 else value


def loads(data: bytes, where: str) -> Any:
    try:
        return json.loads(data, parse_float=_go_number)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConflistError(f"{where} is not valid JSON ({e}); fix or remove it") from None


def _as_go(obj: Any) -> Any:
    if isinstance(obj, float):
        return _go_number(repr(obj))
    if isinstance(obj, dict):
        return {k: _as_go(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_as_go(v) for v in obj]
    return obj


def dumps(obj: Any, *, sort_keys: bool = True) -> bytes:
    """Go's ``json.MarshalIndent`` of a map (sorted keys) or, with ``sort_keys=False``, of
    a struct (the dict's own order)."""
    text = json.dumps(_as_go(obj), indent=2, sort_keys=sort_keys, ensure_ascii=False)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, escaped)  # only ever inside strings: JSON syntax has none
    text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return (text + "\n").encode()


def validation_error(filename: str, data: bytes) -> str | None:
    """Why the kubelet would not use this file as a network config, or None if it would."""
    try:
        obj = loads(data, filename)
    except ConflistError as e:
        return str(e)
    if not isinstance(obj, dict):
        return f"{filename} holds a JSON {type(obj).__name__}, not an object"
    if filename.endswith(".conflist"):
        if not isinstance(obj.get("name"), str) or not obj["name"]:
            return f"{filename} has no 'name'"
        plugins = obj.get("plugins")
        if not isinstance(plugins, list) or not plugins:
            return f"{filename} has no 'plugins' list (or it is empty)"
        if not all(isinstance(p, dict) for p in plugins):
            return f"{filename} has a 'plugins' entry that is not an object"
        return None
    if not isinstance(obj.get("type"), str) or not obj["type"]:
        return f"{filename} has no 'type' (is it a .conflist named .conf?)"
    return None


def choose(files: Mapping[str, bytes]) -> str | None:
    """The first valid config by sorted file name (kubelet's rule), or None."""
    for name in sorted(files):
        if name.endswith(CONF_EXTENSIONS) and validation_error(name, files[name]) is None:
            return name
    return None


def candidates(names: Iterable[str]) -> list[str]:
    return sorted(n for n in names if n.endswith(CONF_EXTENSIONS) and not n.startswith("."))


def _plugins(obj: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    plugins = obj.get("plugins")
    if not isinstance(plugins, list):
        raise ConflistError(
            f"{where} has no 'plugins' list: it is neither a network config (no 'type') nor a "
            "network config list; fix it or point CNI_CONF_NAME at the right file"
        )
    if not all(isinstance(p, dict) for p in plugins):
        raise ConflistError(f"{where}: every entry of 'plugins' must be an object")
    return plugins


def is_istio(plugin: Mapping[str, Any]) -> bool:
    return plugin.get("type") == PLUGIN_TYPE


def merge(existing: bytes, filename: str, entry: PluginEntry) -> tuple[bytes, str]:
    """(new file bytes, new file name): ``filename`` with the istio-cni entry last."""
    obj = loads(existing, filename)
    if not isinstance(obj, dict):
        raise ConflistError(
            f"{filename} holds a JSON {type(obj).__name__}, not an object: it is not a CNI "
            "network config; fix it or point CNI_CONF_NAME at the right file"
        )
    ours = entry.to_dict()
    if "type" in obj:
        conf = dict(obj)
        conf.pop("cniVersion", None)
        merged: dict[str, Any] = {
            "cniVersion": CONVERTED_VERSION,
            "name": CONVERTED_NAME,
            "plugins": [conf, ours],
        }
        new_name = filename + "list" if filename.endswith(".conf") else filename
        return dumps(merged), new_name
    plugins = [p for p in _plugins(obj, filename) if not is_istio(p)]
    merged = dict(obj)
    merged["plugins"] = [*plugins, ours]
    return dumps(merged), filename


def has_entry(data: bytes, filename: str) -> bool:
    try:
        obj = loads(data, filename)
    except ConflistError:
        return False
    if not isinstance(obj, dict) or not isinstance(obj.get("plugins"), list):
        return False
    return any(isinstance(p, dict) and is_istio(p) for p in obj["plugins"])


def without_entry(data: bytes, filename: str) -> bytes:
    """The conflist with every istio-cni entry removed (uninstall when we cannot restore)."""
    obj = loads(data, filename)
    if not isinstance(obj, dict):
        raise ConflistError(f"{filename} is not a JSON object")
    kept: Sequence[dict[str, Any]] = [p for p in _plugins(obj, filename) if not is_istio(p)]
    out = dict(obj)
    out["plugins"] = list(kept)
    return dumps(out)
