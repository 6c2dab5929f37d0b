"""The stand-in's workload state, with ztunnel's ZDS rules (``src/inpod/statemanager.rs``).

- Add: start the pod's proxy. Same uid and same netns inode: a no-op (the new fd is closed).
  Same uid, new inode (the sandbox was re-created): the old proxy is dropped, a new one
  started. A proxy that cannot start is a transient error: nack, stay connected, keep the
  pod pending and retry it every 5 s (``retry_pending``) until it starts, is deleted, or
  the connection ends.
- Keep: only before SnapshotSent (a protocol error after it).
- Del: only after SnapshotSent (a protocol error before it, as in ztunnel). As ztunnel's
  ``del_workload``: the pod leaves the mesh table and its listeners close before the ack;
  its open connections drain in the background for up to ``drain_seconds`` (ztunnel's
  ``CONNECTION_TERMINATION_DEADLINE``, 5 s by default), then are closed. A replaced proxy
  (new netns) and one missing from a new snapshot drain the same way.
- SnapshotSent: only once per connection; workloads neither added nor kept during this
  connection's snapshot are dropped (they went away while ztunnel was disconnected).

Called from the ZDS client's thread; proxies live on the event loop thread, reached through
``run_coroutine_threadsafe``. Namespaces are entered only on short-lived threads.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
from collections.abc import Coroutine
from concurrent.futures import Future

from cni_plugin.netns import Netns, NetnsId
from node_agent.zds_wire import ZdsProtocolError
from testbed.ztunnel_standin.access_log import AccessLog
from testbed.ztunnel_standin.identity import MeshCa
from testbed.ztunnel_standin.pod_proxy import LISTEN_PORTS, Mesh, PodProxy, Workload
from testbed.ztunnel_standin.sockets import listeners_in

log = logging.getLogger("testbed.ztunnel_standin")

DRAIN_SECONDS = 5.0  # ztunnel's DEFAULT_CONNECTION_TERMINATION_DEADLINE


class ProxyStartError(Exception):
    """A pod's proxy could not start (transient in ztunnel's terms: nack, keep the stream)."""


class WorkloadManager:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        ca: MeshCa,
        access_log: AccessLog,
        dns_upstream: tuple[str, int],
        drain_seconds: float = DRAIN_SECONDS,
    ) -> None:
        self.loop = loop
        self.drain_seconds = drain_seconds
        self.draining: set[PodProxy] = set()
        self.ca = ca
        self.access_log = access_log
        self.dns_upstream = dns_upstream
        self.mesh = Mesh()
        self.proxies: dict[str, PodProxy] = {}
        self.pending: dict[str, tuple[str, str, str, Netns]] = {}  # uid -> failed to start
        self.snapshot_received = False
        self.snapshot_names: set[str] = set()

    def reset_snapshot(self) -> None:
        """A new ZDS connection: a new snapshot follows (pending pods come again with it)."""
        self.snapshot_received = False
        self.snapshot_names.clear()
        for uid in list(self.pending):
            self._forget_pending(uid)

    def add(self, uid: str, name: str, namespace: str, sa: str, netns_fd: int) -> None:
        """Takes ownership of ``netns_fd`` (kept by a proxy or a pending entry, else closed)."""
        if not self.snapshot_received:
            self.snapshot_names.add(uid)
        st = os.fstat(netns_fd)
        netns = Netns(f"zds:{uid}", netns_fd, NetnsId(st.st_dev, st.st_ino))
        existing = self.proxies.get(uid)
        if existing is not None:
            if existing.wl.netns.ident == netns.ident:
                netns.close()
                log.info(
                    "add for a known netns: no-op",
                    extra={"fields": {"uid": uid, "netns_inode": netns.ident.inode}},
                )
                return
            log.info("netns changed: replacing proxy", extra={"fields": {"uid": uid}})
            self._drop(uid)
        self._forget_pending(uid)
        try:
            self._start(uid, name, namespace, sa, netns)
        except ProxyStartError:
            # As ztunnel: keep it and retry every RETRY_INTERVAL while connected.
            self.pending[uid] = (name, namespace, sa, netns)
            raise

    def retry_pending(self) -> None:
        for uid, (name, namespace, sa, netns) in list(self.pending.items()):
            try:
                self._start(uid, name, namespace, sa, netns)
            except ProxyStartError as e:
                log.info("retrying proxy failed", extra={"fields": {"uid": uid, "error": str(e)}})
            else:
                del self.pending[uid]

    def _start(self, uid: str, name: str, namespace: str, sa: str, netns: Netns) -> None:
        """Open the pod's listeners and start its proxy; on failure nothing stays open
        except ``netns`` itself (the caller decides about it)."""
        try:
            socks = listeners_in(netns, LISTEN_PORTS)
        except Exception as e:
            raise ProxyStartError(f"failure to start proxy: listeners: {e}") from None
        try:
            ips = netns.run(_pod_ips)
            tls = self.ca.issue(uid, namespace, sa)
            wl = Workload(uid, name, namespace, sa, netns, ips, tls)
            proxy = PodProxy(wl, self.mesh, self.access_log, self.dns_upstream)
            self._call(self._serve(proxy, socks))
        except Exception as e:
            for s in socks:
                s.close()
            raise ProxyStartError(f"failure to start proxy: {e}") from None
        self.proxies[uid] = proxy
        log.info(
            "proxy started",
            extra={
                "fields": {
                    "uid": uid,
                    "pod": f"{namespace}/{name}",
                    "ips": list(ips),
                    "netns_inode": netns.ident.inode,
                }
            },
        )

    def _forget_pending(self, uid: str) -> None:
        entry = self.pending.pop(uid, None)
        if entry is not None:
            entry[3].close()

    def keep(self, uid: str) -> None:
        if self.snapshot_received:
            raise ZdsProtocolError(f"keep for {uid} after the snapshot was sent")
        self.snapshot_names.add(uid)

    def delete(self, uid: str) -> None:
        if not self.snapshot_received:
            raise ZdsProtocolError(f"del for {uid} before the snapshot was sent")
        self._forget_pending(uid)
        self._drop(uid)

    def snapshot_sent(self) -> None:
        if self.snapshot_received:
            raise ZdsProtocolError("second snapshot_sent on one connection")
        dropped = [u for u in self.proxies if u not in self.snapshot_names]
        for uid in dropped:
            log.info("not in the new snapshot: dropping", extra={"fields": {"uid": uid}})
            self._drop(uid)
        # What this connection's snapshot holds, uid -> netns inode (the chaos tests compare
        # it with the agent's pods); a pending pod's inode is that of the fd it came with.
        held = {
            u: p.wl.netns.ident.inode for u, p in self.proxies.items() if u in self.snapshot_names
        }
        held.update(
            {u: e[3].ident.inode for u, e in self.pending.items() if u in self.snapshot_names}
        )
        log.info("snapshot complete", extra={"fields": {"pods": held}})
        # One line per connection: what a handover between agents is measured by.
        log.info("snapshot received", extra={"fields": {
            "workloads": len(self.snapshot_names), "proxies": len(self.proxies),
            "dropped": len(dropped)}})  # fmt: skip
        self.snapshot_names.clear()
        self.snapshot_received = True

    def close_all(self) -> None:
        """The stand-in stops: every proxy, draining ones included, closes at once."""
        for uid in list(self.pending):
            self._forget_pending(uid)
        for uid in list(self.proxies):
            self._call(self._close(self.proxies.pop(uid)))
        for proxy in list(self.draining):
            self._call(self._close(proxy))

    # --- internals ---------------------------------------------------------------------------

    def _drop(self, uid: str) -> None:
        proxy = self.proxies.pop(uid, None)
        if proxy is None:
            return
        self._call(self._stop(proxy))
        log.info("proxy stopped", extra={"fields": {"uid": uid}})

    async def _serve(self, proxy: PodProxy, socks: list[socket.socket]) -> None:
        await proxy.start(socks)
        self.mesh.put(proxy.wl)

    async def _stop(self, proxy: PodProxy) -> None:
        """Out of the mesh table, listeners closed, now; connections drain in the background."""
        self.mesh.drop(proxy.wl)
        proxy.stop_listening()
        self.draining.add(proxy)
        task = asyncio.ensure_future(self._drain(proxy))
        proxy.background = task  # a reference, so the task is not collected mid-drain

    async def _drain(self, proxy: PodProxy) -> None:
        try:
            await proxy.drain(self.drain_seconds)
        finally:
            if proxy in self.draining:
                self.draining.discard(proxy)
                log.info("proxy drained", extra={"fields": {"uid": proxy.wl.uid}})

    async def _close(self, proxy: PodProxy) -> None:
        self.mesh.drop(proxy.wl)
        self.draining.discard(proxy)
        await proxy.close()

    def _call(self, coro: Coroutine[object, object, None]) -> None:
        fut: Future[None] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        fut.result(timeout=15)


def _pod_ips() -> tuple[str, ...]:
    """Global addresses of the namespace the calling thread is in (via ``ip -j addr``)."""
    out = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True, check=True)
    ips = []
    for link in json.loads(out.stdout or "[]"):
        for a in link.get("addr_info", []):
            if a.get("scope") == "global":
                ips.append(str(a["local"]))
    return tuple(ips)
