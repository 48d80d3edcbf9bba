"""``shm``: same-host transport with exactly one copy of the payload.

The sender's KV memory is private to its process, so a single copy means the kernel
copies it across processes: the *receiver* calls ``process_vm_readv`` (cross-memory
attach) with destinations it checked against its own grant and sources the sender named.
The receiver does the copy so that it alone decides where bytes land - the same rule the
socket transports keep. Control frames (HELLO, PULL, END, ACK, ERR) travel over an
abstract Unix socket; the sender's pid comes from the kernel (``SO_PEERCRED``), not from
the sender. Needs both ends on one host and ptrace-level access between them (same user;
the sender opts in with ``PR_SET_PTRACER`` where Yama restricts it).
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct

from pdfabric.errors import ConnectError, FrameError, PeerGone, TransportUnavailable

from . import _wire as w
from ._stream import Piece, StreamTransport, _ConnCtx
from .base import Capabilities, PeerDescriptor

__all__ = ["ShmTransport", "cma_read"]

_PR_SET_PTRACER = 0x59616D61
_PR_SET_PTRACER_ANY = ctypes.c_ulong(-1).value


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_readv = _libc.process_vm_readv
_readv.restype = ctypes.c_ssize_t
_readv.argtypes = [
    ctypes.c_int,
    ctypes.POINTER(_Iovec),
    ctypes.c_ulong,
    ctypes.POINTER(_Iovec),
    ctypes.c_ulong,
    ctypes.c_ulong,
]


def cma_read(pid: int, pieces: list[Piece]) -> int:
    """Copy each (remote src, local dst, n) from process ``pid``; returns bytes copied.

    Raises PeerGone when the process is gone, FrameError when a source address is not
    mapped in it, TransportUnavailable when the kernel forbids cross-memory attach."""
    done = 0
    pending = [p for p in pieces if p[2]]
    while pending:
        n = len(pending)
        local = (_Iovec * n)(*[(d, k) for _, d, k in pending])
        remote = (_Iovec * n)(*[(s, k) for s, _, k in pending])
        got = _readv(pid, local, n, remote, n, 0)
        if got < 0:
            err = ctypes.get_errno()
            if err == errno.ESRCH:
                raise PeerGone(f"sender process {pid} is gone")
            if err == errno.EPERM:
                raise TransportUnavailable(
                    f"process_vm_readv on pid {pid} is not permitted (ptrace restrictions or a "
                    "seccomp filter); use the tcp transport or allow cross-memory attach"
                )
            raise FrameError(f"process_vm_readv from pid {pid} failed: {os.strerror(err)}")
        if got == 0:
            raise FrameError(f"sender pid {pid} named source memory that is not mapped")
        done += got
        while got > 0:
            s, d, k = pending[0]
            if got >= k:
                got -= k
                pending.pop(0)
            else:
                pending[0] = (s + got, d + got, k - got)
                got = 0
    return done


class ShmTransport(StreamTransport):
    """Same-host single-copy transport (cross-memory attach)."""

    name = "shm"
    capabilities = Capabilities(push=True, same_host_only=True)
    data_frame = w.FrameType.PULL
    min_stream_bytes = 8 << 20

    def __init__(
        self,
        *,
        streams: int = 1,
        connect_timeout_s: float = 5.0,
        transfer_timeout_s: float = 30.0,
    ) -> None:
        # Let same-user peers read our memory where Yama limits ptrace to descendants.
        _libc.prctl(_PR_SET_PTRACER, ctypes.c_ulong(_PR_SET_PTRACER_ANY), 0, 0, 0)
        super().__init__(streams=streams, connect_timeout_s=connect_timeout_s, transfer_timeout_s=transfer_timeout_s)

    def _listen(self) -> tuple[socket.socket, str]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        name = f"pdfabric-shm-{self._incarnation}"
        sock.bind("\0" + name)
        sock.listen(128)
        return sock, f"unix:@{name}"

    def descriptor(self) -> PeerDescriptor:
        d = super().descriptor()
        return PeerDescriptor(
            transport=d.transport,
            incarnation=d.incarnation,
            host="localhost",
            pid=d.pid,
            endpoint=d.endpoint,
            host_id=d.host_id,
        )

    def _dial(self, peer: PeerDescriptor, timeout: float) -> socket.socket:
        from .registry import local_host_id

        if peer.host_id != local_host_id():
            raise ConnectError(
                f"shm needs both ends on one host; peer is on {peer.host_id or 'an unknown host'}",
                transport=self.name,
            )
        if not peer.endpoint.startswith("unix:@"):
            raise ConnectError(f"not an shm endpoint: {peer.endpoint!r}", transport=self.name)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect("\0" + peer.endpoint[len("unix:@") :])
        except OSError:
            sock.close()
            raise
        return sock

    def _peer_pid(self, sock: socket.socket, claimed: int) -> int:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", creds)[0]

    def _encode(self, tid: bytes, part: list[Piece]) -> list[list[bytes | memoryview]]:
        frames: list[list[bytes | memoryview]] = []
        for i in range(0, len(part), w.MAX_SEGMENTS):
            chunk = part[i : i + w.MAX_SEGMENTS]
            flat = [v for piece in chunk for v in piece]
            nbytes = sum(p[2] for p in chunk)
            frames.append([w.header(w.FrameType.PULL, tid, len(chunk), nbytes) + w.pack_u64s(flat)])
        return frames

    def _receive(self, ctx: _ConnCtx, tid: str, count: int, body_len: int) -> None:
        vals = w.unpack_u64s(w.recv_exact(ctx.sock, 24 * count), 3 * count)
        pieces = [(vals[i], vals[i + 1], vals[i + 2]) for i in range(0, 3 * count, 3)]
        if sum(p[2] for p in pieces) != body_len:
            raise FrameError(f"PULL frame announces {body_len} bytes but its segments add up differently", transfer_id=tid)
        token = self._grants.begin_write(tid, [(d, n) for _, d, n in pieces], ctx.peer, ctx)
        got = 0
        try:
            got = cma_read(ctx.pid, pieces)
        except (PeerGone, FrameError, TransportUnavailable) as e:
            e.transfer_id, e.peer, e.transport = tid, ctx.peer, self.name
            self._grants.fail(tid, e)
            raise
        finally:
            self._grants.end_write(token, ctx, got)
