"""Locally built OCI images for the testbed: no registry is involved.

Role: produce OCI image-layout tarballs (``oci-layout``, ``index.json``, ``blobs/sha256/*``)
that ``ctr images import`` accepts, for
- ``pause``: a static C ``pause`` (``testbed/pause.c``), the CRI sandbox image;
- ``busybox``: Debian's ``busybox-static`` with every applet linked in ``/bin``; its default
  command idles until SIGTERM, so ``kubectl exec`` / ``node_exec`` can run ``wget``, ``nc``...;
- ``httpd``: the same root filesystem, serving ``busybox httpd -f -p $PORT`` (``PORT`` env,
  default 8080) from ``/www`` whose ``index.html`` holds the pod's hostname.

Invariant: tarballs are deterministic (mtime 0, sorted entries), cached under
``<cache>/images`` keyed by the hash of their inputs, rebuilt only when inputs change.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from testbed import oci

REGISTRY = "icni-tb.local"
BUSYBOX = Path("/bin/busybox")
PAUSE_SRC = Path(__file__).with_name("pause.c")
IMAGE_FORMAT = "v1"

HTTPD_SCRIPT = (
    'mkdir -p /www && echo "$HOSTNAME" > /www/index.html && '
    'busybox httpd -f -p "${PORT:-8080}" -h /www & '
    'trap "kill $! 2>/dev/null; exit 0" TERM INT; wait'
)
IDLE_SCRIPT = 'trap "exit 0" TERM INT; while :; do sleep 1 & wait $!; done'


class ImageError(RuntimeError):
    """An image could not be built; the message says which input is missing."""


@dataclass(frozen=True)
class Image:
    name: str
    ref: str
    tarball: Path


# path -> (mode, content) for files, or (0, "->target") for symlinks.
Entry = tuple[int, bytes | str]


def _layer_tar(entries: dict[str, Entry]) -> bytes:
    """An uncompressed layer tar of ``entries`` (parents as 0755 directories)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs: set[str] = set()
        for path in sorted(entries):
            parts = path.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d and d not in dirs:
                    dirs.add(d)
                    info = tarfile.TarInfo(d)
                    info.type = tarfile.DIRTYPE
                    info.mode = 0o755
                    tar.addfile(info)
            mode, content = entries[path]
            info = tarfile.TarInfo(path)
            if isinstance(content, str):
                info.type = tarfile.SYMTYPE
                info.linkname = content
                info.mode = 0o777
                tar.addfile(info)
            else:
                info.size = len(content)
                info.mode = mode
                tar.addfile(info, io.BytesIO(content))
    return raw.getvalue()


def write_oci_tar(
    out: Path, ref: str, entries: dict[str, Entry], config: dict[str, object]
) -> None:
    """Write a one-layer OCI image archive for ``ref`` to ``out`` (atomically)."""
    blob = out.with_name(out.name + ".layer.gz")
    try:
        layer = oci.layer_from_bytes(_layer_tar(entries), blob)
        oci.write_archive(out, ref, [layer], config)
    finally:
        blob.unlink(missing_ok=True)


def _compile_pause(work: Path) -> bytes:
    if shutil.which("gcc") is None:
        raise ImageError("gcc missing: install gcc and libc6-dev (make setup)")
    out = work / "pause"
    proc = subprocess.run(
        ["gcc", "-static", "-Os", "-s", "-o", str(out), str(PAUSE_SRC)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise ImageError(f"compiling pause failed (needs libc6-dev): {proc.stderr.strip()}")
    data = out.read_bytes()
    out.unlink()
    return data


def _busybox_rootfs() -> dict[str, Entry]:
    if not BUSYBOX.exists():
        raise ImageError(f"{BUSYBOX} missing: install busybox-static (make setup)")
    data = BUSYBOX.read_bytes()
    applets = subprocess.run(
        [str(BUSYBOX), "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    entries: dict[str, Entry] = {"bin/busybox": (0o755, data)}
    for a in applets:
        if a != "busybox":
            entries[f"bin/{a}"] = (0, "busybox")
    entries["etc/passwd"] = (0o644, b"root:x:0:0:root:/root:/bin/sh\n")
    entries["etc/group"] = (0o644, b"root:x:0:\n")
    entries["tmp/.keep"] = (0o644, b"")
    return entries


def build_images(cache: Path) -> dict[str, Image]:
    """Build (or reuse from cache) every testbed image; returns name -> Image."""
    cache.mkdir(parents=True, exist_ok=True)
    if not BUSYBOX.exists():
        raise ImageError(f"{BUSYBOX} missing: install busybox-static (make setup)")
    # The tag is a hash of every input, so a changed input is a new image, never a stale one.
    inputs = PAUSE_SRC.read_bytes() + BUSYBOX.read_bytes()
    key = hashlib.sha256(inputs + (HTTPD_SCRIPT + IDLE_SCRIPT + IMAGE_FORMAT).encode()).hexdigest()[
        :12
    ]
    tag = key
    refs = {
        "pause": f"{REGISTRY}/pause:{tag}",
        "busybox": f"{REGISTRY}/busybox:{tag}",
        "httpd": f"{REGISTRY}/httpd:{tag}",
    }
    images = {n: Image(n, r, cache / f"{n}-{tag}.tar") for n, r in refs.items()}
    if all(i.tarball.exists() for i in images.values()):
        return images
    pause_entries: dict[str, Entry] = {"pause": (0o755, _compile_pause(cache))}
    write_oci_tar(images["pause"].tarball, refs["pause"], pause_entries, {"Entrypoint": ["/pause"]})
    rootfs = _busybox_rootfs()
    env = ["PATH=/bin", "PORT=8080"]
    write_oci_tar(
        images["busybox"].tarball,
        refs["busybox"],
        rootfs,
        {"Entrypoint": ["/bin/sh", "-c", IDLE_SCRIPT], "Env": env[:1], "WorkingDir": "/"},
    )
    write_oci_tar(
        images["httpd"].tarball,
        refs["httpd"],
        rootfs,
        {
            "Entrypoint": ["/bin/sh", "-c", HTTPD_SCRIPT],
            "Env": env,
            "WorkingDir": "/",
            "ExposedPorts": {"8080/tcp": {}},
        },
    )
    return images
