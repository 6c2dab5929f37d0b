"""The CNI config file the installer creates itself: Istio-owned or standalone.

Role: write, check and remove the one file of the ``istio-owned`` and ``standalone``
layouts (:mod:`install.conf_layout` says what each holds and why). Invariant: the primary
config is only ever read, never changed, so uninstalling is removing our file. Writes are
atomic, with Istio's mode for files it creates (0600, 0640 with ``CNI_CONF_GROUP_READ``).
"""

from __future__ import annotations

import contextlib
import logging
import os

from install import conf_layout, conflist
from install.atomic_file import atomic_write, read_bytes
from install.config import InstallConfig

log = logging.getLogger("install.installer")


class OwnConfigFile:
    def __init__(self, config: InstallConfig, entry: conflist.PluginEntry) -> None:
        self.config = config
        self.entry = entry

    def path(self, layout: str) -> str:
        cfg = self.config
        if layout == conf_layout.OWNED:
            name = cfg.istio_owned_filename
        else:
            name = cfg.cni_conf_name or conf_layout.STANDALONE_DEFAULT_NAME
        return os.path.join(cfg.mounted_cni_net_dir, name)

    def _files(self) -> dict[str, bytes]:
        directory = self.config.mounted_cni_net_dir
        try:
            names = conflist.candidates(os.listdir(directory))
        except FileNotFoundError:
            return {}
        return {n: read_bytes(os.path.join(directory, n)) or b"" for n in names}

    def _primary(self) -> str | None:
        """``CNI_CONF_NAME`` (or its .conf/.conflist twin), else the first valid config
        that is not our own file."""
        cfg = self.config
        directory = cfg.mounted_cni_net_dir
        if cfg.cni_conf_name:
            path = os.path.join(directory, cfg.cni_conf_name)
            twins = (path, path + "list", path[:-4] if path.endswith(".conflist") else "")
            return next((p for p in twins if p and os.path.exists(p)), None)
        chosen = conf_layout.primary_for_owned(self._files(), cfg.istio_owned_filename)
        return os.path.join(directory, chosen) if chosen else None

    def wanted(self, layout: str) -> bytes | None:
        """What the file must hold now; None while an owned layout has no primary."""
        if layout == conf_layout.STANDALONE:
            return conf_layout.standalone_config(self.entry)
        primary = self._primary()
        data = read_bytes(primary) if primary else None
        if primary is None or data is None:
            return None
        merged, _ = conflist.merge(data, os.path.basename(primary), self.entry)
        return merged

    def _priority_problem(self, layout: str) -> str | None:
        if layout != conf_layout.OWNED:
            return None
        return conf_layout.owned_priority_problem(self._files(), self.config.istio_owned_filename)

    def write(self, layout: str) -> str | None:
        """Write the file when it differs; its path, or None while there is no primary."""
        path = self.path(layout)
        want = self.wanted(layout)
        if want is None:
            log.info("waiting for a primary CNI config in %s", self.config.mounted_cni_net_dir)
            return None
        mode = conf_layout.created_file_mode(self.config.conf_group_read)
        if read_bytes(path) != want or os.stat(path).st_mode & 0o777 != mode:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write(path, want, mode)
            log.info("wrote %s CNI config %s", layout, path)
        problem = self._priority_problem(layout)
        if problem:
            log.warning(problem)
        return path

    def check(self, layout: str) -> str | None:
        """What is wrong with the file, or None when it is what :meth:`write` writes."""
        path = self.path(layout)
        want = self.wanted(layout)
        if want is None or read_bytes(path) != want:
            return f"{layout} CNI config {path} missing or out of date"
        # A file sorting before ours is warned about on write, not repaired: Istio's agent
        # stays ready too; the fix (a file name) is the operator's.
        return None

    def remove(self, layout: str) -> None:
        path = self.path(layout)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            log.info("removed %s CNI config %s", layout, path)
