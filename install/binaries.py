"""Putting the plugin executable into the host's CNI bin dir(s), atomically.

The runtime may exec ``istio-cni`` at any moment, so nothing it can see is ever partial:
- a single-file plugin is written beside the target and renamed over it;
- the shipped plugin is a directory (the launcher, its interpreter and libraries,
  ``<source>/istio-cni.d``). It is copied to ``<bin>/.istio-cni.d/<content hash>`` under a
  temporary name and renamed into place, then ``<bin>/istio-cni`` (a relative symlink into it)
  is replaced by a rename; older versions are removed afterwards (a running exec keeps its
  open files).
Identical content is left alone, so a reinstall makes no inotify noise.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile

from cni_plugin.errors import ConfigError
from install.atomic_file import atomic_write, read_bytes

VERSIONS_DIR = ".istio-cni.d"  # inside the bin dir: one subdirectory per plugin version


def _digest(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


def _dir_form(source: str) -> str | None:
    """The directory holding a directory-form plugin ``source``, or None for a file."""
    d = source + ".d"
    return d if os.path.isdir(d) and os.path.isfile(os.path.join(d, os.path.basename(source))) \
        else None  # fmt: skip


def tree_digest(directory: str) -> str:
    h = hashlib.sha256()
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            h.update(os.path.relpath(path, directory).encode() + b"\0")
            h.update(f"{os.stat(path).st_mode & 0o777:o}\0".encode())
            with open(path, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()[:16]


def install_binary(source: str, target_dir: str) -> bool:
    """Install the plugin ``source`` into ``target_dir``; True when anything changed."""
    if not os.path.isdir(target_dir):
        raise ConfigError(
            f"CNI bin dir {target_dir} does not exist: mount the host's CNI bin dir there"
        )
    tree = _dir_form(source)
    if tree is not None:
        return _install_tree(tree, os.path.basename(source), target_dir)
    data = read_bytes(source)
    if data is None:
        raise ConfigError(
            f"plugin executable {source} does not exist: build it with `make plugin` or set "
            "CNI_BIN_SOURCE_DIR to the directory holding istio-cni"
        )
    target = os.path.join(target_dir, os.path.basename(source))
    if not os.path.islink(target):
        current = read_bytes(target)
        if _digest(current) == _digest(data) and os.stat(target).st_mode & 0o777 == 0o755:
            return False
    atomic_write(target, data, 0o755)
    _remove_versions(target_dir, keep=None)
    return True


def _link_target(version: str, name: str) -> str:
    return os.path.join(VERSIONS_DIR, version, name)


def _install_tree(tree: str, name: str, target_dir: str) -> bool:
    version = tree_digest(tree)
    versions = os.path.join(target_dir, VERSIONS_DIR)
    final = os.path.join(versions, version)
    link = os.path.join(target_dir, name)
    intact = os.path.isdir(final) and tree_digest(final) == version
    if intact and os.path.islink(link) and os.readlink(link) == _link_target(version, name):
        return False
    if os.path.isdir(final) and not intact:  # tampered with or half-removed: copy afresh
        shutil.rmtree(final)
    os.makedirs(versions, exist_ok=True)
    if not os.path.isdir(final):
        tmp = tempfile.mkdtemp(prefix=f".{version}.", dir=versions)
        try:
            shutil.copytree(tree, tmp, symlinks=True, dirs_exist_ok=True)
            os.chmod(tmp, 0o755)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    tmp_link = os.path.join(target_dir, f".{name}.{os.getpid()}.link")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp_link)
    os.symlink(_link_target(version, name), tmp_link)
    os.replace(tmp_link, link)  # the runtime sees the old plugin or the new one
    _remove_versions(target_dir, keep=version)
    return True


def _remove_versions(target_dir: str, keep: str | None) -> None:
    versions = os.path.join(target_dir, VERSIONS_DIR)
    if not os.path.isdir(versions):
        return
    for entry in os.listdir(versions):
        if entry != keep:
            shutil.rmtree(os.path.join(versions, entry), ignore_errors=True)
    if keep is None:
        with contextlib.suppress(OSError):
            os.rmdir(versions)


def matches(source: str, target_dir: str) -> bool:
    """Whether ``target_dir`` holds exactly the plugin ``source`` (as its runtime name)."""
    name = os.path.basename(source)
    link = os.path.join(target_dir, name)
    tree = _dir_form(source)
    if tree is not None:
        version = tree_digest(tree)
        final = os.path.join(target_dir, VERSIONS_DIR, version)
        return (
            os.path.islink(link)
            and os.readlink(link) == _link_target(version, name)
            and os.path.isdir(final)
            and tree_digest(final) == version
        )
    current = read_bytes(link)
    return current is not None and _digest(current) == _digest(read_bytes(source))


def remove_binary(name: str, target_dir: str) -> bool:
    """Remove the plugin (file or link) and every installed version directory."""
    removed = False
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(target_dir, name))
        removed = True
    versions = os.path.join(target_dir, VERSIONS_DIR)
    if os.path.isdir(versions):
        shutil.rmtree(versions)
        removed = True
    return removed
