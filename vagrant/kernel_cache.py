"""Debian kernels unpacked for booting under qemu, cached by kernel release.

A cache entry is ``<root>/<release>/`` (for example ``6.1.0-56-amd64``) holding what
``dpkg -x`` gives for the kernel image package and its headers (``boot/vmlinuz-<release>``,
``lib/modules/<release>/`` with ``modules.dep`` from ``depmod``, ``usr/src/linux-headers-*``),
plus ``.complete`` naming the packages it came from. Invariants: an entry without
``.complete`` does not exist (it is built under a temporary name and renamed into place), and
``lib/modules/<release>/{build,source}`` point inside the entry, so bcc inside the guest finds
the headers of the kernel it runs on. Nothing is installed on the host.

A kernel is asked for by series (``6.1``, ``6.12``: the newest Debian build apt offers, or the
newest cached one when apt offers none) or by exact release (``6.12.117+deb12-amd64``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

DEFAULT_ROOT = Path("/var/cache/istio-cni-kernels")
# The series `make vm-test` covers: Debian 12's own kernel and its backported LTS kernel.
DEFAULT_SERIES = ("6.1", "6.12")
STAMP = ".complete"

# linux-image-6.1.0-56-amd64 / linux-image-6.12.117+deb12-amd64 (not -unsigned, -dbg, -rt).
_IMAGE = re.compile(r"^linux-image-(?P<release>\d+\.\d+(?:\.0-\d+|\.\d+\+deb\d+)-amd64)$")


class KernelCacheError(Exception):
    """A kernel could not be resolved or unpacked; the message says what to do."""


@dataclass(frozen=True)
class CachedKernel:
    """One unpacked kernel, ready for ``vng --run``."""

    release: str
    root: Path

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.release}"

    @property
    def packages(self) -> list[str]:
        return (self.root / STAMP).read_text().split()


class PackageSource(Protocol):
    """Where kernel packages come from (Debian's archive through apt, on the real machine)."""

    def image_packages(self) -> list[str]:
        """Names of every installable ``linux-image-*`` package."""
        ...

    def header_packages(self, release: str) -> list[str]:
        """Header packages (with their ``-common`` and kbuild companions) for ``release``."""
        ...

    def download(self, packages: list[str], into: Path) -> list[Path]:
        """Fetch the ``.deb`` files into ``into``; returns their paths."""
        ...


def series_of(release: str) -> str:
    """``6.12.117+deb12-amd64`` -> ``6.12``."""
    return ".".join(release.split(".")[:2])


def _release_key(release: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", release))


def newest_release(series: str, image_packages: list[str]) -> str | None:
    """The newest release of ``series`` among ``linux-image-*`` package names, or None."""
    releases = [
        m["release"]
        for name in image_packages
        if (m := _IMAGE.match(name)) and series_of(m["release"]) == series
    ]
    return max(releases, key=_release_key, default=None)


def is_release(spec: str) -> bool:
    return _IMAGE.match(f"linux-image-{spec}") is not None


class AptSource:
    """Debian's archive through the ordinary apt clients; nothing gets installed."""

    def __init__(self) -> None:
        self._updated = False

    def _run(self, *cmd: str, cwd: Path | None = None) -> str:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
        if proc.returncode != 0:
            raise KernelCacheError(
                f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()[-500:]}"
            )
        return proc.stdout

    def image_packages(self) -> list[str]:
        pattern = r"^linux-image-[0-9.]+(-[0-9]+|\+deb[0-9]+)-amd64$"
        out = self._run("apt-cache", "search", "--names-only", pattern)
        if not out.strip() and not self._updated:
            # A fresh machine may have no package lists yet.
            self._run("apt-get", "update", "-q")
            self._updated = True
            out = self._run("apt-cache", "search", "--names-only", pattern)
        return [line.split(" - ", 1)[0].strip() for line in out.splitlines() if line.strip()]

    def header_packages(self, release: str) -> list[str]:
        top = f"linux-headers-{release}"
        out = self._run("apt-cache", "depends", top)
        deps = re.findall(r"Depends: (linux-(?:headers|kbuild)-\S+)", out)
        return [top, *dict.fromkeys(deps)]

    def download(self, packages: list[str], into: Path) -> list[Path]:
        # apt drops privileges to _apt for downloads; let it write here.
        os.chmod(into, 0o777)
        self._run("apt-get", "download", "-q", *packages, cwd=into)
        debs = sorted(into.glob("*.deb"))
        if len(debs) != len(packages):
            raise KernelCacheError(f"apt-get download gave {len(debs)} files for {packages}")
        return debs


class KernelCache:
    """Resolves kernel specs and keeps their unpacked packages under ``root``."""

    def __init__(self, source: PackageSource, root: Path = DEFAULT_ROOT) -> None:
        self.source = source
        self.root = root

    def cached(self) -> list[CachedKernel]:
        if not self.root.is_dir():
            return []
        return sorted(
            (
                CachedKernel(d.name, d)
                for d in self.root.iterdir()
                if (d / STAMP).is_file() and is_release(d.name)
            ),
            key=lambda k: _release_key(k.release),
        )

    def resolve(self, spec: str) -> str:
        """A release for ``spec`` (a series like ``6.1`` or an exact release)."""
        if is_release(spec):
            return spec
        if not re.fullmatch(r"\d+\.\d+", spec):
            raise KernelCacheError(
                f"unknown kernel {spec!r}: give a series such as 6.1 or 6.12, or a release "
                "such as 6.12.117+deb12-amd64"
            )
        try:
            release = newest_release(spec, self.source.image_packages())
        except KernelCacheError:
            release = None  # apt unusable (offline): fall back to the cache below
        if release is None:
            cached = [k.release for k in self.cached() if series_of(k.release) == spec]
            if not cached:
                raise KernelCacheError(
                    f"no Debian kernel of series {spec} is offered by apt or cached in "
                    f"{self.root}; Debian 12 offers 6.1 and 6.12 (run `apt-get update`)"
                )
            release = cached[-1]
        return release

    def get(self, spec: str) -> CachedKernel:
        """The cached kernel for ``spec``, downloading and unpacking it on first use."""
        release = self.resolve(spec)
        entry = self.root / release
        if (entry / STAMP).is_file():
            return CachedKernel(release, entry)
        self.root.mkdir(parents=True, exist_ok=True)
        packages = [f"linux-image-{release}", *self.source.header_packages(release)]
        with tempfile.TemporaryDirectory(dir=self.root, prefix=".dl-") as tmp:
            tmp_path = Path(tmp)
            debs_dir = tmp_path / "debs"
            stage = tmp_path / "stage"
            debs_dir.mkdir()
            stage.mkdir()
            for deb in self.source.download(packages, debs_dir):
                subprocess.run(["dpkg", "-x", str(deb), str(stage)], check=True)
            _finish_tree(stage, entry, release)
            (stage / STAMP).write_text("\n".join(packages) + "\n")
            if entry.exists():  # a leftover without a stamp: never trusted
                shutil.rmtree(entry)
            stage.rename(entry)
        return CachedKernel(release, entry)


def _finish_tree(stage: Path, final: Path, release: str) -> None:
    """Make an unpacked tree bootable from ``final``: modules.dep, and build/source links
    that resolve inside the entry (Debian points them at /usr/src on the installed host)."""
    if not (stage / "boot" / f"vmlinuz-{release}").is_file():
        raise KernelCacheError(f"linux-image-{release} has no boot/vmlinuz-{release}")
    moddir = stage / "lib" / "modules" / release
    if not moddir.is_dir():
        raise KernelCacheError(f"linux-image-{release} has no lib/modules/{release}")
    subprocess.run(["depmod", "-a", "-b", str(stage), release], check=True)
    headers = {
        "build": final / "usr" / "src" / f"linux-headers-{release}",
        "source": final / "usr" / "src" / f"linux-headers-{release.removesuffix('-amd64')}-common",
    }
    for name, target in headers.items():
        link = moddir / name
        if link.is_symlink() or link.exists():
            link.unlink()
        staged_target = stage / target.relative_to(final)
        if staged_target.is_dir():
            link.symlink_to(target)
