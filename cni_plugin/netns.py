"""Entering network namespaces safely.

The rule: never ``setns`` a long-lived thread. :func:`run_in_netns` starts a short-lived
thread, moves *that* thread into the target namespace, runs the work there and lets the
thread exit; the caller's thread never changes namespace. Subprocesses and netlink or
xtables sockets created inside the work inherit the namespace of the thread that made them.

Opening never creates and never blocks: the path is first opened ``O_PATH`` (which runs no
driver's open, so a FIFO or a device cannot hang or be triggered) and must be on nsfs (its
``fstatfs`` magic); only then is that very inode opened read-only (through its
``/proc/self/fd`` link, so a rename in between cannot swap it) and must be a *network*
namespace (the kernel's ``NS_GET_NSTYPE`` says so). The host's own namespace (by default the one
this process started in, configurable because the agent may run in a node namespace and
``/proc/1/ns/net`` may be unreadable) is refused, so a mistake can never rewrite host rules.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from cni_plugin.errors import NetnsError

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3)
_libc = ctypes.CDLL(None, use_errno=True)

# The namespace this process started in: the reference for "host" unless configured.
_SELF_NETNS = "/proc/self/ns/net"


@dataclass(frozen=True)
class NetnsId:
    """Identity of a network namespace: (device, inode) of its nsfs file."""

    dev: int
    inode: int


class Netns:
    """An open handle on an existing network namespace. Close it (or use ``with``)."""

    def __init__(self, path: str, fd: int, ident: NetnsId) -> None:
        self.path = path
        self.fd = fd
        self.ident = ident

    @property
    def inode(self) -> int:
        return self.ident.inode

    @classmethod
    def open(cls, path: str, *, host_netns: str | None = _SELF_NETNS) -> Netns:
        """Open ``path`` as a network namespace without ever creating one.

        Raises :class:`NetnsError` with a message naming the problem when the path does not
        exist, is not a network namespace, or is the host namespace (``host_netns``; pass
        ``None`` to allow it, which only host-side code may do).
        """
        fd = _open_nsfs(path)
        try:
            ident = _identify(fd, path)
            if host_netns is not None and ident == netns_id(host_netns):
                raise NetnsError(
                    f"{path} is the host's own network namespace: redirection is only ever "
                    "installed inside a pod's namespace; pass the pod's netns path"
                )
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, ident)

    def dup(self) -> Netns:
        """A second handle on the *same* namespace, owned by the caller (close it).

        Safe against a concurrent :meth:`close` of this handle: the duplicate's identity is
        checked against the one recorded at open, so an fd number that was closed and
        reused for another namespace (or anything else) is never taken for this one."""
        fd = self.fd
        try:
            if fd < 0:
                raise OSError("handle closed")
            new = os.dup(fd)  # non-inheritable, as every fd of ours
        except OSError:
            raise NetnsError(
                f"network namespace handle for {self.path} was closed (the pod was removed)"
            ) from None
        try:
            st = os.fstat(new)
        except OSError:
            os.close(new)
            raise
        if NetnsId(st.st_dev, st.st_ino) != self.ident:
            os.close(new)
            raise NetnsError(
                f"network namespace handle for {self.path} was closed and its number reused "
                "(the pod was removed)"
            )
        return Netns(self.path, new, self.ident)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, work: Callable[[], T]) -> T:
        """Run ``work`` in this namespace on a short-lived thread; return or raise its result."""
        return _run_on_thread(self.fd, self.path, work)


NSFS_MAGIC = 0x6E736673
_STATFS_SIZE = 256  # larger than struct statfs on every Linux ABI; f_type comes first


def _fs_magic(fd: int) -> int:
    buf = ctypes.create_string_buffer(_STATFS_SIZE)
    if _libc.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def _open_nsfs(path: str) -> int:
    """Open ``path`` read-only if it is an nsfs file, without ever blocking on it."""
    try:
        pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsError(
            f"network namespace {path} does not exist: check the path (the pod may "
            "have been deleted, or the runtime keeps namespaces elsewhere)"
        ) from None
    except OSError as e:
        raise NetnsError(f"cannot open network namespace {path}: {e.strerror}") from None
    try:
        try:
            on_nsfs = _fs_magic(pfd) == NSFS_MAGIC
            kind = os.fstat(pfd).st_mode
        except OSError as e:
            raise NetnsError(f"cannot inspect {path}: {e.strerror}") from None
        if not on_nsfs:
            what = "a directory" if stat.S_ISDIR(kind) else "not a network namespace"
            if stat.S_ISFIFO(kind) or stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
                what = "a FIFO or device, not a network namespace"
            raise NetnsError(
                f"{path} is {what}: pass a network namespace such as "
                "/var/run/netns/cni-<id> or /proc/<pid>/ns/net"
            )
        try:
            return os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise NetnsError(f"cannot open network namespace {path}: {e.strerror}") from None
    finally:
        os.close(pfd)


def _identify(fd: int, path: str) -> NetnsId:
    st = os.fstat(fd)
    try:
        # NS_GET_NSTYPE answers only for nsfs files, whether opened through /proc or a
        # bind mount such as /var/run/netns/<name>; anything else fails with ENOTTY.
        kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        kind = 0
    if kind != CLONE_NEWNET:
        what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a network namespace"
        if kind:
            what = "a namespace of another kind (not network)"
        raise NetnsError(
            f"{path} is {what}: pass a network namespace such as "
            "/var/run/netns/cni-<id> or /proc/<pid>/ns/net"
        )
    return NetnsId(st.st_dev, st.st_ino)


def netns_id(path: str) -> NetnsId:
    """Identity of the namespace at ``path`` (no validation beyond ``stat``)."""
    st = os.stat(path)
    return NetnsId(st.st_dev, st.st_ino)


def run_in_netns(path: str, work: Callable[[], T], *, host_netns: str | None = _SELF_NETNS) -> T:
    """Open ``path`` (validated, never created), run ``work`` inside it, close the handle."""
    with Netns.open(path, host_netns=host_netns) as ns:
        return ns.run(work)


def _run_on_thread(fd: int, path: str, work: Callable[[], T]) -> T:
    box: dict[str, object] = {}

    def body() -> None:
        # This thread enters the namespace and then dies: it never switches back, so no
        # other code can ever run on a thread left in the wrong namespace.
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            box["error"] = NetnsError(f"cannot enter network namespace {path}: {os.strerror(err)}")
            return
        try:
            box["result"] = work()
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=body, name=f"netns:{os.path.basename(path)}", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]
