from __future__ import annotations

import pytest

from cni_plugin.errors import ConfigError
from cni_plugin.redirection.registry import make_backend


def test_unknown_backend_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="choose one of ebpf, iptables, nftables"):
        make_backend("ipvs")
