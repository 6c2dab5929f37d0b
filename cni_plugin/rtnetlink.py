"""A minimal rtnetlink client for the few requests the backends make per pod.

pyroute2 (measured first) costs milliseconds per socket and per dump, more than everything
else a pod's attach does; these hand-packed messages cost tens of microseconds. Only what the
backends need: links, clsact qdiscs, cls_bpf filters, policy rules, table routes, and the
``accept_local`` devconf of an interface. The socket belongs to the namespace of the thread
that creates it, so make it on a thread inside the pod namespace.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

NETLINK_ROUTE = 0
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_DUMP = 0x300
NLM_F_EXCL, NLM_F_CREATE = 0x200, 0x400
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLA_F_NESTED = 0x8000

RTM_NEWLINK, RTM_GETLINK, RTM_SETLINK = 16, 18, 19
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWQDISC, RTM_DELQDISC = 36, 37
RTM_NEWTFILTER, RTM_DELTFILTER, RTM_GETTFILTER = 44, 45, 46
RTM_NEWRULE, RTM_DELRULE, RTM_GETRULE = 32, 33, 34
RTM_GETADDR = 22
IFA_ADDRESS, IFA_LOCAL = 1, 2

IFLA_IFNAME, IFLA_MASTER, IFLA_AF_SPEC = 3, 10, 26
IFLA_INET_CONF = 1
IPV4_DEVCONF_ACCEPT_LOCAL = 23
IPV4_DEVCONF_ROUTE_LOCALNET = 26
TCA_KIND, TCA_OPTIONS = 1, 2
TCA_BPF_FD, TCA_BPF_NAME, TCA_BPF_FLAGS, TCA_BPF_ID = 6, 7, 8, 11
TCA_BPF_FLAG_ACT_DIRECT = 1
TC_H_CLSACT = 0xFFFFFFF1
ETH_P_ALL = 0x0003
FRA_PRIORITY, FRA_FWMARK, FRA_TABLE, FRA_FWMASK = 6, 10, 15, 16
FR_ACT_TO_TBL = 1
RTA_DST, RTA_OIF, RTA_TABLE = 1, 4, 15
RTN_LOCAL = 2
RT_SCOPE_UNIVERSE, RT_SCOPE_HOST = 0, 254
RTPROT_BOOT = 3  # what Istio's agent (vishvananda/netlink) and `ip route add` install


def _attr(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("HH", n, kind) + payload + b"\0" * ((4 - n % 4) % 4)


def _u32(kind: int, v: int) -> bytes:
    return _attr(kind, struct.pack("I", v))


def _str(kind: int, v: str) -> bytes:
    return _attr(kind, v.encode() + b"\0")


def parse_attrs(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    off = 0
    while off + 4 <= len(data):
        n, kind = struct.unpack_from("HH", data, off)
        if n < 4:
            break
        out[kind & ~NLA_F_NESTED] = data[off + 4 : off + n]
        off += (n + 3) & ~3
    return out


def _u32_of(raw: bytes) -> int:
    return int(struct.unpack("I", raw[:4])[0]) if len(raw) >= 4 else 0


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    link_type: int
    inet_conf: bytes = b""  # IFLA_INET_CONF: the IPv4 devconf array (u32 per IPV4_DEVCONF_*)
    master: int = 0  # IFLA_MASTER: the bridge (or bond) this interface is a port of

    def devconf(self, which: int) -> int:
        off = (which - 1) * 4
        if len(self.inet_conf) < off + 4:
            raise OSError(errno.ENODEV, f"{self.name} has no IPv4 configuration")
        return int(struct.unpack_from("I", self.inet_conf, off)[0])


@dataclass(frozen=True)
class Filter:
    """A tc filter: priority, its kind, and for cls_bpf the program's name and id."""

    prio: int
    kind: str
    name: str
    prog_id: int


class Rtnl:
    """One rtnetlink socket. Use as a context manager; every request waits for its ack."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC)
        self.sock.bind((0, 0))
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, mtype: int, flags: int, body: bytes) -> int:
        self.seq += 1
        hdr = struct.pack("IHHII", 16 + len(body), mtype, flags | NLM_F_REQUEST, self.seq, 0)
        self.sock.send(hdr + body)
        return self.seq

    def _messages(self, seq: int) -> Iterator[tuple[int, bytes]]:
        while True:
            data = self.sock.recv(1 << 16)
            off = 0
            while off + 16 <= len(data):
                n, mtype, _flags, mseq, _pid = struct.unpack_from("IHHII", data, off)
                body = data[off + 16 : off + n]
                off += (n + 3) & ~3
                if mseq != seq:
                    continue
                if mtype == NLMSG_DONE:
                    return
                if mtype == NLMSG_ERROR:
                    code = -struct.unpack_from("i", body)[0]
                    if code:
                        raise OSError(code, os.strerror(code))
                    return
                yield mtype, body

    def request(self, mtype: int, flags: int, body: bytes) -> None:
        """Send one change and wait for its ack; ``OSError`` with the kernel's errno."""
        for _ in self._messages(self._send(mtype, flags | NLM_F_ACK, body)):
            pass

    def dump(self, mtype: int, body: bytes) -> list[bytes]:
        return [b for _, b in self._messages(self._send(mtype, NLM_F_DUMP, body))]

    # -- links -----------------------------------------------------------------------------
    def links(self) -> list[Link]:
        out = []
        for body in self.dump(RTM_GETLINK, struct.pack("BxHiII", 0, 0, 0, 0, 0)):
            _fam, ltype, index, _f, _c = struct.unpack_from("BxHiII", body)
            attrs = parse_attrs(body[16:])
            name = attrs.get(IFLA_IFNAME, b"").rstrip(b"\0").decode()
            spec = parse_attrs(attrs.get(IFLA_AF_SPEC, b""))
            conf = parse_attrs(spec.get(socket.AF_INET, b"")).get(IFLA_INET_CONF, b"")
            master = attrs.get(IFLA_MASTER, b"")
            out.append(Link(index, name, ltype, conf, _u32_of(master)))
        return out

    def devconf(self, index: int, which: int) -> int:
        """One IPv4 devconf value of an interface (``IPV4_DEVCONF_*``)."""
        for link in self.links():
            if link.index == index:
                return link.devconf(which)
        raise OSError(errno.ENODEV, f"no interface with index {index}")

    def set_devconf(self, index: int, which: int, value: int) -> None:
        conf = _attr(IFLA_INET_CONF | NLA_F_NESTED, _u32(which, value))
        spec = _attr(IFLA_AF_SPEC | NLA_F_NESTED, _attr(socket.AF_INET | NLA_F_NESTED, conf))
        self.request(RTM_SETLINK, 0, struct.pack("BxHiII", 0, 0, index, 0, 0) + spec)

    # -- tc --------------------------------------------------------------------------------
    @staticmethod
    def _tcmsg(index: int, handle: int, parent: int, info: int) -> bytes:
        return struct.pack("BxxxiIII", 0, index, handle, parent, info)

    def add_clsact(self, index: int) -> bool:
        """True when created, False when a clsact qdisc was already there."""
        body = self._tcmsg(index, 0xFFFF0000, TC_H_CLSACT, 0) + _str(TCA_KIND, "clsact")
        try:
            self.request(RTM_NEWQDISC, NLM_F_CREATE | NLM_F_EXCL, body)
        except FileExistsError:
            return False
        return True

    def del_clsact(self, index: int) -> None:
        body = self._tcmsg(index, 0xFFFF0000, TC_H_CLSACT, 0) + _str(TCA_KIND, "clsact")
        try:
            self.request(RTM_DELQDISC, 0, body)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.EINVAL):
                raise

    def replace_bpf_filter(
        self, index: int, parent: int, prio: int, handle: int, fd: int, name: str
    ) -> None:
        opts = (
            _u32(TCA_BPF_FD, fd) + _str(TCA_BPF_NAME, name) + _u32(TCA_BPF_FLAGS, 1)
        )  # direct-action
        body = (
            self._tcmsg(index, handle, parent, (prio << 16) | socket.htons(ETH_P_ALL))
            + _str(TCA_KIND, "bpf")
            + _attr(TCA_OPTIONS | NLA_F_NESTED, opts)
        )
        self.request(RTM_NEWTFILTER, NLM_F_CREATE, body)

    def del_filter(self, index: int, parent: int, prio: int, handle: int) -> None:
        body = self._tcmsg(index, handle, parent, (prio << 16) | socket.htons(ETH_P_ALL))
        body += _str(TCA_KIND, "bpf")
        try:
            self.request(RTM_DELTFILTER, 0, body)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.EINVAL):
                raise

    def filters(self, index: int, parent: int) -> list[Filter]:
        try:
            bodies = self.dump(RTM_GETTFILTER, self._tcmsg(index, 0, parent, 0))
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.EINVAL):
                return []  # no clsact qdisc on this interface
            raise
        out = []
        for body in bodies:
            _f, _i, handle, _p, info = struct.unpack_from("BxxxiIII", body)
            attrs = parse_attrs(body[20:])
            if TCA_OPTIONS not in attrs or not handle:
                continue  # the per-priority chain header, not a filter
            kind = attrs.get(TCA_KIND, b"").rstrip(b"\0").decode()
            opts = parse_attrs(attrs[TCA_OPTIONS])
            name = opts.get(TCA_BPF_NAME, b"").rstrip(b"\0").decode()
            pid = struct.unpack("I", opts[TCA_BPF_ID])[0] if TCA_BPF_ID in opts else 0
            out.append(Filter(info >> 16, kind, name, pid))
        return out

    # -- policy routing --------------------------------------------------------------------
    def rules(self, family: int) -> list[dict[int, int]]:
        out = []
        for body in self.dump(
            RTM_GETRULE, struct.pack("BBBBBBBBI", family, 0, 0, 0, 0, 0, 0, 0, 0)
        ):
            attrs = parse_attrs(body[12:])
            out.append({k: struct.unpack("I", v[:4])[0] for k, v in attrs.items() if len(v) >= 4})
        return out

    def rule(self, add: bool, family: int, fwmark: int, fwmask: int, table: int, prio: int) -> None:
        tbl = table if table < 256 else 0
        body = struct.pack("BBBBBBBBI", family, 0, 0, 0, tbl, 0, 0, FR_ACT_TO_TBL, 0)
        body += _u32(FRA_PRIORITY, prio) + _u32(FRA_FWMARK, fwmark) + _u32(FRA_FWMASK, fwmask)
        body += _u32(FRA_TABLE, table)
        if add:
            self.request(RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL, body)
        else:
            self.request(RTM_DELRULE, 0, body)

    def local_routes(self, family: int, table: int) -> int:
        """How many default ``local`` routes ``table`` holds for ``family``."""
        n = 0
        body = struct.pack("BBBBBBBBI", family, 0, 0, 0, 0, 0, 0, 0, 0)
        for r in self.dump(RTM_GETROUTE, body):
            _fam, dst_len, _s, _t, tbl, _p, _sc, rtype, _fl = struct.unpack_from("BBBBBBBBI", r)
            attrs = parse_attrs(r[12:])
            rt_table = struct.unpack("I", attrs[RTA_TABLE])[0] if RTA_TABLE in attrs else tbl
            if rt_table == table and rtype == RTN_LOCAL and dst_len == 0:
                n += 1
        return n

    def local_route(self, add: bool, family: int, table: int, lo_index: int) -> None:
        scope = RT_SCOPE_HOST if family == socket.AF_INET else RT_SCOPE_UNIVERSE
        tbl = table if table < 256 else 0
        # Protocol as Istio's agent installs it, and 0 ("any") on delete: a route of either
        # agent is removed by the other (the kernel matches a non-zero protocol exactly).
        proto = RTPROT_BOOT if add else 0
        body = struct.pack("BBBBBBBBI", family, 0, 0, 0, tbl, proto, scope, RTN_LOCAL, 0)
        body += _u32(RTA_TABLE, table)
        if add:
            body += _u32(RTA_OIF, lo_index)
            self.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, body)
        else:
            self.request(RTM_DELROUTE, 0, body)

    def addresses(self, index: int, family: int) -> list[tuple[str, int, int]]:
        """(address, scope, flags) of interface ``index`` in ``family``, in the kernel's
        order (the first IPv4 one is the interface's primary address)."""
        out: list[tuple[str, int, int]] = []
        for body in self.dump(RTM_GETADDR, struct.pack("BBBBi", family, 0, 0, 0, 0)):
            fam, _plen, flags, scope, idx = struct.unpack_from("BBBBi", body)
            if idx != index or fam != family:
                continue
            attrs = parse_attrs(body[8:])
            raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
            if raw:
                out.append((socket.inet_ntop(family, raw), scope, flags))
        return out

    def has_ipv6_address(self, index: int) -> bool:
        body = struct.pack("BBBBi", socket.AF_INET6, 0, 0, 0, 0)
        return any(struct.unpack_from("i", a, 4)[0] == index for a in self.dump(RTM_GETADDR, body))
