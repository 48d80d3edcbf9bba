"""``tcp``: KV blocks over TCP, zero-copy on both ends.

The sender ``sendmsg``s frame headers followed by views that point straight into its
registered KV memory (no per-block Python copies); the receiver reads each frame's
segment table, checks it against the grant, then ``recvmsg_into``s the payload straight
into the granted destination blocks. Large transfers are split across ``streams``
parallel connections. See ``_stream`` for the connection machinery, ``_wire`` for frames.
"""

from __future__ import annotations

import socket

from pdfabric.errors import FrameError

from . import _wire as w
from ._stream import Piece, StreamTransport, _ConnCtx
from .base import Capabilities, PeerDescriptor

__all__ = ["TcpTransport"]

_SOCK_BUF = 4 << 20


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
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

    def _encode(self, tid: bytes, part: list[Piece]) -> list[list[bytes | memoryview]]:
        frames: list[list[bytes | memoryview]] = []
        view = self._mem.view
        for i in range(0, len(part), w.MAX_SEGMENTS):
            chunk = part[i : i + w.MAX_SEGMENTS]
            table: list[int] = []
            nbytes = 0
            for _, d, n in chunk:
                table += (d, n)
                nbytes += n
            head = w.header(w.FrameType.DATA, tid, len(chunk), nbytes) + w.pack_u64s(table)
            frames.append([head, *(view(s, n) for s, _, n in chunk)])
        return frames

    def _receive(self, ctx: _ConnCtx, tid: str, count: int, body_len: int) -> None:
        vals = w.unpack_u64s(w.recv_exact(ctx.sock, 16 * count), 2 * count)
        segments = list(zip(vals[0::2], vals[1::2]))
        if sum(n for _, n in segments) != body_len:
            raise FrameError(f"DATA frame announces {body_len} bytes but its segments add up differently", transfer_id=tid)
        token = self._grants.begin_write(tid, segments, ctx.peer, ctx)
        got = 0
        try:
            views = [self._mem.view(a, n) for a, n in segments]
            got = w.recv_scatter(ctx.sock, views)
        finally:
            self._grants.end_write(token, ctx, got)
