"""Putting the plugin executable into the host's CNI bin dir(s), atomically.

The runtime may exec ``istio-cni`` at any moment, so a copy is written beside the target
and renamed over it: an exec sees the old file or the new one, never a partial one (and
never ETXTBSY). Identical content is left alone, so a reinstall makes no inotify noise.
"""

from __future__ import annotations

import hashlib
import os

from cni_plugin.errors import ConfigError
from install.atomic_file import atomic_write, read_bytes


def _digest(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


def install_binary(source: str, target_dir: str) -> bool:
    """Copy ``source`` into ``target_dir`` (mode 0755); True when the file changed."""
    data = read_bytes(source)
    if data is None:
        raise ConfigError(
            f"plugin executable {source} does not exist: build it with `make plugin` or set "
            "CNI_BIN_SOURCE_DIR to the directory holding istio-cni"
        )
    if not os.path.isdir(target_dir):
        raise ConfigError(
            f"CNI bin dir {target_dir} does not exist: mount the host's CNI bin dir there"
        )
    target = os.path.join(target_dir, os.path.basename(source))
    current = read_bytes(target)
    if _digest(current) == _digest(data) and os.stat(target).st_mode & 0o777 == 0o755:
        return False
    atomic_write(target, data, 0o755)
    return True


def matches(source: str, target_dir: str) -> bool:
    target = os.path.join(target_dir, os.path.basename(source))
    current = read_bytes(target)
    return current is not None and _digest(current) == _digest(read_bytes(source))


def remove_binary(name: str, target_dir: str) -> bool:
    try:
        os.unlink(os.path.join(target_dir, name))
        return True
    except FileNotFoundError:
        return False
