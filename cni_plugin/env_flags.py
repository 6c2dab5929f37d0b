"""Boolean settings from the environment, spelled as Istio's charts render them.

One parser for the agent, the installer and ``istio-cni-agent redirect``: unset or empty
means the default; ``1/true/yes/on`` and ``0/false/no/off`` (any case, surrounding blanks
ignored) mean what they say; anything else is a :class:`ConfigError` naming the variable.
Pure: reads only the mapping it is given.
"""

from __future__ import annotations

from collections.abc import Mapping

from cni_plugin.errors import ConfigError

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    low = raw.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean: set it to true or false")
