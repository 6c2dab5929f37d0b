"""Build the node's binaries from the Go module proxy, once per version.

Role: make sure ``kube-apiserver``, ``kubelet``, ``kube-controller-manager``,
``kube-scheduler``, ``kubectl`` (``k8s.io/kubernetes``), ``etcd`` (``go.etcd.io/etcd/server/v3``)
of one release set exist under ``<cache>/kubernetes-<version>/bin`` and say where they are.

How: each program set is a tiny wrapper module written under the cache (``module/go.mod``)
that requires the upstream module; for ``k8s.io/kubernetes`` every staging module its go.mod
replaces with ``./staging/...`` is pinned to its published ``v0.<minor>.<patch>`` instead (the
module zip carries the generated openapi code, so plain ``go build`` works). The machine's own
``go`` and ``GOPROXY`` are used; ``GOTOOLCHAIN=local`` so nothing else is fetched.

Invariants:
- ``GOMODCACHE`` and ``GOCACHE`` live under the cache (``<cache>/go/``), shared by every
  version, so a rebuild or a new patch release is warm.
- A finished set is marked by ``bin/.built`` holding :func:`recipe`, written last; binaries are
  linked into ``bin.partial`` and renamed into place, so the cache never holds a half-built set.
- One build per set at a time (``<cache>/kubernetes-<version>.lock``); a waiter reuses it.
- A cold build prints a progress line at least every ``PROGRESS_EVERY`` seconds.
- Bad input (no ``go``, a version the proxy does not serve, no network) is one
  :class:`BuildError` line naming what is missing and how to get it.

``ISTIO_CNI_TESTBED_KUBERNETES=1.20`` selects the old Debian-source build
(:mod:`testbed.build_debian`) for comparisons; it is not on the default path.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CACHE_DIR = Path(os.environ.get("ISTIO_CNI_TESTBED_CACHE", "/var/cache/istio-cni-testbed"))
COMPONENTS = (
    "kube-apiserver",
    "kubelet",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
)
# Kubernetes 1.36: the newest minor inside the supported range (1.32-1.36) of Istio 1.30, the
# newest Istio release whose support table we could check; see docs/testbed.md.
KUBERNETES_VERSION = "v1.36.3"
ETCD_VERSION = "v3.6.16"  # the etcd minor Kubernetes 1.36 is tested with (its go.mod: 3.6.x)
PROGRESS_EVERY = 30.0
MIN_GO = (1, 26)
RECIPE_REV = "go1"  # bump when the way binaries are built changes: forces a rebuild


class BuildError(RuntimeError):
    """The build could not be done; the message says why and what to do."""


@dataclass(frozen=True)
class KubeBinaries:
    """Where the built binaries are. ``etcd`` is the absolute path of our build, or a bare
    name (found on PATH: Debian's) for the 1.20 set; the CRI runtime is Debian's containerd
    1.6 for both (kubelet 1.36 still accepts it, falling back from the RuntimeConfig call)."""

    version: str
    bin_dir: Path
    etcd: str = "etcd"
    containerd: str = "containerd"
    ctr: str = "ctr"

    def path(self, component: str) -> Path:
        return self.bin_dir / component

    @property
    def minor(self) -> int:
        m = re.match(r"v?1\.(\d+)", self.version.split("really")[-1])
        return int(m.group(1)) if m else 0


@dataclass(frozen=True)
class GoProgram:
    package: str
    output: str


@dataclass(frozen=True)
class GoRecipe:
    """One wrapper module: ``module@version`` and the programs built from it."""

    name: str
    module: str
    version: str
    programs: tuple[GoProgram, ...]
    ldflags: tuple[str, ...] = ()
    pin_staging: bool = False


def _kube_ldflags(version: str) -> tuple[str, ...]:
    """What Kubernetes' own build stamps in (hack/lib/version.sh): without it every binary
    reports v0.0.0 and kubectl/kubelet version checks misbehave."""
    m = re.match(r"v(\d+)\.(\d+)\.", version)
    major, minor = (m.group(1), m.group(2)) if m else ("1", "0")
    out: list[str] = []
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        for key, value in (
            ("gitVersion", version),
            ("gitMajor", major),
            ("gitMinor", minor),
            ("gitCommit", "0" * 40),
            ("gitTreeState", "clean"),
            ("buildDate", "1970-01-01T00:00:00Z"),
        ):
            out.append(f"-X {pkg}.{key}={value}")
    return tuple(out)


def recipes(version: str = KUBERNETES_VERSION) -> tuple[GoRecipe, ...]:
    kube = "k8s.io/kubernetes"
    return (
        GoRecipe(
            "kubernetes",
            kube,
            version,
            tuple(GoProgram(f"cmd/{c}", c) for c in COMPONENTS),
            ldflags=_kube_ldflags(version),
            pin_staging=True,
        ),
        GoRecipe("etcd", "go.etcd.io/etcd/server/v3", ETCD_VERSION, (GoProgram("", "etcd"),)),
    )


def recipe(version: str = KUBERNETES_VERSION) -> str:
    """The stamp's content: changes whenever a version or the way of building does."""
    parts = [RECIPE_REV] + [f"{r.module}@{r.version}" for r in recipes(version)]
    return " ".join(parts)


def _log(msg: str) -> None:
    print(f"testbed build: {msg}", file=sys.stderr, flush=True)


def _progress(what: str, started: float, tail: list[str]) -> Callable[[], None]:
    """Print a line every PROGRESS_EVERY seconds until the returned function is called."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(PROGRESS_EVERY):
            last = tail[-1][:120] if tail else "(no output yet)"
            _log(f"still {what}, {time.monotonic() - started:.0f}s elapsed; last: {last}")

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return stop.set


class GoTool:
    """The machine's ``go`` with the testbed's caches; every call is one process."""

    def __init__(self, cache: Path) -> None:
        go = shutil.which("go")
        if go is None:
            raise BuildError(
                "`go` not found on PATH: the testbed builds Kubernetes with Go >= "
                f"{MIN_GO[0]}.{MIN_GO[1]} (install it, e.g. /usr/local/go/bin on this machine kind)"
            )
        self.go = go
        self.env = dict(os.environ)
        self.env.update(
            GOMODCACHE=str(cache / "go" / "mod"),
            GOCACHE=str(cache / "go" / "build"),
            GOTOOLCHAIN="local",  # never fetch another toolchain behind our back
            GOFLAGS="-mod=mod",
            CGO_ENABLED="0",
        )
        ver = self.run(["env", "GOVERSION"]).strip()
        m = re.match(r"go(\d+)\.(\d+)", ver)
        if not m or (int(m.group(1)), int(m.group(2))) < MIN_GO:
            raise BuildError(
                f"{go} is {ver or 'of unknown version'}: the testbed needs Go >= "
                f"{MIN_GO[0]}.{MIN_GO[1]} (install a newer Go)"
            )

    def run(self, args: list[str], cwd: Path | None = None) -> str:
        proc = subprocess.run(
            [self.go, *args], env=self.env, cwd=cwd, capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise BuildError(f"go {' '.join(args[:3])} failed: {_last_error(proc.stderr)}")
        return proc.stdout

    def download(self, module: str, version: str, cwd: Path) -> Path:
        """Fetch ``module@version`` into the module cache; its directory."""
        proc = subprocess.run(
            [self.go, "mod", "download", "-json", f"{module}@{version}"],
            env=self.env,
            cwd=cwd,
            capture_output=True,
            text=True,
        )
        try:
            info = json.loads(proc.stdout) if proc.stdout.strip() else {}
        except json.JSONDecodeError:
            info = {}
        err = str(info.get("Error") or (proc.stderr if proc.returncode else ""))
        if err or "Dir" not in info:
            raise BuildError(_download_error(module, version, err or proc.stderr))
        return Path(info["Dir"])

    def stream(self, args: list[str], cwd: Path, what: str) -> None:
        """Run ``go args`` printing a progress line every PROGRESS_EVERY seconds."""
        started = time.monotonic()
        tail: list[str] = []
        proc = subprocess.Popen(
            [self.go, *args],
            env=self.env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        stop = _progress(what, started, tail)
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                tail.append(line.rstrip())
                del tail[:-400]
            rc = proc.wait()
        finally:
            stop()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if rc != 0:
            raise BuildError(f"{what} failed: {_last_error(chr(10).join(tail))}")
        _log(f"{what}: done in {time.monotonic() - started:.0f}s")


def _last_error(text: str) -> str:
    """The one informative line of go's stderr (the last non-noise line)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("go: downloading")] or lines
    return lines[-1][:400] if lines else "(no output)"


def _download_error(module: str, version: str, err: str) -> str:
    line = _last_error(err)
    low = err.lower()
    offline = ("no such host", "dial tcp", "connection refused", "timeout", "lookup disabled")
    if any(w in low for w in offline):
        return (
            f"cannot reach the Go module proxy for {module}@{version} ({line}): the testbed "
            "build needs the network and the machine's configured GOPROXY (`go env GOPROXY`)"
        )
    unserved = ("unknown revision", "not found", "invalid version", "not available", "410 gone")
    if any(w in low for w in unserved):
        return (
            f"the Go module proxy does not serve {module}@{version} ({line}): pick a served "
            "version (`go list -m -versions " + module + "`), e.g. ISTIO_CNI_TESTBED_KUBERNETES"
        )
    return f"cannot download {module}@{version}: {line}"


def _wrapper_go_mod(r: GoRecipe, upstream_go_mod: str) -> str:
    """go.mod of the wrapper module: require the upstream module (same ``go``/``godebug``
    lines, so its runtime defaults are the upstream build's), and for Kubernetes pin every
    ``./staging`` replacement to the published staging module of the same release."""
    go_line = re.search(r"^go\s+(\S+)", upstream_go_mod, re.M)
    lines = [f"module icni-testbed/{r.name}", "", f"go {go_line.group(1) if go_line else '1.26'}"]
    lines += re.findall(r"^godebug\s+.*$", upstream_go_mod, re.M)
    lines += ["", f"require {r.module} {r.version}"]
    if r.pin_staging:
        staging = re.findall(r"^\s*(k8s\.io/[\w.-]+)\s+=>\s+\./staging/", upstream_go_mod, re.M)
        pinned = "v0." + r.version.removeprefix("v1.")
        lines += ["", "replace ("] + [f"\t{m} => {m} {pinned}" for m in staging] + [")"]
    return "\n".join(lines) + "\n"


def _build_recipe(go: GoTool, r: GoRecipe, work: Path, out: Path) -> None:
    mod_dir = work / r.name
    mod_dir.mkdir(parents=True, exist_ok=True)
    _log(f"{r.name}: fetching {r.module}@{r.version}")
    src = go.download(r.module, r.version, mod_dir)
    (mod_dir / "go.mod").write_text(_wrapper_go_mod(r, (src / "go.mod").read_text()))
    # Resolve the whole build list first (this is the bulk of the download on a cold cache).
    pkgs = [f"{r.module}/{p.package}".rstrip("/") for p in r.programs]
    go.stream(["list", "-deps", *pkgs], mod_dir, f"{r.name}: resolving and downloading")
    for p, pkg in zip(r.programs, pkgs, strict=True):
        args = ["build", "-v", "-trimpath", "-o", str(out / p.output)]
        args.append("-ldflags=" + " ".join(("-s", "-w", *r.ldflags)))
        go.stream([*args, pkg], mod_dir, f"{r.name}: building {p.output}")


def set_dir(cache: Path, version: str = KUBERNETES_VERSION) -> Path:
    return cache / f"kubernetes-{version}"


def _binaries(cache: Path, version: str) -> KubeBinaries:
    bin_dir = set_dir(cache, version) / "bin"
    return KubeBinaries(version, bin_dir, etcd=str(bin_dir / "etcd"))


def find_binaries(cache: Path = CACHE_DIR, version: str | None = None) -> KubeBinaries | None:
    """The finished build of ``version`` in the cache, if any (no network, no building)."""
    version = version or wanted_version()
    if _is_debian(version):
        from testbed import build_debian

        return build_debian.find_binaries(cache)
    stamp = set_dir(cache, version) / "bin" / ".built"
    try:
        if stamp.read_text().strip() != recipe(version):
            return None
    except OSError:
        return None
    found = _binaries(cache, version)
    names = [*COMPONENTS, "etcd"]
    return found if all((found.bin_dir / n).exists() for n in names) else None


def wanted_version() -> str:
    """The release to run: ``ISTIO_CNI_TESTBED_KUBERNETES`` (``v1.36.3``, ``1.20``), else the
    default."""
    v = os.environ.get("ISTIO_CNI_TESTBED_KUBERNETES", "").strip() or KUBERNETES_VERSION
    return v if v.startswith("v") or _is_debian(v) else "v" + v


def _is_debian(version: str) -> bool:
    return version.removeprefix("v").startswith("1.20")


def ensure_binaries(cache: Path = CACHE_DIR, version: str | None = None) -> KubeBinaries:
    """Return cached binaries, building them first if needed (minutes when cold)."""
    version = version or wanted_version()
    if _is_debian(version):
        from testbed import build_debian

        return build_debian.ensure_binaries(cache)
    if not re.fullmatch(r"v1\.\d+\.\d+", version):
        raise BuildError(
            f"Kubernetes version {version!r} is not of the form v1.MINOR.PATCH "
            f"(default {KUBERNETES_VERSION}; set ISTIO_CNI_TESTBED_KUBERNETES)"
        )
    found = find_binaries(cache, version)
    if found is not None:
        return found
    if os.geteuid() != 0:
        raise BuildError("building the testbed needs root (the shared cache dir); use sudo")
    go = GoTool(cache)
    cache.mkdir(parents=True, exist_ok=True)
    # A version the proxy does not serve (or no network) is said before anything is made.
    go.download("k8s.io/kubernetes", version, cache)
    with open(cache / f"kubernetes-{version}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log("another process is building this set; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        found = find_binaries(cache, version)  # it may have finished while we waited
        if found is not None:
            return found
        return _build(go, cache, version)


def _build(go: GoTool, cache: Path, version: str) -> KubeBinaries:
    started = time.monotonic()
    top = set_dir(cache, version)
    partial = top / "bin.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    _log(
        f"building Kubernetes {version} and etcd {ETCD_VERSION} from the Go module proxy into "
        f"{top} (cold: download + compile, ~20-40 min on 2 busy cores; progress every "
        f"{PROGRESS_EVERY:.0f}s)"
    )
    try:
        for r in recipes(version):
            _build_recipe(go, r, top / "module", partial)
    except BaseException:
        # Nothing half-built stays: a set that never finished leaves no directory at all (the
        # Go caches keep what was downloaded and compiled, so a retry resumes from there).
        shutil.rmtree(partial, ignore_errors=True)
        if not (top / "bin").exists():
            shutil.rmtree(top, ignore_errors=True)
        raise
    (partial / ".built").write_text(recipe(version) + "\n")
    final = top / "bin"
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    _log(f"Kubernetes {version} ready in {final} (total {time.monotonic() - started:.0f}s)")
    return _binaries(cache, version)


if __name__ == "__main__":
    try:
        b = ensure_binaries()
    except BuildError as e:
        _log(f"error: {e}")
        sys.exit(1)
    print(b.bin_dir)
