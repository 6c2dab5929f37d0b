"""Build Kubernetes 1.20 from Debian's ``kubernetes`` source package (comparisons only).

Not on the default path (that is :mod:`testbed.build`, from the Go module proxy): selected
with ``ISTIO_CNI_TESTBED_KUBERNETES=1.20``, e.g. to measure the new release against the old one
on the same machine. Needs ``golang-1.19-go``, ``golang-github-modern-go-reflect2-dev``,
``dpkg-dev``, ``rsync``, ``make`` and Debian's ``etcd-server`` (not installed by ``make setup``
any more: ``apt-get install`` them by hand).

Role: make sure ``kube-apiserver``, ``kubelet``, ``kube-controller-manager``,
``kube-scheduler`` and a matching ``kubectl`` exist under ``<cache>/kubernetes-<version>/bin``
and say where they are.

Invariants:
- Nothing is fetched from anywhere but the machine's own Debian sources; ``deb-src`` is enabled
  in a PRIVATE apt configuration derived at run time from ``/etc/apt/sources.list.d/*.sources``
  (or ``/etc/apt/sources.list``), never in the machine's, and no mirror address is written
  anywhere in the repository.
- The cache is keyed by the source package version; a finished build is marked by a stamp file
  written last, so an interrupted build is simply resumed (kube's make keeps Go's build cache
  in ``<source>/_output/local/go/cache``, a stable path, so the work already done is kept).
- A cold build prints a progress line at least every ``PROGRESS_EVERY`` seconds.
- One build at a time per cache (``<cache>/build.lock``); a waiter reuses the result.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from testbed.build import (
    CACHE_DIR,
    COMPONENTS,
    PROGRESS_EVERY,
    BuildError,
    KubeBinaries,
    _log,
    _progress,
)

GO_ROOT = Path("/usr/lib/go-1.19")
REFLECT2_SRC = Path("/usr/share/gocode/src/github.com/modern-go/reflect2")
# The stamp's content changes whenever the recipe does, so a recipe change rebuilds.
RECIPE = "v1:reflect2-1.0.2:cgo0"


def _sources_with_deb_src() -> str:
    """The machine's Debian deb822 sources with ``deb-src`` added to every stanza's Types."""
    texts: list[str] = []
    for f in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        texts.append(f.read_text())
    if not texts:
        raise BuildError(
            "no /etc/apt/sources.list.d/*.sources file: cannot derive a deb-src configuration; "
            "add the machine's Debian sources in deb822 form"
        )
    out: list[str] = []
    for text in texts:
        for line in text.splitlines():
            m = re.match(r"^Types:\s*(.*)$", line)
            if m:
                types = m.group(1).split()
                if "deb-src" not in types:
                    types.append("deb-src")
                line = "Types: " + " ".join(types)
            out.append(line)
        out.append("")
    return "\n".join(out)


class PrivateApt:
    """An apt configuration under ``root`` that only adds source indexes; the machine's own
    apt state (lists, sources) is read, never written."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def prepare(self) -> dict[str, str]:
        (self.root / "sources.list.d").mkdir(parents=True, exist_ok=True)
        (self.root / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        (self.root / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        (self.root / "sources.list.d" / "debian.sources").write_text(_sources_with_deb_src())
        (self.root / "sources.list").write_text("")
        conf = self.root / "apt.conf"
        conf.write_text(
            f'Dir::Etc::SourceList "{self.root}/sources.list";\n'
            f'Dir::Etc::SourceParts "{self.root}/sources.list.d";\n'
            f'Dir::State::Lists "{self.root}/lists";\n'
            f'Dir::Cache::Archives "{self.root}/archives";\n'
            f'Dir::Cache::pkgcache "";\n'
            f'Dir::Cache::srcpkgcache "";\n'
        )
        env = dict(os.environ)
        env["APT_CONFIG"] = str(conf)
        return env

    def source_version(self, env: dict[str, str], package: str) -> str:
        out = _run(["apt-cache", "showsrc", package], env=env).stdout
        versions = re.findall(r"^Version:\s*(\S+)", out, re.M)
        if not versions:
            raise BuildError(f"apt-cache showsrc {package} found no source package")
        sort = _run(["sh", "-c", "printf '%s\\n' \"$@\" | sort -V | tail -n1", "sh", *versions])
        return sort.stdout.strip()


def _run(
    argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(
            f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}"
        )
    return proc


def _fetch_source(cache: Path) -> tuple[str, Path]:
    """Download and unpack the kubernetes source package; returns (version, source tree)."""
    apt = PrivateApt(cache / "apt")
    env = apt.prepare()
    _log("updating a private apt index with deb-src enabled")
    _run(["apt-get", "update", "-q"], env=env)
    version = apt.source_version(env, "kubernetes")
    upstream = version.split(":")[-1].rsplit("-", 1)[0]
    tree = cache / f"kubernetes-{version}" / "src"
    if (tree / "Makefile").exists():
        return version, tree
    dl = cache / f"kubernetes-{version}" / "download"
    dl.mkdir(parents=True, exist_ok=True)
    _log(f"downloading source package kubernetes {version} (~35 MB)")
    stop = _progress("downloading", time.monotonic(), [])
    try:
        _run(
            ["apt-get", "source", "--download-only", "-q", f"kubernetes={version}"], env=env, cwd=dl
        )
    finally:
        stop()
    dscs = sorted(dl.glob("kubernetes_*.dsc"))
    if not dscs:
        raise BuildError(f"apt-get source left no .dsc in {dl}")
    tmp = tree.with_name("src.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    _log(f"unpacking {dscs[-1].name} (upstream {upstream})")
    _run(["dpkg-source", "--no-check", "-x", str(dscs[-1]), str(tmp)])
    tmp.rename(tree)
    # dpkg-source leaves a copy of the orig tarball beside the tree; the one in dl/ suffices.
    for stray in tree.parent.glob("kubernetes_*.orig.tar.*"):
        stray.unlink()
    return version, tree


def _patch_reflect2(tree: Path) -> None:
    """The vendored reflect2 1.0.1 crashes under Go >= 1.18 on the first JSON encode: use
    Debian's 1.0.2 source instead."""
    if not (REFLECT2_SRC / "reflect2.go").exists():
        raise BuildError(
            f"{REFLECT2_SRC} missing: install golang-github-modern-go-reflect2-dev (make setup)"
        )
    dest = tree / "vendor" / "github.com" / "modern-go" / "reflect2"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(REFLECT2_SRC, dest, symlinks=False)


def _make(tree: Path, cache: Path, version: str) -> None:
    upstream = version.split(":")[-1].rsplit("-", 1)[0]
    # Debian's "1.20.5+really1.20.2" is upstream 1.20.2: report what the code really is.
    upstream = upstream.rsplit("really", 1)[-1]
    env = dict(os.environ)
    env.pop("GOFLAGS", None)  # GOFLAGS defeats Go's build cache here
    env.update(
        PATH=f"{GO_ROOT}/bin:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
        GOROOT=str(GO_ROOT),
        GOPROXY="off",
        CGO_ENABLED="0",
        KUBE_GIT_VERSION=f"v{upstream}",
        KUBE_GIT_TREE_STATE="clean",
        KUBE_GIT_COMMIT="0" * 40,
    )
    what = " ".join(f"cmd/{c}" for c in COMPONENTS)
    argv = ["make", f"WHAT={what}"]
    _log(f"building {what} (cold: ~6 min on 2 idle cores; progress every {PROGRESS_EVERY:.0f}s)")
    started = time.monotonic()
    tail: list[str] = []
    proc = subprocess.Popen(
        argv, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    stop = _progress("building", started, tail)
    assert proc.stdout is not None
    for line in proc.stdout:
        tail.append(line.rstrip())
        del tail[:-200]
    rc = proc.wait()
    stop()
    if rc != 0:
        raise BuildError(f"make {what} failed ({rc}):\n" + "\n".join(tail[-40:]))
    _log(f"built in {time.monotonic() - started:.0f}s")


def find_binaries(cache: Path = CACHE_DIR) -> KubeBinaries | None:
    """The newest finished build in the cache, if any (no network, no building)."""
    best: KubeBinaries | None = None
    for stamp in sorted(cache.glob("kubernetes-*/bin/.built")):
        if stamp.read_text().strip() != RECIPE:
            continue
        bin_dir = stamp.parent
        if all((bin_dir / c).exists() for c in COMPONENTS):
            best = KubeBinaries(bin_dir.parent.name.removeprefix("kubernetes-"), bin_dir)
    return best


def ensure_binaries(cache: Path = CACHE_DIR) -> KubeBinaries:
    """Return cached binaries, building them first if needed (minutes when cold)."""
    found = find_binaries(cache)
    if found is not None:
        return found
    if os.geteuid() != 0:
        raise BuildError("building the testbed needs root (apt and the cache dir); use sudo")
    if not (GO_ROOT / "bin" / "go").exists():
        raise BuildError(f"{GO_ROOT}/bin/go missing: install golang-1.19-go (make setup)")
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "build.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log("another process is building the testbed; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        found = find_binaries(cache)  # it may have finished while we waited
        if found is not None:
            return found
        return _build(cache)


def _build(cache: Path) -> KubeBinaries:
    started = time.monotonic()
    version, tree = _fetch_source(cache)
    _patch_reflect2(tree)
    _make(tree, cache, version)
    out = tree / "_output" / "local" / "bin" / "linux" / "amd64"
    bin_dir = cache / f"kubernetes-{version}" / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for c in COMPONENTS:
        if not (out / c).exists():
            raise BuildError(f"make finished but {out / c} is missing")
        shutil.copy2(out / c, bin_dir / c)
    (bin_dir / ".built").write_text(RECIPE + "\n")
    _log(f"kubernetes {version} ready in {bin_dir} (total {time.monotonic() - started:.0f}s)")
    return KubeBinaries(version, bin_dir)
