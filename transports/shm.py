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
import socket
import struct

import numpy as np

from pdfabric.errors import ConnectError, FrameError, PeerGone, TransferAborted, TransportUnavailable

from . import _wire as w
from ._iov import cma_read, iovecs
from ._stream import StreamTransport, _ConnCtx
from .base import Capabilities, PeerDescriptor

__all__ = ["ShmTransport"]

_PR_SET_PTRACER = 0x59616D61
_PR_SET_PTRACER_ANY = ctypes.c_ulong(-1).value
_libc = ctypes.CDLL(None, use_errno=True)


class ShmTransport(StreamTransport):
    """Same-host single-copy transport (cross-memory attach)."""

    name = "shm"
    capabilities = Capabilities(push=True, same_host_only=True)
    data_frame = w.FrameType.PULL
    min_stream_bytes = 8 << 20

    def __init__(
        self,
        *,
        streams: int = 2,
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

    def _encode(self, tid: bytes, part: np.ndarray, end: bytes) -> tuple[np.ndarray, list[object]]:
        chunks = []
        for i in range(0, len(part), w.MAX_SEGMENTS):
            c = part[i : i + w.MAX_SEGMENTS]
            chunks.append(w.header(w.FrameType.PULL, tid, len(c), int(c[:, 2].sum())) + c.astype(">u8").tobytes())
        buf = np.frombuffer(b"".join(chunks) + end, dtype=np.uint8)
        return iovecs(np.array([buf.ctypes.data]), np.array([len(buf)])), [buf]

    def _encode_small(self, tid: bytes, part: np.ndarray, end: bytes) -> list[bytes | memoryview]:
        rows = part.tolist()
        head = w.header(w.FrameType.PULL, tid, len(rows), sum(r[2] for r in rows))
        return [head + w.pack_u64s([v for r in rows for v in r]) + end]

    def _receive(self, ctx: _ConnCtx, tid: str, count: int, body_len: int) -> None:
        t = np.frombuffer(ctx.reader.read(24 * count), dtype=">u8").reshape(count, 3).astype(np.uint64)
        if sum(t[:, 2].tolist()) != body_len:  # Python ints: no wrap-around
            raise FrameError(f"PULL frame announces {body_len} bytes but its segments add up differently", transfer_id=tid)
        dst = iovecs(t[:, 1], t[:, 2])
        token = self._grants.begin_write(tid, dst, ctx.peer, ctx)
        got = 0
        try:
            got = cma_read(ctx.pid, iovecs(t[:, 0], t[:, 2]), dst, lambda: self._grants.cancelled(token))
        except TransferAborted:
            return  # revoked or failed meanwhile; the grant already says why
        except (PeerGone, FrameError, TransportUnavailable) as e:
            e.transfer_id, e.peer, e.transport = tid, ctx.peer, self.name
            self._grants.fail(tid, e)
            raise
        finally:
            self._grants.end_write(token, ctx, got)
