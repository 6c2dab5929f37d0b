"""Composition of the stand-in: event loop thread, ZDS client thread, CA, access log, and
(with a kubeconfig) the pod directory that says which destinations speak HBONE."""

from __future__ import annotations

import asyncio
import threading

from testbed.ztunnel_standin.access_log import AccessLog
from testbed.ztunnel_standin.directory import PodDirectory
from testbed.ztunnel_standin.identity import MeshCa
from testbed.ztunnel_standin.workloads import DRAIN_SECONDS, WorkloadManager
from testbed.ztunnel_standin.zds_client import ZdsClient


class StandIn:
    """A ztunnel stand-in: ``start()`` returns at once; ``stop()`` drops every pod proxy."""

    def __init__(
        self,
        socket_path: str,
        access_log: str,
        ca_dir: str,
        dns_upstream: tuple[str, int],
        drain_seconds: float = DRAIN_SECONDS,
        kubeconfig: str | None = None,
    ) -> None:
        self.loop = asyncio.new_event_loop()
        self.directory = PodDirectory(kubeconfig) if kubeconfig else None
        self.access_log = AccessLog(access_log)
        self.manager = WorkloadManager(
            self.loop, MeshCa(ca_dir), self.access_log, dns_upstream, drain_seconds
        )
        self.manager.mesh.directory = self.directory
        self.client = ZdsClient(socket_path, self.manager)
        self._loop_thread = threading.Thread(target=self._run_loop, name="dataplane", daemon=True)
        self._client_thread = threading.Thread(target=self.client.run, name="zds", daemon=True)

    def start(self) -> None:
        if self.directory is not None:
            self.directory.start()  # HBONE decisions need istiod's view before traffic
        self._loop_thread.start()
        self._client_thread.start()

    def stop(self) -> None:
        self.client.stop()
        self._client_thread.join()
        self.manager.close_all()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._loop_thread.join()
        self.loop.close()
        self.access_log.close()
        if self.directory is not None:
            self.directory.stop()

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
