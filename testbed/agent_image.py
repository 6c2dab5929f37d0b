"""The istio-cni-node image, built here from Debian packages and the project's own wheel:
``make image`` = ``python -m testbed.agent_image``; no registry, no container engine.

Role: two layers, each cached under ``<cache>/agent-image`` by the hash of its inputs:
- **base**: ``mmdebstrap`` of the packages in ``install/image/packages.txt`` (the same list
  ``install/Containerfile`` installs) from the machine's own configured apt sources (the
  files are handed to mmdebstrap as they are: no mirror is named anywhere), minus the
  ``-name`` entries of that list; kept unpacked too, as the lower dir of the next step;
- **app**: on an overlay over that rootfs (in a private mount namespace), the rootfs's own
  ``python3.11 -m venv --system-site-packages /opt/istio-cni`` and ``pip install`` of the
  project's wheel and its dependencies from a wheelhouse the machine's pip filled (PyPI);
  the plugin executable from ``make plugin`` at ``/opt/cni/bin/istio-cni`` (the installer's
  source dir) and ``install/image/entrypoint.sh``. The overlay's upper dir is the layer.

The archive (``oci.write_archive``) is ``ctr images import``-able; its tag is the app key,
so a changed input is a new tag, never a stale image. A lock serialises builders.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed import oci
from testbed.build import CACHE_DIR

ROOT = Path(__file__).resolve().parent.parent
IMAGE_DIR = ROOT / "install" / "image"
PACKAGES = IMAGE_DIR / "packages.txt"
ENTRYPOINT = IMAGE_DIR / "entrypoint.sh"
PLUGIN_DIR = ROOT / "build" / "istio-cni.d"
SUITE = "bookworm"
REPO = "icni-tb.local/istio-cni-py"
Log = Callable[[str], None]
# What goes into the wheel: the Containerfile copies the same paths.
WHEEL_INPUTS = ("pyproject.toml", "README.md", "cni_plugin", "node_agent", "install",
                "testbed/__init__.py")  # fmt: skip
ENTRYPOINT_IN_IMAGE = "/usr/local/bin/istio-cni-entrypoint"
PATH_IN_IMAGE = "/opt/istio-cni/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
FORMAT = "agent-image-v1"
APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))


class AgentImageError(RuntimeError):
    """The image cannot be built; the message names the missing input and the fix."""


@dataclass(frozen=True)
class AgentImage:
    ref: str
    tarball: Path
    tag: str


def packages(path: Path = PACKAGES) -> tuple[list[str], list[str]]:
    """(packages to install, packages removed afterwards) from the image's package list."""
    install: list[str] = []
    remove: list[str] = []
    for line in path.read_text().splitlines():
        name = line.split("#", 1)[0].strip()
        if name.startswith("-"):
            remove.append(name[1:])
        elif name:
            install.append(name)
    return install, remove


def apt_source_files() -> list[Path]:
    """The machine's enabled apt source files (``.list`` / ``.sources``), in apt's order."""
    files: list[Path] = []
    main, parts = APT_SOURCES
    if main.is_file() and any(
        ln.strip() and not ln.lstrip().startswith("#") for ln in main.read_text().splitlines()
    ):
        files.append(main)
    if parts.is_dir():
        files += sorted(p for p in parts.iterdir() if p.suffix in (".list", ".sources"))
    if not files:
        raise AgentImageError(
            "no apt sources configured on this machine (/etc/apt/sources.list[.d]): the "
            "image is built from Debian packages through them; configure apt first"
        )
    return files


def _hash_tree(h: Any, path: Path) -> None:
    if path.is_file():
        h.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
        return
    for p in sorted(path.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            h.update(p.relative_to(ROOT).as_posix().encode() + b"\0" + p.read_bytes())


def base_key() -> str:
    h = hashlib.sha256(FORMAT.encode())
    h.update(PACKAGES.read_bytes())
    for f in apt_source_files():
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def app_key(base: str) -> str:
    if not (PLUGIN_DIR / "istio-cni").exists():
        raise AgentImageError(f"{PLUGIN_DIR}/istio-cni missing: run `make plugin` first")
    h = hashlib.sha256(base.encode())
    for name in (*WHEEL_INPUTS, "install/image/entrypoint.sh", "testbed/agent_image.py"):
        _hash_tree(h, ROOT / name)
    for p in sorted(PLUGIN_DIR.rglob("*")):
        if p.is_file() and not p.is_symlink():
            h.update(p.relative_to(PLUGIN_DIR).as_posix().encode() + p.read_bytes())
    return h.hexdigest()[:12]


def _run(argv: Sequence[str], what: str, **kw: object) -> None:
    proc = subprocess.run(list(argv), capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise AgentImageError(f"{what} failed ({proc.returncode}):\n{tail}")


def _tar_dir(src: Path, out: Path, exclude: Sequence[str] = ()) -> None:
    """GNU tar of ``src`` (numeric owners, sorted: the same tree gives the same bytes)."""
    _run(["tar", "-C", str(src), "--sort=name", "--numeric-owner", "--mtime=@0",
          *(f"--exclude={e}" for e in exclude), "-cf", str(out), "."],
         f"tar of {src}")  # fmt: skip


def _layer_meta(path: Path) -> oci.Layer | None:
    try:
        d = json.loads(path.read_text())
        layer = oci.Layer(Path(d["blob"]), d["digest"], int(d["size"]), d["diff_id"])
    except (OSError, ValueError, KeyError):
        return None
    return layer if layer.blob.exists() else None


def _save_meta(path: Path, layer: oci.Layer) -> None:
    path.write_text(json.dumps({"blob": str(layer.blob), "digest": layer.digest,
                                "size": layer.size, "diff_id": layer.diff_id}))  # fmt: skip


def build_base(cache: Path, key: str, log: Log) -> tuple[oci.Layer, Path]:
    """The Debian layer and its unpacked rootfs (cached by ``key``)."""
    meta, rootfs = cache / f"base-{key}.json", cache / f"base-{key}.rootfs"
    layer = _layer_meta(meta)
    if layer is not None and rootfs.is_dir():
        return layer, rootfs
    if shutil.which("mmdebstrap") is None:
        raise AgentImageError("mmdebstrap missing: install it (make setup)")
    install, remove = packages()
    shutil.rmtree(rootfs, ignore_errors=True)
    log(f"base layer: mmdebstrap {SUITE} with {len(install)} packages (minutes, cold)")
    hooks = []
    if remove:
        hooks.append("--customize-hook=chroot \"$1\" dpkg --purge --force-depends "
                     + " ".join(remove))  # fmt: skip
    _run(
        ["mmdebstrap", "--mode=root", "--variant=essential", "--include=" + ",".join(install),
         "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
         "--dpkgopt=path-exclude=/usr/share/locale/*", "--dpkgopt=path-exclude=/usr/share/info/*",
         *hooks, SUITE, str(rootfs), *(str(f) for f in apt_source_files())],
        "mmdebstrap (the image's Debian packages)",
    )  # fmt: skip
    raw = cache / f"base-{key}.tar"
    _tar_dir(rootfs, raw, exclude=["./dev/*"])
    try:
        layer = oci.gzip_layer(raw, cache / f"base-{key}.layer.gz")
    finally:
        raw.unlink(missing_ok=True)
    _save_meta(meta, layer)
    return layer, rootfs


def _stage_sources(dst: Path) -> None:
    for name in WHEEL_INPUTS:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)


def build_app(cache: Path, key: str, rootfs: Path, log: Log) -> oci.Layer:
    """The layer with the venv (project wheel + deps), the plugin and the entry point."""
    meta = cache / f"app-{key}.json"
    layer = _layer_meta(meta)
    if layer is not None:
        return layer
    log("app layer: the project's wheel and its dependencies into a venv on the image's Python")
    with tempfile.TemporaryDirectory(dir=cache, prefix="app-work-") as tmp:
        work = Path(tmp)
        src, wheels, upper, wd, merged = (work / n for n in ("src", "wheels", "upper", "wd", "m"))
        for d in (src, wheels, upper, wd, merged):
            d.mkdir()
        _stage_sources(src)
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
        _run([*pip, "wheel", "-q", "--wheel-dir", str(wheels), str(src)],
             "pip wheel (the project and its dependencies)")  # fmt: skip
        venv = "/opt/istio-cni"
        script = (
            "set -e; "
            f"mount -t overlay overlay -o lowerdir={rootfs},upperdir={upper},workdir={wd} "
            f"{merged}; "
            f"mount -t proc proc {merged}/proc; mount --rbind /dev {merged}/dev; "
            f"mkdir -p {merged}/tmp/wheels; mount --bind {wheels} {merged}/tmp/wheels; "
            f"chroot {merged} python3.11 -m venv --system-site-packages {venv}; "
            f"chroot {merged} {venv}/bin/pip install -q --no-index --no-cache-dir "
            f"--disable-pip-version-check --find-links /tmp/wheels istio-cni-py"
        )
        _run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
             "installing the wheel into the image's venv")  # fmt: skip
        shutil.rmtree(upper / "tmp", ignore_errors=True)
        bin_dir = upper / "opt" / "cni" / "bin"
        bin_dir.mkdir(parents=True)
        shutil.copytree(PLUGIN_DIR, bin_dir / "istio-cni.d", symlinks=True)
        (bin_dir / "istio-cni").symlink_to("istio-cni.d/istio-cni")
        entry = upper / ENTRYPOINT_IN_IMAGE.lstrip("/")
        entry.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ENTRYPOINT, entry)
        entry.chmod(0o755)
        raw = work / "app.tar"
        _tar_dir(upper, raw)
        layer = oci.gzip_layer(raw, cache / f"app-{key}.layer.gz")
    _save_meta(meta, layer)
    return layer


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "build.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("agent image: waiting for another build to finish", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _stderr(msg: str) -> None:
    print(f"agent image: {msg}", file=sys.stderr, flush=True)


def build(cache: Path = CACHE_DIR / "agent-image", log: Log = _stderr) -> AgentImage:
    """Build (or reuse) the image archive; returns its ref and tarball."""
    if os.geteuid() != 0:
        raise AgentImageError("building the image needs root (mmdebstrap, overlay, chroot)")
    with _locked(cache):
        # The plugin from this checkout's sources (a no-op when build/ is up to date), so
        # the image never ships a plugin older than its agent.
        _run(["bash", str(ROOT / "scripts" / "build-plugin.sh")], "make plugin")
        bkey = base_key()
        tag = app_key(bkey)
        image = AgentImage(f"{REPO}:{tag}", cache / f"istio-cni-py-{tag}.tar", tag)
        if image.tarball.exists():
            return image
        base, rootfs = build_base(cache, bkey, log)
        app = build_app(cache, tag, rootfs, log)
        config: dict[str, object] = {
            "Entrypoint": [ENTRYPOINT_IN_IMAGE],
            "Cmd": ["run"],
            "Env": [f"PATH={PATH_IN_IMAGE}"],
            "WorkingDir": "/",
        }
        oci.write_archive(image.tarball, image.ref, [base, app], config)
        _prune(cache, keep={bkey, tag})
        return image


def _prune(cache: Path, keep: set[str], keep_images: int = 3) -> None:
    """Drop other base keys and all but the newest ``keep_images`` app builds (each archive
    is hundreds of MB; other worktrees share this cache, so recent ones stay)."""
    apps = sorted((p for p in cache.glob("istio-cni-py-*.tar")), key=lambda p: p.stat().st_mtime)
    keep |= {p.stem.rsplit("-", 1)[-1] for p in apps[-keep_images:]}
    for p in cache.iterdir():
        stem = p.name.split(".", 1)[0]
        if p.name == "build.lock" or stem.startswith("app-work"):
            continue
        if stem.rsplit("-", 1)[-1] in keep:
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make image", description=__doc__.split("\n")[0])
    p.add_argument("--cache", default=str(CACHE_DIR / "agent-image"))
    args = p.parse_args(argv)
    started = time.monotonic()
    try:
        image = build(Path(args.cache))
    except AgentImageError as e:
        print(f"make image: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"ref": image.ref, "tarball": str(image.tarball),
                      "size_mb": round(image.tarball.stat().st_size / 1e6, 1),
                      "seconds": round(time.monotonic() - started, 1)}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
