"""Whether the eBPF backend can run here, and if not, exactly what is missing.

Cheap enough for an agent to call at start and choose its fallback (iptables) when
configured to: bpffs, a cgroup v2 hierarchy, a program image (cache, or bcc plus kernel
headers), and the kernel accepting all three programs.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

from cni_plugin.bpf import image as image_mod
from cni_plugin.bpf import programs, syscall
from cni_plugin.bpf.image import PROGRAMS
from cni_plugin.errors import ConfigError

DEFAULT_PIN_ROOT = "/sys/fs/bpf/istio-cni"
_BPF_FS_MAGIC = 0xCAFE4A11
_CGROUP2_MAGIC = 0x63677270
CGROUP2_CANDIDATES = ("/sys/fs/cgroup/unified", "/sys/fs/cgroup")


@dataclass(frozen=True)
class Availability:
    """Whether the backend can run here, and if not, exactly why and what to install."""

    ok: bool
    reason: str = ""


def probe(
    pin_root: str = DEFAULT_PIN_ROOT, cache_dir: str | None = None, cgroup: str | None = None
) -> Availability:
    """Cheap readiness test: bpffs, a program image (cache or bcc + headers), and the
    kernel's acceptance of both programs (helpers sk_assign, skc_lookup_tcp, redirect)."""
    try:
        require_bpffs(Path(pin_root))
        cgroup2_root(cgroup)
        img = image_mod.load_image(cache_dir)
        fds = {m.name: syscall.map_create(m.map_type, m.key_size, m.value_size, 1, m.name)
               for m in img.maps}  # fmt: skip
        try:
            for name in PROGRAMS:
                try:
                    fd = programs.load_program(img, name, fds)
                except OSError as e:
                    raise ConfigError(
                        f"the kernel refused the {name} program ({e}): the ebpf backend "
                        "needs Linux >= 5.10 with CONFIG_BPF_SYSCALL, CONFIG_NET_CLS_BPF, "
                        "CONFIG_NET_SCH_INGRESS, CONFIG_NET_CLS_ACT and CONFIG_CGROUP_BPF, "
                        "and CAP_BPF/CAP_NET_ADMIN (or root); otherwise use --backend iptables"
                    ) from None
                os.close(fd)
        finally:
            for fd in fds.values():
                os.close(fd)
    except ConfigError as e:
        return Availability(False, str(e))
    except OSError as e:
        return Availability(False, f"bpf(2) failed: {e}: run as root with CAP_BPF/CAP_SYS_ADMIN")
    return Availability(True)


def cgroup2_root(configured: str | None = None) -> str:
    """The cgroup v2 directory ``istio_getsockopt`` is attached to (the hierarchy's root
    unless configured), or a :class:`ConfigError` naming what to mount."""
    for path in [configured] if configured else list(CGROUP2_CANDIDATES):
        if path and _fs_magic(Path(path)) == _CGROUP2_MAGIC:
            return path
    raise ConfigError(
        f"no cgroup v2 hierarchy at {configured or ' or '.join(CGROUP2_CANDIDATES)}: the "
        "ebpf backend answers ztunnel's SO_ORIGINAL_DST from a cgroup getsockopt program; "
        "mount cgroup2 (mount -t cgroup2 none /sys/fs/cgroup/unified) or set its path"
    )


def require_bpffs(pin_root: Path) -> None:
    probe_dir = pin_root
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    if _fs_magic(probe_dir) != _BPF_FS_MAGIC:
        raise ConfigError(
            f"{pin_root} is not on a bpf filesystem: mount it with "
            "'mount -t bpf bpf /sys/fs/bpf' (and mount /sys/fs/bpf into the agent's container)"
        )


def _fs_magic(path: Path) -> int:
    buf = ctypes.create_string_buffer(120)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.statfs(str(path).encode(), buf) != 0:
        return 0
    return int.from_bytes(buf.raw[:8], "little")
