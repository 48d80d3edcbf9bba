"""``tcp``: KV blocks over TCP, zero-copy on both ends.

The sender ``sendmsg``s frame headers followed by views that point straight into its
registered KV memory (no per-block Python copies); the receiver reads each frame's
segment table, checks it against the grant, then ``recvmsg_into``s the payload straight
into the granted destination blocks. Large transfers are split across ``streams``
parallel connections. See ``_stream`` for the connection machinery, ``_wire`` for frames.
"""

from __future__ import annotations

import socket

import numpy as np

from pdfabric.errors import FrameError

from . import _wire as w
from ._iov import iovecs
from ._stream import StreamTransport, _ConnCtx
from .base import Capabilities, PeerDescriptor

__all__ = ["TcpTransport"]

_SOCK_BUF = 0  # 0: kernel autotuning (measured faster on loopback than 4 MiB)


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF) if _SOCK_BUF else ():
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, _SOCK_BUF)
        except OSError:
            pass


class TcpTransport(StreamTransport):
    """Push transport over TCP; works between any hosts."""

    name = "tcp"
    capabilities = Capabilities(push=True)
    data_frame = w.FrameType.DATA

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        streams: int = 2,
        connect_timeout_s: float = 5.0,
        transfer_timeout_s: float = 30.0,
    ) -> None:
        self._host, self._port = host, port
        super().__init__(streams=streams, connect_timeout_s=connect_timeout_s, transfer_timeout_s=transfer_timeout_s)

    def _listen(self) -> tuple[socket.socket, str]:
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _tune(sock)
        try:
            sock.bind((self._host, self._port))
        except OSError as e:
            sock.close()
            raise OSError(e.errno, f"tcp transport cannot listen on {self._host}:{self._port}: {e.strerror}") from e
        sock.listen(128)
        host, port = sock.getsockname()[:2]
        return sock, f"{host}:{port}"

    def _dial(self, peer: PeerDescriptor, timeout: float) -> socket.socket:
        host, port = peer.endpoint.rsplit(":", 1)
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
        _tune(sock)
        return sock

    def _encode(self, tid: bytes, part: np.ndarray, end: bytes) -> tuple[np.ndarray, list[object]]:
        rows: list[np.ndarray] = []
        keep: list[object] = []
        for i in range(0, len(part), w.MAX_SEGMENTS):
            chunk = part[i : i + w.MAX_SEGMENTS]
            table = chunk[:, 1:3].astype(">u8").tobytes()
            head = np.frombuffer(w.header(w.FrameType.DATA, tid, len(chunk), int(chunk[:, 2].sum())) + table, dtype=np.uint8)
            keep.append(head)
            rows.append(iovecs(np.array([head.ctypes.data]), np.array([len(head)])))
            rows.append(iovecs(chunk[:, 0], chunk[:, 2]))
        tail = np.frombuffer(end, dtype=np.uint8)
        keep.append(tail)
        rows.append(iovecs(np.array([tail.ctypes.data]), np.array([len(tail)])))
        return np.concatenate(rows), keep

    def _encode_small(self, tid: bytes, part: np.ndarray, end: bytes) -> list[bytes | memoryview]:
        rows = part.tolist()
        table = w.pack_u64s([v for _, d, n in rows for v in (d, n)])
        head = w.header(w.FrameType.DATA, tid, len(rows), sum(r[2] for r in rows)) + table
        return [head, *(self._mem.view(s, n) for s, _, n in rows), end]

    def _receive(self, ctx: _ConnCtx, tid: str, count: int, body_len: int) -> None:
        raw = ctx.reader.read(16 * count)
        vals = w.unpack_u64s(raw, 2 * count)
        if sum(vals[1::2]) != body_len:  # Python ints: no wrap-around
            raise FrameError(f"DATA frame announces {body_len} bytes but its segments add up differently", transfer_id=tid)
        if count <= 8:
            table = np.array(vals, dtype=np.uint64).reshape(count, 2)
        else:
            table = np.frombuffer(raw, dtype=">u8").reshape(count, 2).astype(np.uint64)
        token = self._grants.begin_write(tid, table, ctx.peer, ctx)
        got = 0
        try:
            got = ctx.reader.read_into(table)
        finally:
            self._grants.end_write(token, ctx, got)
