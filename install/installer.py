"""The installer: puts the plugin, its kubeconfig and its conflist entry on the host, and
keeps them there (SPEC §7).

Cycle (one thread, as Istio's ``Installer.Run``):
1. install: copy the executable(s) atomically, write ``<run_dir>/istio-cni-kubeconfig``
   (0600) from the service account, merge the entry into the chosen CNI config (0644);
2. create an inotify watch on the bin dir(s), the conf dir and the token's directory;
3. check the work is intact -> ready; wait for a change -> not ready -> back to 1.
Repairs are throttled as Istio's are (:mod:`install.repair_throttle`: one free every
``min_repair_interval_s``, 5 s; a sooner one waits at most 1 s).
A missing primary CNI config is waited for (conf-dir events), not an error. A failed attempt
(for instance a config caught half-written by its owner) is retried on the next change or
after ``min_repair_interval_s``, whichever is first: the change that completes it may have
landed before the watch was in place.

Teardown, decided by the caller: ``stop(uninstall=True)`` when the DaemonSet is gone
removes the entry (restoring the original file byte for byte when nobody else changed it
since), the kubeconfig and the binary; ``stop(uninstall=False)`` (an upgrade) leaves all
of it, so new pods fail closed until the next agent is ready.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from cni_plugin.constants import KUBECONFIG_NAME
from cni_plugin.errors import ConfigError, IstioCniError
from install import binaries, conf_layout, conflist, kubeconfig
from install.atomic_file import atomic_write, read_bytes
from install.config import InstallConfig
from install.own_config_file import OwnConfigFile
from install.repair_throttle import MAX_REPAIR_WAIT_S, RepairThrottle
from install.watcher import ChangeWatcher, InotifyWatcher, Waker

WAITING_FOR_PRIMARY = "waiting for a primary CNI config"
log = logging.getLogger("install")

ORIGINAL_RECORD = "istio-cni-original-conf.json"

RESULT_SUCCESS = "SUCCESS"
RESULT_COPY_BINARIES_FAILURE = "COPY_BINARIES_FAILURE"
RESULT_CREATE_KUBECONFIG_FAILURE = "CREATE_KUBECONFIG_FAILURE"
RESULT_CREATE_CNI_CONFIG_FAILURE = "CREATE_CNI_CONFIG_FAILURE"

# Merges in a row that found the primary config rewritten under them before giving up
# (until the next change or the repair interval).
MERGE_ATTEMPTS = 3

WatcherFactory = Callable[[list[str], Waker], ChangeWatcher]


class Installer:
    def __init__(
        self,
        config: InstallConfig | None = None,
        *,
        watcher_factory: WatcherFactory = InotifyWatcher,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # No config: the DaemonSet's environment (Istio's variable names).
        config = config if config is not None else InstallConfig.from_env(os.environ)
        self.config = config
        self._watcher_factory = watcher_factory
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._waker = Waker()
        self._thread: threading.Thread | None = None
        self.throttle = RepairThrottle(config.min_repair_interval_s, clock, self._stopping.wait)
        self.conf_path: str | None = None
        self.last_error: str | None = None
        # istio_cni_installs_total by Istio's result label values (cni/pkg/install).
        self.installs_total: dict[str, int] = {}
        self._stage = RESULT_COPY_BINARIES_FAILURE
        self.entry = conflist.PluginEntry(
            plugin_log_level=config.plugin_log_level,
            cni_agent_run_dir=config.run_dir,
            ambient_enabled=config.ambient_enabled,
            exclude_namespaces=config.exclude_namespaces,
            pod_namespace=config.pod_namespace,
            enablement_selectors=config.enablement_selectors,
            native_nftables=config.native_nftables,
        )
        self.own_file = OwnConfigFile(config, self.entry)

    # --- public surface ------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def kubeconfig_path(self) -> str:
        return os.path.join(self.config.run_dir, KUBECONFIG_NAME)

    def start(self) -> None:
        """Install, then keep the installation intact on a background thread."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self.run, name="cni-installer", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    def stop(self, *, uninstall: bool | None = None) -> None:
        """Stop watching; ``uninstall`` removes what was installed (DaemonSet deleted).
        None asks the API server (:func:`install.teardown.is_upgrade`), as Istio does."""
        if uninstall is None:
            from install.teardown import is_upgrade

            uninstall = not is_upgrade(self.config.pod_namespace)
        self._stopping.set()
        self._waker.wake()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self._ready.clear()
        if uninstall:
            self.cleanup()
        else:
            log.info("stopping for an upgrade: plugin, kubeconfig and conflist entry kept")
        self._waker.close()

    # --- the cycle -----------------------------------------------------------------------
    def run(self) -> None:
        while not self._stopping.is_set():
            self.throttle.before_repair(self.conf_path or self.config.mounted_cni_net_dir)
            if self._stopping.is_set():
                break
            installed = self._install_counted()
            watcher = self._watcher_factory(self._watch_paths(), self._waker)
            try:
                if installed:
                    problem = self.check()
                    if problem is None:
                        self._ready.set()
                        log.info("istio-cni installed", extra={"fields": {"conf": self.conf_path}})
                        watcher.wait(None)
                        if not self._stopping.is_set():
                            log.info("cni config or plugin changed; checking and repairing")
                    else:
                        log.warning("installation not intact: %s", problem)
                elif self.last_error != WAITING_FOR_PRIMARY:
                    # Failed: retried on a change, or after the interval (what fixes it may
                    # have been written before this watch existed).
                    watcher.wait(max(self.config.min_repair_interval_s, MAX_REPAIR_WAIT_S))
                elif self._choose_conf() is None:
                    # Waiting for a primary CNI config. The config is looked for again once
                    # the watch is in place: one written in between raises no event.
                    watcher.wait(None)
            finally:
                self._ready.clear()
                watcher.close()

    def _watch_paths(self) -> list[str]:
        paths = [self.config.mounted_cni_net_dir, os.path.dirname(self.config.sa_token_file)]
        for target in self.config.cni_bin_target_dirs:
            # The bin dir, and the installed version directory of a directory-form plugin.
            versions = os.path.join(target, binaries.VERSIONS_DIR)
            paths += [target, versions]
            if os.path.isdir(versions):
                paths += [os.path.join(versions, v) for v in sorted(os.listdir(versions))]
        return paths

    def _install_counted(self) -> bool:
        try:
            ok = self.install_once()
        except IstioCniError as e:
            self.last_error = str(e)
            self._count(self._stage)
            log.error("istio-cni install failed: %s", e)
            return False
        except OSError as e:
            self.last_error = f"{e.filename or ''}: {e.strerror or e}"
            self._count(self._stage)
            log.error("istio-cni install failed: %s", self.last_error)
            return False
        self.last_error = None if ok else WAITING_FOR_PRIMARY
        if ok:
            self._count(RESULT_SUCCESS)
        return ok

    def _count(self, result: str) -> None:
        self.installs_total[result] = self.installs_total.get(result, 0) + 1

    # --- one installation ----------------------------------------------------------------
    def install_once(self) -> bool:
        """Binaries, kubeconfig, conflist. False when there is no primary config yet.
        ``_stage`` names the step under way: a failure is counted under it."""
        self._stage = RESULT_COPY_BINARIES_FAILURE
        for name in self.config.plugin_binaries:
            src = os.path.join(self.config.cni_bin_source_dir, name)
            for target in self.config.cni_bin_target_dirs:
                if binaries.install_binary(src, target):
                    log.info("copied %s to %s", name, target)
        self._stage = RESULT_CREATE_KUBECONFIG_FAILURE
        self.write_kubeconfig()
        self._stage = RESULT_CREATE_CNI_CONFIG_FAILURE
        return self.write_conflist()

    def _credentials(self) -> tuple[str, bytes | None, str]:
        """(token, CA PEM or None for skip-verify, server URL) for the plugin's kubeconfig."""
        cfg = self.config
        token_bytes = read_bytes(cfg.sa_token_file)
        if token_bytes is None and cfg.fallback_kubeconfig:
            return self._credentials_from_kubeconfig(cfg.fallback_kubeconfig)
        if token_bytes is None:
            raise ConfigError(
                f"service account token {cfg.sa_token_file} does not exist: run inside a pod "
                "with a service account (or set SA_TOKEN_FILE, or KUBECONFIG outside a pod)"
            )
        ca = None
        if not cfg.skip_tls_verify:
            ca = read_bytes(cfg.kube_ca_file)
            if ca is None:
                raise ConfigError(
                    f"CA file {cfg.kube_ca_file} does not exist: set KUBE_CA_FILE or "
                    "SKIP_TLS_VERIFY=true"
                )
        server = kubeconfig.server_url(cfg.k8s_service_host, cfg.k8s_service_port)
        return token_bytes.decode().strip(), ca, server

    def _credentials_from_kubeconfig(self, path: str) -> tuple[str, bytes | None, str]:
        import yaml

        cfg = self.config
        try:
            with open(path) as f:
                doc = yaml.safe_load(f)
            cluster = doc["clusters"][0]["cluster"]
            token = str(doc["users"][0]["user"]["token"])
        except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError) as e:
            raise ConfigError(
                f"no service account token, and KUBECONFIG {path} has no usable cluster and "
                f"token user ({e}); run inside a pod or point KUBECONFIG at a token kubeconfig"
            ) from None
        ca: bytes | None = None
        if cluster.get("certificate-authority-data"):
            ca = base64.b64decode(cluster["certificate-authority-data"])
        elif cluster.get("certificate-authority"):
            ca = read_bytes(str(cluster["certificate-authority"]))
        if cfg.k8s_service_host and cfg.k8s_service_port:
            server = kubeconfig.server_url(cfg.k8s_service_host, cfg.k8s_service_port)
        else:
            server = str(cluster["server"])
        return token.strip(), ca, server

    def write_kubeconfig(self) -> None:
        cfg = self.config
        token, ca, server = self._credentials()
        text = kubeconfig.render(server, token, ca).encode()
        os.makedirs(cfg.run_dir, exist_ok=True)
        current = read_bytes(self.kubeconfig_path)
        if current != text or os.stat(self.kubeconfig_path).st_mode & 0o777 != 0o600:
            atomic_write(self.kubeconfig_path, text, 0o600)
            log.info("wrote kubeconfig %s", self.kubeconfig_path)

    def _choose_conf(self) -> str | None:
        directory = self.config.mounted_cni_net_dir
        name = self.config.cni_conf_name
        if name:
            path = os.path.join(directory, name)
            if os.path.exists(path):
                return path
            # a .conf we converted earlier lives on as .conflist (and the reverse)
            for alt in (path + "list", path[:-4] if path.endswith(".conflist") else None):
                if alt and os.path.exists(alt):
                    return alt
            return None
        try:
            names = conflist.candidates(os.listdir(directory))
        except FileNotFoundError:
            return None
        files = {n: read_bytes(os.path.join(directory, n)) or b"" for n in names}
        chosen = conflist.choose(files)
        return os.path.join(directory, chosen) if chosen else None

    @property
    def layout(self) -> str:
        cfg = self.config
        return conf_layout.layout(
            chained=cfg.chained,
            istio_owned=cfg.istio_owned_config,
            ambient_enabled=cfg.ambient_enabled,
        )

    def write_conflist(self) -> bool:
        if self.layout != conf_layout.CHAINED:
            written = self.own_file.write(self.layout)
            self.conf_path = written or self.conf_path
            return written is not None
        path = self._choose_conf()
        if path is None:
            log.info("waiting for a primary CNI config in %s", self.config.mounted_cni_net_dir)
            return False
        for _ in range(MERGE_ATTEMPTS):
            data = read_bytes(path)
            if data is None:
                return False
            filename = os.path.basename(path)
            merged, new_name = conflist.merge(data, filename, self.entry)
            new_path = os.path.join(os.path.dirname(path), new_name)
            self._remember_original(path, data, new_path, merged)
            if new_path != path or merged != data:
                # The primary keeps its own mode (Istio preserves it; a new file gets 0644).
                mode = os.stat(path).st_mode & 0o777
                if not atomic_write(new_path, merged, mode, unless_changed=(path, data)):
                    log.info("%s changed while istio-cni merged into it; merging again", path)
                    continue
                if new_path != path:
                    os.unlink(path)
                log.info("inserted istio-cni into %s", new_path)
            self.conf_path = new_path
            return True
        raise ConfigError(
            f"{path} changed {MERGE_ATTEMPTS} times while istio-cni merged its entry into it: "
            "another component keeps rewriting it; retrying"
        )

    # --- remembering the original for a byte-exact uninstall -------------------------------
    @property
    def _record_path(self) -> str:
        return os.path.join(self.config.run_dir, ORIGINAL_RECORD)

    def _load_record(self) -> dict[str, Any] | None:
        raw = read_bytes(self._record_path)
        if raw is None:
            return None
        try:
            rec = json.loads(raw)
        except ValueError:
            return None
        return rec if isinstance(rec, dict) else None

    def _remember_original(self, path: str, data: bytes, new_path: str, merged: bytes) -> None:
        rec = self._load_record()
        if conflist.has_entry(data, os.path.basename(path)):
            # Already ours (restart or upgrade): keep what we knew of the original.
            if rec is None or rec.get("installed") != new_path:
                return
        else:
            rec = {
                "original": path,
                "bytes": base64.b64encode(data).decode(),
                "installed": new_path,
            }
        rec["written"] = base64.b64encode(merged).decode()
        atomic_write(self._record_path, json.dumps(rec).encode(), 0o600)

    # --- checking and cleaning up --------------------------------------------------------
    def check(self) -> str | None:
        """What is wrong with the installation, or None when it is intact."""
        for name in self.config.plugin_binaries:
            src = os.path.join(self.config.cni_bin_source_dir, name)
            for target in self.config.cni_bin_target_dirs:
                if not binaries.matches(src, target):
                    return f"{name} missing or changed in {target}"
        if self.conf_path is None:
            return "no CNI config chosen yet"
        if self.layout != conf_layout.CHAINED:
            problem = self.own_file.check(self.layout)
            if problem:
                return problem
            if read_bytes(self.kubeconfig_path) is None:
                return f"kubeconfig {self.kubeconfig_path} missing"
            return None
        chosen = self._choose_conf()
        if chosen != self.conf_path:
            return f"CNI config {self.conf_path} preempted by {chosen}"
        data = read_bytes(self.conf_path)
        if data is None or not conflist.has_entry(data, os.path.basename(self.conf_path)):
            return f"istio-cni entry missing from {self.conf_path}"
        if read_bytes(self.kubeconfig_path) is None:
            return f"kubeconfig {self.kubeconfig_path} missing"
        return None

    def cleanup(self) -> None:
        """Remove the entry (or restore the original file), the kubeconfig, the binaries."""
        rec = self._load_record()
        path = self.conf_path or (rec or {}).get("installed")
        if self.layout != conf_layout.CHAINED:
            # Our own file: removing it is the whole uninstall (the primary was never touched).
            path = None
            self.own_file.remove(self.layout)
        if path:
            data = read_bytes(path)
            restorable = (
                rec is not None
                and rec.get("installed") == path
                and data is not None
                and base64.b64encode(data).decode() == rec.get("written")
            )
            if restorable and rec is not None:
                original = str(rec["original"])
                mode = os.stat(path).st_mode & 0o777
                atomic_write(original, base64.b64decode(rec["bytes"]), mode)
                if original != path:
                    os.unlink(path)
                log.info("restored original CNI config %s", original)
            elif data is not None and conflist.has_entry(data, os.path.basename(path)):
                stripped = conflist.without_entry(data, os.path.basename(path))
                atomic_write(path, stripped, os.stat(path).st_mode & 0o777)
                log.info("removed istio-cni from %s", path)
        for p in (self.kubeconfig_path, self._record_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        for name in self.config.plugin_binaries:
            for target in self.config.cni_bin_target_dirs:
                if binaries.remove_binary(name, target):
                    log.info("removed %s from %s", name, target)
