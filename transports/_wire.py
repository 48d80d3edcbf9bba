"""Data-plane framing shared by the stream transports (``tcp``, ``shm``).

Every frame starts with a 16-byte header, then the transfer id, then a body::

    magic "PF" | type u8 | tid_len u8 | count u32 | body_len u64 | tid bytes | body

- HELLO     sender -> receiver, first frame: body = version u16, the receiver incarnation
            the sender expects, the sender's incarnation and pid
- HELLO_OK  receiver -> sender
- DATA      tcp: ``count`` segments (dst addr u64, len u64), then ``body_len`` payload bytes
- PULL      shm: ``count`` triples (src addr, dst addr, len) the receiver copies itself
- END       one stream's part of a transfer is sent: stream bytes, total bytes, streams, notify
- ACK       receiver -> sender: the stream's bytes for tid are in place
- ERR       receiver -> sender: code u8 + message; the receiver then closes the connection

WIRE_VERSION history:
  1 - initial frame set (HELLO, HELLO_OK, DATA, PULL, END, ACK, ERR)
"""

from __future__ import annotations

import ctypes
import enum
import socket
import struct
from typing import Sequence

import numpy as np

from pdfabric.errors import (
    FrameError,
    GrantRefused,
    PeerGone,
    ProtocolMismatch,
    StalePeer,
    TransferAborted,
    TransportError,
)

from ._iov import advance, recv_iov

__all__ = [
    "WIRE_VERSION",
    "FrameType",
    "ErrCode",
    "HEADER",
    "MAX_SEGMENTS",
    "Hello",
    "header",
    "recv_header",
    "recv_exact",
    "send_buffers",
    "error_from_code",
    "FrameReader",
]

WIRE_VERSION = 1
MAGIC = b"PF"
HEADER = struct.Struct("!2sBBIQ")
END_BODY = struct.Struct("!QQI")
MAX_SEGMENTS = 1000  # keeps header + table + payload views under IOV_MAX (1024)
MAX_SMALL_BODY = 64 * 1024
_IOV_BATCH = 1000


class FrameType(enum.IntEnum):
    HELLO = 1
    HELLO_OK = 2
    DATA = 3
    PULL = 4
    END = 5
    ACK = 6
    ERR = 7


class ErrCode(enum.IntEnum):
    REFUSED = 1
    STALE = 2
    FRAME = 3
    VERSION = 4
    ABORTED = 5
    INTERNAL = 6


def error_from_code(code: int, message: str, *, tid: str | None, peer: str, transport: str) -> TransportError:
    """The typed error a sender raises for the receiver's ERR frame."""
    kw = {"transfer_id": tid or None, "peer": peer, "transport": transport}
    cls: type[TransportError]
    if code == ErrCode.REFUSED:
        cls = GrantRefused
    elif code == ErrCode.STALE:
        cls = StalePeer
    elif code == ErrCode.ABORTED:
        cls = TransferAborted
    elif code == ErrCode.VERSION:
        return ProtocolMismatch(f"receiver refused: {message}", **kw)  # type: ignore[return-value]
    else:
        cls = FrameError if code == ErrCode.FRAME else TransportError
    return cls(f"receiver refused: {message}", **kw)


class Hello:
    """HELLO body codec."""

    _FMT = struct.Struct("!HHHI")

    @classmethod
    def pack(cls, expected: str, mine: str, pid: int) -> bytes:
        e, m = expected.encode(), mine.encode()
        return cls._FMT.pack(WIRE_VERSION, len(e), len(m), pid) + e + m

    @classmethod
    def unpack(cls, body: bytes) -> tuple[int, str, str, int]:
        if len(body) < cls._FMT.size:
            raise FrameError("HELLO too short")
        version, le, lm, pid = cls._FMT.unpack_from(body)
        rest = body[cls._FMT.size :]
        if len(rest) != le + lm:
            raise FrameError("HELLO length mismatch")
        return version, rest[:le].decode(), rest[le:].decode(), pid


def header(ftype: FrameType, tid: bytes, count: int, body_len: int) -> bytes:
    return HEADER.pack(MAGIC, ftype, len(tid), count, body_len) + tid


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    _recv_into_exact(sock, memoryview(buf))
    return buf


def _recv_into_exact(sock: socket.socket, mv: memoryview) -> None:
    got = 0
    while got < len(mv):
        n = sock.recv_into(mv[got:], len(mv) - got, socket.MSG_WAITALL)
        if n == 0:
            raise PeerGone(f"connection closed after {got} of {len(mv)} bytes of a frame")
        got += n


def recv_header(sock: socket.socket) -> tuple[FrameType, str, int, int] | None:
    """Read one frame header and its transfer id; None on a clean EOF between frames."""
    buf = bytearray(HEADER.size)
    mv = memoryview(buf)
    n = sock.recv_into(mv, HEADER.size, socket.MSG_WAITALL)
    if n == 0:
        return None
    if n < HEADER.size:
        _recv_into_exact(sock, mv[n:])
    magic, ftype, tid_len, count, body_len = HEADER.unpack(buf)
    if magic != MAGIC:
        raise FrameError(f"bad frame magic {bytes(magic)!r}")
    try:
        kind = FrameType(ftype)
    except ValueError:
        raise FrameError(f"unknown frame type {ftype}") from None
    tid = recv_exact(sock, tid_len).decode(errors="replace") if tid_len else ""
    if kind not in (FrameType.DATA, FrameType.PULL) and body_len > MAX_SMALL_BODY:
        raise FrameError(f"{kind.name} frame body of {body_len} bytes is over {MAX_SMALL_BODY}")
    if count > MAX_SEGMENTS:
        raise FrameError(f"{kind.name} frame with {count} segments (max {MAX_SEGMENTS})")
    return kind, tid, count, body_len


def send_buffers(sock: socket.socket, bufs: Sequence[bytes | memoryview]) -> None:
    """Send all bytes of ``bufs`` with as few ``sendmsg`` calls as possible (no copies)."""
    views = [memoryview(b) for b in bufs if len(b)]
    i = 0
    while i < len(views):
        sent = sock.sendmsg(views[i : i + _IOV_BATCH])
        while sent > 0:
            size = len(views[i])
            if sent >= size:
                sent -= size
                i += 1
            else:
                views[i] = views[i][sent:]
                sent = 0


def unpack_u64s(data: bytes | bytearray, count: int) -> tuple[int, ...]:
    return struct.unpack_from(f"!{count}Q", data)


def pack_u64s(values: Sequence[int]) -> bytes:
    return struct.pack(f"!{len(values)}Q", *values)


class FrameReader:
    """Buffered frame reads from one socket.

    Small frames (headers, tables, END, and the payload of small transfers) arrive with one
    ``recv`` into a 64 KiB staging buffer instead of one syscall per field; payload beyond
    what is staged goes straight from the socket into its destination (``recv_iov``).
    Payload bytes that were staged are copied out once (at most the buffer size per frame).
    """

    SIZE = 64 * 1024

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray(self.SIZE)
        self.mv = memoryview(self.buf)
        self.addr = ctypes.addressof((ctypes.c_char * self.SIZE).from_buffer(self.buf))
        self.start = 0
        self.end = 0

    def _fill(self, need: int) -> bool:
        """Buffer at least ``need`` bytes; False on EOF before any byte (at a boundary)."""
        if self.end - self.start >= need:
            return True
        if self.start:
            n = self.end - self.start
            self.buf[:n] = self.buf[self.start : self.end]
            self.start, self.end = 0, n
        first = self.end == 0
        while self.end < need:
            got = self.sock.recv_into(self.mv[self.end :], self.SIZE - self.end)
            if got == 0:
                if first and self.end == 0:
                    return False
                raise PeerGone(f"connection closed mid-frame ({self.end} of {need} bytes)")
            self.end += got
        return True

    def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes (n <= SIZE)."""
        if n > self.SIZE:
            return bytes(recv_exact(self.sock, n)) if self.end == self.start else self._read_large(n)
        if not self._fill(n):
            raise PeerGone("connection closed")
        out = bytes(self.mv[self.start : self.start + n])
        self.start += n
        return out

    def _read_large(self, n: int) -> bytes:
        head = bytes(self.mv[self.start : self.end])
        self.start = self.end = 0
        return head + bytes(recv_exact(self.sock, n - len(head)))

    def header(self) -> tuple[FrameType, str, int, int] | None:
        """Like ``recv_header``: one frame header and its transfer id, None on clean EOF."""
        if not self._fill(HEADER.size):
            return None
        magic, ftype, tid_len, count, body_len = HEADER.unpack_from(self.buf, self.start)
        self.start += HEADER.size
        if magic != MAGIC:
            raise FrameError(f"bad frame magic {bytes(magic)!r}")
        try:
            kind = FrameType(ftype)
        except ValueError:
            raise FrameError(f"unknown frame type {ftype}") from None
        tid = self.read(tid_len).decode(errors="replace") if tid_len else ""
        if kind not in (FrameType.DATA, FrameType.PULL) and body_len > MAX_SMALL_BODY:
            raise FrameError(f"{kind.name} frame body of {body_len} bytes is over {MAX_SMALL_BODY}")
        if count > MAX_SEGMENTS:
            raise FrameError(f"{kind.name} frame with {count} segments (max {MAX_SEGMENTS})")
        return kind, tid, count, body_len

    def read_into(self, iov: np.ndarray) -> int:
        """Fill the (n, 2) iovec array: staged bytes first (memmove), then the socket."""
        few = iov.tolist() if len(iov) <= 8 else None  # a few rows: Python ints, no numpy calls
        total = sum(r[1] for r in few) if few is not None else int(iov[:, 1].sum())
        staged = min(self.end - self.start, total)
        done = 0
        if staged == 0:
            return recv_iov(self.sock.fileno(), iov)
        if few is None:
            few = iov[: int(np.searchsorted(np.cumsum(iov[:, 1]), staged)) + 1].tolist()
        for addr, length in few:
            if done >= staged:
                break
            k = min(length, staged - done)
            ctypes.memmove(addr, self.addr + self.start + done, k)
            done += k
        self.start += staged
        if staged == total:
            return total
        rest = advance(np.ascontiguousarray(iov), staged)
        return staged + recv_iov(self.sock.fileno(), rest)
