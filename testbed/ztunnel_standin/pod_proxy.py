"""One enrolled pod's proxy: the listeners ztunnel opens inside the pod and the data path.

Inside the pod's network namespace (sockets created there on a short-lived thread, served
here from the event loop thread):

- 15001 outbound: a connection the pod's rules redirected; its original destination comes
  from ``SO_ORIGINAL_DST`` (v4, then v6) or the local address. When that destination speaks
  HBONE (:meth:`Mesh.hbone_peer`: annotated ``enabled``, as istiod tells ztunnel) it travels
  as TLS 1.3 with both workloads' mesh certificates to ``<dst ip>:15008`` and
  ``CONNECT <dst ip:port> HTTP/1.1``; otherwise it is passed through.
- 15006 inbound plaintext: delivered to the original destination (the local app).
- 15008 HBONE: mutual TLS, the client's SPIFFE id read from its certificate, then the
  CONNECT target (which must be one of this pod's addresses) is dialled locally.
- 15053 DNS, UDP and TCP: UDP queries are forwarded to the configured upstream resolver,
  TCP to the original destination (the resolver the pod dialled) or else that upstream.

Every outgoing socket is created inside the pod namespace with ``SO_MARK 1337``. Each
proxied connection writes one access-log line when it ends. :meth:`PodProxy.stop_listening`
then :meth:`PodProxy.drain` is ztunnel's graceful drain of a deleted pod: no new connections,
the open ones may finish on their own until a deadline (ztunnel's connection termination
deadline, 5 s by default), then they are closed. :meth:`PodProxy.close` closes everything
at once (the stand-in stopping).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import NoReturn

from cni_plugin import constants as c
from cni_plugin.netns import Netns
from testbed.ztunnel_standin.access_log import AccessLog, ConnRecord
from testbed.ztunnel_standin.directory import Peer, PodDirectory
from testbed.ztunnel_standin.identity import WorkloadTls, peer_identity
from testbed.ztunnel_standin.sockets import (
    family_of,
    fmt_addr,
    marked_socket_in,
    original_destination,
    unmap,
)

log = logging.getLogger("testbed.ztunnel_standin")

LISTEN_PORTS: list[tuple[int, int]] = [
    (c.ZTUNNEL_OUTBOUND_PORT, socket.SOCK_STREAM),
    (c.ZTUNNEL_INBOUND_PORT, socket.SOCK_STREAM),
    (c.ZTUNNEL_HBONE_PORT, socket.SOCK_STREAM),
    (c.ZTUNNEL_DNS_PORT, socket.SOCK_STREAM),
    (c.ZTUNNEL_DNS_PORT, socket.SOCK_DGRAM),
]
_Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
_PROXY_PORTS = frozenset(port for port, _ in LISTEN_PORTS)
_CHUNK = 65536
_IPV6_RECVPKTINFO = 49  # linux/in6.h
_IPV6_PKTINFO = 50
_HEAD_LIMIT = 8192


@dataclass
class Workload:
    uid: str
    name: str
    namespace: str
    service_account: str
    netns: Netns
    ips: tuple[str, ...]
    tls: WorkloadTls


@dataclass
class Mesh:
    """Workloads with a proxy here, by pod IP, and which destinations speak HBONE: those
    ``directory`` (istiod's view: pods annotated ``enabled``) names, or, without one (no API
    server in namespace-only tests), those with a proxy here."""

    by_ip: dict[str, Workload] = field(default_factory=dict)
    directory: PodDirectory | None = None

    def hbone_peer(self, ip: str) -> Peer | None:
        if self.directory is not None:
            return self.directory.get(ip)
        w = self.by_ip.get(ip)
        return None if w is None else Peer(w.name, w.namespace, w.tls.identity)

    def put(self, w: Workload) -> None:
        for ip in w.ips:
            self.by_ip[ip] = w

    def drop(self, w: Workload) -> None:
        for ip in w.ips:
            if self.by_ip.get(ip) is w:
                del self.by_ip[ip]


class PodProxy:
    def __init__(
        self, wl: Workload, mesh: Mesh, access_log: AccessLog, dns_upstream: tuple[str, int]
    ) -> None:
        self.wl = wl
        self.mesh = mesh
        self.access_log = access_log
        self.dns_upstream = dns_upstream
        self._servers: list[asyncio.Server] = []
        self._udp: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.background: asyncio.Future[None] | None = None  # its drain, once deleted

    async def start(self, socks: list[socket.socket]) -> None:
        """Serve the listeners ``sockets.listeners_in`` made for LISTEN_PORTS, in order."""
        out, inbound, hbone, dns_tcp, dns_udp = socks
        loop = asyncio.get_running_loop()
        try:
            for sock, handler, tls in (
                (out, self._outbound, None),
                (inbound, self._inbound, None),
                (hbone, self._hbone, self.wl.tls.server),
                (dns_tcp, self._dns_tcp, None),
            ):
                self._servers.append(
                    await asyncio.start_server(
                        self._tracked(handler),
                        sock=sock,
                        ssl=tls,
                        ssl_handshake_timeout=10 if tls else None,
                    )
                )
        except BaseException:
            for s in self._servers:  # all or nothing: the caller closes the raw sockets
                s.close()
            self._servers = []
            raise
        # UDP DNS is read with recvmsg to learn each query's local address (IPV6_PKTINFO):
        # the answer must leave from it, or conntrack cannot un-NAT it back to the resolver
        # address the app asked (REDIRECT rewrote that to a local address).
        dns_udp.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVPKTINFO, 1)
        loop.add_reader(dns_udp.fileno(), self._dns_udp_readable)
        self._udp = dns_udp

    def stop_listening(self) -> None:
        """Close the listeners (idempotent): new connections to them are refused."""
        for s in self._servers:
            s.close()
        if self._udp is not None:
            asyncio.get_running_loop().remove_reader(self._udp.fileno())
            self._udp.close()
            self._udp = None

    async def drain(self, deadline: float) -> None:
        """Let open connections end on their own for up to ``deadline`` seconds, then close
        what is left (as ztunnel's ``run_with_drain``)."""
        self.stop_listening()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=deadline)
        await self.close()

    async def close(self) -> None:
        self.stop_listening()
        for w in list(self._writers):
            w.transport.abort()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for s in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(s.wait_closed(), 1)
        self.wl.netns.close()

    # --- plumbing -----------------------------------------------------------------------------

    def _tracked(self, handler: _Handler) -> _Handler:
        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._tasks.add(task)
            self._writers.add(writer)
            try:
                await handler(reader, writer)
            except (
                _Logged,
                asyncio.CancelledError,
                asyncio.IncompleteReadError,  # the peer closed mid-request
                asyncio.LimitOverrunError,  # an oversized CONNECT head
                ConnectionError,
                OSError,
                TimeoutError,
            ):
                pass
            except Exception:
                log.exception("proxy handler failed", extra={"fields": {"uid": self.wl.uid}})
            finally:
                self._tasks.discard(task)
                self._writers.discard(writer)
                await _close(writer)

        return run

    async def _dial(
        self, rec: ConnRecord, host: str, port: int, tls: ssl.SSLContext | None = None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect from inside the pod with SO_MARK 1337. On failure the connection's
        access-log line is written (with the error) and :class:`_Logged` raised."""
        loop = asyncio.get_running_loop()
        try:
            # Made on a short-lived thread inside the pod netns; called inline (socket() and
            # setsockopt only, ~0.1 ms) rather than through the executor, which would add a
            # second thread hop per connection.
            s = marked_socket_in(self.wl.netns, family_of(host))
        except OSError as e:
            self._fail(rec, f"socket: {e}")
        try:
            await asyncio.wait_for(loop.sock_connect(s, (host, port)), 5)
            if tls is None:
                reader, writer = await asyncio.open_connection(sock=s)
            else:
                # Peers are named by SPIFFE id, checked by the caller: no SNI, no hostname.
                reader, writer = await asyncio.open_connection(
                    sock=s, ssl=tls, server_hostname="", ssl_handshake_timeout=5
                )
        except (OSError, TimeoutError) as e:
            s.close()
            self._fail(rec, f"connect {fmt_addr(host, port)}: {e or type(e).__name__}")
        except BaseException:
            s.close()
            raise
        self._writers.add(writer)
        return reader, writer

    async def _splice(
        self,
        rec: ConnRecord,
        a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        b: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        """Copy both ways until both directions end; count bytes; always log the connection."""
        try:
            sent, recv = await asyncio.gather(_pipe(a[0], b[1]), _pipe(b[0], a[1]))
            rec.bytes_sent += sent
            rec.bytes_recv += recv
        finally:
            self._writers.discard(b[1])
            await _close(b[1])
            self.access_log.write(rec)

    def _refuse_self(self, rec: ConnRecord, ip: str, port: int) -> None:
        """A connection whose destination is one of this proxy's own listeners (no NAT and
        no original destination, e.g. dialled directly) would loop through us forever."""
        if port in _PROXY_PORTS and (ip in self.wl.ips or ipaddress.ip_address(ip).is_loopback):
            self._fail(rec, f"no original destination: {fmt_addr(ip, port)} is the proxy itself")

    def _fail(self, rec: ConnRecord, error: str) -> NoReturn:
        rec.error = error
        self.access_log.write(rec)
        raise _Logged(error)

    def _record(self, direction: str, src: str, dst: str) -> ConnRecord:
        return ConnRecord(direction=direction, src_addr=src, dst_addr=dst, start=time.monotonic())

    def _fill_src(self, rec: ConnRecord, wl: Workload | None, identity: str | None) -> None:
        if wl is not None:
            rec.src_workload, rec.src_namespace = wl.name, wl.namespace
        rec.src_identity = identity or (wl.tls.identity if wl is not None else None)

    def _fill_dst(self, rec: ConnRecord, wl: Workload | None) -> None:
        if wl is not None:
            rec.dst_workload, rec.dst_namespace = wl.name, wl.namespace
            rec.dst_identity = wl.tls.identity

    # --- handlers -----------------------------------------------------------------------------

    async def _outbound(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        dst_ip, dst_port = original_destination(sock)
        peer = writer.get_extra_info("peername")
        rec = self._record(
            "outbound", fmt_addr(unmap(peer[0]), peer[1]), fmt_addr(dst_ip, dst_port)
        )
        self._fill_src(rec, self.wl, None)
        self._refuse_self(rec, dst_ip, dst_port)
        target = self.mesh.hbone_peer(dst_ip)
        if target is None:
            upstream = await self._dial(rec, dst_ip, dst_port)
            await self._splice(rec, (reader, writer), upstream)
            return
        rec.dst_workload, rec.dst_namespace = target.name, target.namespace
        rec.dst_identity = target.identity
        rec.dst_addr = fmt_addr(dst_ip, c.ZTUNNEL_HBONE_PORT)
        rec.dst_hbone_addr = fmt_addr(dst_ip, dst_port)
        ur, uw = await self._dial(rec, dst_ip, c.ZTUNNEL_HBONE_PORT, self.wl.tls.client)
        self._writers.discard(uw)
        got = peer_identity(uw.get_extra_info("peercert"))
        if got != target.identity:
            uw.transport.abort()
            self._fail(rec, f"hbone peer is {got}, want {target.identity}")
        try:
            head = await self._connect_request(ur, uw, rec.dst_hbone_addr)
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
            uw.transport.abort()
            self._fail(rec, f"hbone connect: {e or type(e).__name__}")
        status = head.split(b"\r\n", 1)[0].split()
        if len(status) < 2 or status[1] != b"200":
            uw.transport.abort()
            self._fail(rec, f"hbone connect refused: {head[:64].decode(errors='replace')!r}")
        self._writers.add(uw)
        await self._splice(rec, (reader, writer), (ur, uw))

    async def _connect_request(
        self, ur: asyncio.StreamReader, uw: asyncio.StreamWriter, authority: str
    ) -> bytes:
        uw.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        return await asyncio.wait_for(ur.readuntil(b"\r\n\r\n"), 5)

    async def _inbound(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        dst_ip, dst_port = original_destination(writer.get_extra_info("socket"))
        peer = writer.get_extra_info("peername")
        rec = self._record("inbound", fmt_addr(unmap(peer[0]), peer[1]), fmt_addr(dst_ip, dst_port))
        self._fill_src(rec, self.mesh.by_ip.get(unmap(peer[0])), None)
        rec.src_identity = None  # plaintext: no verified identity
        self._fill_dst(rec, self.wl)
        self._refuse_self(rec, dst_ip, dst_port)
        app = await self._dial(rec, dst_ip, dst_port)
        await self._splice(rec, (reader, writer), app)

    async def _hbone(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        identity = peer_identity(writer.get_extra_info("peercert"))
        peer = writer.get_extra_info("peername")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        if len(head) > _HEAD_LIMIT:
            return
        parts = head.split(b"\r\n", 1)[0].decode(errors="replace").split()
        target = parts[1] if len(parts) == 3 and parts[0] == "CONNECT" else ""
        host, _, port_s = target.rpartition(":")
        host = host.strip("[]")
        if not port_s.isdigit() or host not in self.wl.ips or int(port_s) in _PROXY_PORTS:
            writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            await writer.drain()
            return
        src_ip = unmap(peer[0])
        rec = self._record("inbound", fmt_addr(src_ip, peer[1]), target)
        rec.dst_hbone_addr = target
        self._fill_src(rec, self.mesh.by_ip.get(src_ip), identity)
        self._fill_dst(rec, self.wl)
        try:
            app = await self._dial(rec, host, int(port_s))
        except _Logged:
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\n\r\n")
            await writer.drain()
            return
        writer.write(b"HTTP/1.1 200 OK\r\n\r\n")
        await self._splice(rec, (reader, writer), app)

    async def _dns_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        dst_ip, dst_port = original_destination(writer.get_extra_info("socket"))
        if dst_port == c.ZTUNNEL_DNS_PORT:  # not redirected: no original destination
            dst_ip, dst_port = self.dns_upstream
        peer = writer.get_extra_info("peername")
        rec = self._record(
            "outbound", fmt_addr(unmap(peer[0]), peer[1]), fmt_addr(dst_ip, dst_port)
        )
        self._fill_src(rec, self.wl, None)
        upstream = await self._dial(rec, dst_ip, dst_port)
        await self._splice(rec, (reader, writer), upstream)

    def _dns_udp_readable(self) -> None:
        assert self._udp is not None
        try:
            data, anc, _, client = self._udp.recvmsg(65535, socket.CMSG_SPACE(20))
        except (BlockingIOError, InterruptedError):
            return
        pktinfo = b""
        for level, kind, payload in anc:
            if level == socket.IPPROTO_IPV6 and kind == _IPV6_PKTINFO:
                pktinfo = payload
        task = asyncio.ensure_future(self._dns_udp_query(data, client, pktinfo))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _dns_udp_query(self, data: bytes, client: tuple[str, int], pktinfo: bytes) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.dns_upstream
        s = marked_socket_in(self.wl.netns, family_of(host), socket.SOCK_DGRAM)
        try:
            await loop.sock_sendto(s, data, (host, port))
            reply, _ = await asyncio.wait_for(loop.sock_recvfrom(s, 65535), 5)
        except (OSError, TimeoutError):
            return  # the client retries, as with any lost datagram
        finally:
            s.close()
        if self._udp is not None:
            anc = [(socket.IPPROTO_IPV6, _IPV6_PKTINFO, pktinfo)] if pktinfo else []
            with contextlib.suppress(OSError):
                self._udp.sendmsg([reply], anc, 0, client)


class _Logged(Exception):
    """A connection failed and its access-log line (with the error) is already written."""


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> int:
    total = 0
    try:
        while True:
            data = await src.read(_CHUNK)
            if not data:
                break
            dst.write(data)
            total += len(data)
            await dst.drain()
        # Half-close where the transport can (plain TCP). TLS cannot carry a half-close in
        # asyncio, so the HBONE leg closes fully: the peer's reader then sees EOF too.
        if dst.can_write_eof():
            dst.write_eof()
        else:
            dst.close()
    except (ConnectionError, OSError):
        dst.transport.abort()
    return total


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close gracefully (flushing what is buffered), but never wait long for a dead peer."""
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), 2)
    except (Exception, asyncio.CancelledError):
        writer.transport.abort()
