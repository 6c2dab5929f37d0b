"""Backend names to implementations, imported lazily (bcc is heavy; iptc needs libxtables)."""

from __future__ import annotations

import importlib
from typing import Any

from cni_plugin.errors import ConfigError
from cni_plugin.redirection.backend import RedirectionBackend

# name -> "module:factory". Each factory takes keyword options and returns a backend.
BACKENDS: dict[str, str] = {
    "iptables": "cni_plugin.redirection.iptables_backend:IptablesBackend",
    "nftables": "cni_plugin.redirection.nftables_backend:NftablesBackend",
    "ebpf": "cni_plugin.bpf.backend:EbpfBackend",
}


def make_backend(name: str, **options: Any) -> RedirectionBackend:
    """Build the backend called ``name``; a clear :class:`ConfigError` for unknown names."""
    target = BACKENDS.get(name)
    if target is None:
        raise ConfigError(
            f"unknown redirection backend {name!r}: choose one of {', '.join(sorted(BACKENDS))}"
        )
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"redirection backend {name!r} is not available here: {e}") from None
    factory = getattr(module, attr)
    backend: RedirectionBackend = factory(**options)
    return backend
