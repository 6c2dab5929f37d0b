"""OCI image-layout archives (``oci-layout``, ``index.json``, ``blobs/sha256/*``) that
``ctr images import`` accepts: no registry, no container engine.

Role: turn one or more layer tarballs (uncompressed, on disk or in memory) into a gzip
layer each, then write config, manifest and index around them. Layers are streamed through
gzip and sha256 in chunks, so a rootfs of hundreds of MB never sits in memory.

Invariant: the archive appears atomically (written as ``.partial`` and renamed); gzip
headers carry mtime 0, so the same layer tar always gives the same digest.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1 << 20


@dataclass(frozen=True)
class Layer:
    """A gzip-compressed layer blob on disk and the digests the manifest and config need."""

    blob: Path
    digest: str  # sha256:<hex> of the gzip blob
    size: int
    diff_id: str  # sha256:<hex> of the uncompressed tar


def gzip_layer(tar_path: Path, out: Path) -> Layer:
    """Compress ``tar_path`` to ``out`` (level 6), hashing both sides on the way."""
    raw_hash = hashlib.sha256()
    tmp = out.with_suffix(".partial")
    with (
        open(tar_path, "rb") as src,
        open(tmp, "wb") as dst,
        gzip.GzipFile(filename="", fileobj=dst, mode="wb", compresslevel=6, mtime=0) as gz,
    ):
        while chunk := src.read(CHUNK):
            raw_hash.update(chunk)
            gz.write(chunk)
    blob_hash = hashlib.sha256()
    with open(tmp, "rb") as f:
        while chunk := f.read(CHUNK):
            blob_hash.update(chunk)
    tmp.rename(out)
    return Layer(out, "sha256:" + blob_hash.hexdigest(), out.stat().st_size,
                 "sha256:" + raw_hash.hexdigest())  # fmt: skip


def layer_from_bytes(tar_bytes: bytes, out: Path) -> Layer:
    """:func:`gzip_layer` for a tar held in memory (small images)."""
    tmp = out.with_suffix(".tar")
    tmp.write_bytes(tar_bytes)
    try:
        return gzip_layer(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _plain(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = 0, 0, 0, "", "", 0o644
    return info


def write_archive(out: Path, ref: str, layers: list[Layer], config: dict[str, object]) -> None:
    """Write an OCI archive naming ``ref`` (``io.containerd.image.name``) to ``out``."""
    cfg = {
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [la.diff_id for la in layers]},
        "history": [{"created_by": "istio-cni-testbed"} for _ in layers],
    }
    cfg_bytes = json.dumps(cfg, sort_keys=True).encode()
    cfg_digest = "sha256:" + hashlib.sha256(cfg_bytes).hexdigest()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": cfg_digest,
            "size": len(cfg_bytes),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": la.digest,
                "size": la.size,
            }
            for la in layers
        ],
    }
    man_bytes = json.dumps(manifest, sort_keys=True).encode()
    man_digest = "sha256:" + hashlib.sha256(man_bytes).hexdigest()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": man_digest,
                "size": len(man_bytes),
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {
                    "io.containerd.image.name": ref,
                    "org.opencontainers.image.ref.name": ref.rsplit(":", 1)[-1],
                },
            }
        ],
    }
    tmp = out.with_suffix(".partial")
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        _add(tar, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        _add(tar, "index.json", json.dumps(index, sort_keys=True).encode())
        _add(tar, f"blobs/sha256/{cfg_digest[7:]}", cfg_bytes)
        _add(tar, f"blobs/sha256/{man_digest[7:]}", man_bytes)
        seen: set[str] = set()
        for la in layers:
            if la.digest not in seen:
                seen.add(la.digest)
                tar.add(str(la.blob), arcname=f"blobs/sha256/{la.digest[7:]}", filter=_plain)
    tmp.rename(out)
