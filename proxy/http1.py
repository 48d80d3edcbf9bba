"""A lean HTTP/1.1 client for the proxy's legs: POST a JSON body, read the answer whole or
as it comes. The hot path of every request, so it does only what the legs need (aiohttp's
client costs about as much CPU per leg as the rest of the proxy).

- One pool of keep-alive connections per engine address, last used first; a connection idle
  longer than ``idle_s`` is closed rather than reused (below uvicorn's 5 s keep-alive, so a
  request is not sent on a connection the engine is closing). No request is ever re-sent.
- ``http://`` and ``https://`` engine URLs (a path prefix is kept).
- Bodies by ``Content-Length``, ``Transfer-Encoding: chunked`` or until the engine closes.
- ``read_timeout_s`` bounds silence (waiting for the answer or between pieces of it), not a
  whole answer; ``asyncio.TimeoutError`` when it passes.
- Errors: ``OSError`` (``ConnectionError``: refused, reset, closed before an answer) and
  ``AnswerCut`` (closed in the middle of an answer; a ``ValueError``).
- Any exception or cancellation before an answer is complete closes its connection (the
  engine sees the hang-up and aborts the request); a complete answer gives it back to the pool.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

__all__ = ["Client", "Response", "AnswerCut"]

_HIGH_WATER = 1 << 20  # pause reading an engine whose answer piles up unread
# framing headers, searched in the lower-cased head ("\r\n" starts every header line)
_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)")
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[^\r\n]*chunked[ \t]*(?:\r\n|$)")
_CONNECTION = re.compile(rb"\r\nconnection:([^\r\n]*)")


_Key = tuple[str, int, bool]  # host, port, TLS: one pool each


class AnswerCut(ValueError):
    """The connection closed in the middle of an answer."""


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.closed = False
        self.paused = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def more(self, timeout: float) -> None:
        """Wait for more bytes (or the end) for at most ``timeout`` seconds."""
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        loop = asyncio.get_running_loop()
        w = self._waiter = loop.create_future()
        timer = loop.call_later(timeout, _expire, w)
        try:
            await w
        finally:
            timer.cancel()
            self._waiter = None

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


def _expire(w: asyncio.Future[None]) -> None:
    if not w.done():
        w.set_exception(asyncio.TimeoutError())


class Response:
    """An answer whose status line and headers arrived; its body is read with ``read``,
    ``next_piece`` or ``pieces``. At the body's end the connection goes back to the pool;
    ``close`` (or ``release``) before that drops it."""

    def __init__(self, client: Client, key: _Key, conn: _Conn, status: int, head: bytes,
                 length: int | None, chunked: bool, keep: bool) -> None:
        self.status, self._head = status, head
        self._headers: list[tuple[str, str]] | None = None
        self._client, self._key, self._conn = client, key, conn
        self._left = length  # bytes of body still to come (Content-Length), None: chunked or to close
        self._chunked, self._keep = chunked, keep
        self._chunk_left = 0  # bytes left in the current chunk, plus its CRLF
        self.done = length == 0
        self._finished = False

    @property
    def headers(self) -> list[tuple[str, str]]:
        """(name, value) of each header line, in order."""
        if self._headers is None:
            lines = self._head.decode("latin-1").split("\r\n")[1:]
            self._headers = [(n.strip(), v.strip()) for n, _, v in (x.partition(":") for x in lines)]
        return self._headers

    async def read(self) -> bytes:
        out = bytearray()
        while piece := await self.next_piece():
            out += piece
        return bytes(out)

    async def pieces(self) -> AsyncIterator[bytes]:
        while piece := await self.next_piece():
            yield piece

    async def next_piece(self) -> bytes:
        """The next piece of the body as it arrives (chunked framing removed); b"" at its end."""
        try:
            while not self.done:
                piece = self._take()
                if piece:
                    return piece
                if self.done:
                    break
                if self._conn.closed:
                    if self._left is None and not self._chunked:
                        self.done = True  # a body without length ends when the engine closes
                        break
                    raise AnswerCut("the engine closed the connection in the middle of an answer")
                await self._conn.more(self._client.read_timeout_s)
        except BaseException:
            self.close()
            raise
        self._finish()
        return b""

    def _take(self) -> bytes:
        buf = self._conn.buf
        if not buf:
            return b""
        if not self._chunked:
            n = len(buf) if self._left is None else min(len(buf), self._left)
            piece = bytes(buf[:n])
            del buf[:n]
            if self._left is not None:
                self._left -= n
                self.done = self._left == 0
            return piece
        return self._take_chunks(buf)

    def _take_chunks(self, buf: bytearray) -> bytes:
        out = bytearray()
        pos = 0
        while True:
            if self._chunk_left:
                n = min(self._chunk_left, len(buf) - pos)
                data_n = min(n, max(0, self._chunk_left - 2))  # the chunk's closing CRLF is not data
                out += buf[pos:pos + data_n]
                pos += n
                self._chunk_left -= n
                if self._chunk_left:
                    break
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
            if size == 0:
                end = buf.find(b"\r\n\r\n", eol)  # the last chunk: (trailers and) an empty line
                if end < 0:
                    break
                pos = end + 4
                self.done = True
                break
            pos = eol + 2
            self._chunk_left = size + 2
        del buf[:pos]
        return bytes(out)

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        conn = self._conn
        if self._keep and not conn.closed and not conn.buf:
            self._client._give_back(self._key, conn)
        else:
            conn.abort()

    def close(self) -> None:
        """Give the connection back (the body was read to its end) or drop it."""
        if self.done:
            self._finish()
        elif not self._finished:
            self._finished = True
            self._conn.abort()

    release = close


class Client:
    def __init__(self, read_timeout_s: float, connect_timeout_s: float = 5.0, idle_s: float = 4.0) -> None:
        self.read_timeout_s, self.connect_timeout_s, self.idle_s = read_timeout_s, connect_timeout_s, idle_s
        self._idle: dict[_Key, list[_Conn]] = {}
        self._bases: dict[str, tuple[_Key, str, bytes]] = {}
        self._ssl: ssl.SSLContext | None = None

    def _base(self, url: str) -> tuple[_Key, str, bytes]:
        """(pool key, path prefix, Host header) of an engine's base URL."""
        base = self._bases.get(url)
        if base is None:
            u = urlsplit(url)
            if u.scheme not in ("http", "https") or not u.hostname:
                raise ValueError(f"expected an engine URL http(s)://host:port, got {url!r}")
            tls = u.scheme == "https"
            key = (u.hostname, u.port or (443 if tls else 80), tls)
            host = u.netloc.rpartition("@")[2].encode("idna")
            base = self._bases[url] = (key, u.path.rstrip("/"), host)
        return base

    async def post(self, url: str, path: str, body: bytes, headers: bytes = b"") -> Response:
        """POST ``body`` (JSON) to ``url + path``; the answer once its headers arrived.
        ``headers``: extra header lines, each ending in CRLF, already checked by the caller."""
        key, prefix, host = self._base(url)
        head = (b"POST " + (prefix + path).encode("latin-1") + b" HTTP/1.1\r\nHost: " + host
                + b"\r\nAccept-Encoding: identity\r\nContent-Type: application/json\r\n" + headers
                + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        conn = await self._acquire(key)
        return await self._exchange(key, conn, head + body)

    async def _exchange(self, key: _Key, conn: _Conn, data: bytes) -> Response:
        try:
            if conn.closed or conn.transport is None:
                raise ConnectionResetError("the engine closed the connection")
            conn.transport.write(data)
            return await self._read_head(key, conn)
        except BaseException:
            conn.abort()
            raise

    async def _acquire(self, key: _Key) -> _Conn:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self.idle_s:
                return conn
            conn.abort()
        return await self._connect(key)

    async def _connect(self, key: _Key) -> _Conn:
        loop = asyncio.get_running_loop()
        conn = _Conn()
        host, port, tls = key
        async with asyncio.timeout(self.connect_timeout_s):
            if tls:
                await loop.create_connection(lambda: conn, host, port, ssl=self._tls())
            else:
                await loop.create_connection(lambda: conn, host, port)
        return conn

    def _tls(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def _give_back(self, key: _Key, conn: _Conn) -> None:
        now = conn.idle_since = time.monotonic()
        idle = self._idle.setdefault(key, [])
        while idle and (idle[0].closed or now - idle[0].idle_since >= self.idle_s):
            idle.pop(0).abort()  # the least recently used, past reuse: closed, not kept
        idle.append(conn)

    async def _read_head(self, key: _Key, conn: _Conn) -> Response:
        while True:
            end = conn.buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            if conn.closed:
                if conn.buf:
                    raise AnswerCut("the engine closed the connection in the middle of the answer's headers")
                raise ConnectionResetError("the engine closed the connection before answering")
            await conn.more(self.read_timeout_s)
        head = bytes(conn.buf[:end])
        del conn.buf[:end + 4]
        sp = head.find(b" ")
        version, status = head[:sp], int(head[sp + 1:sp + 4])
        if status < 200:  # 100 Continue and the like: the real answer follows
            return await self._read_head(key, conn)
        low = head.lower()  # framing from the headers that set it; the rest parsed only if asked for
        m = _LENGTH.search(low)
        length = int(m.group(1)) if m else None
        chunked = _CHUNKED.search(low) is not None
        m = _CONNECTION.search(low)
        keep = (m is None or m.group(1).strip() != b"close") if version == b"HTTP/1.1" else (
            m is not None and m.group(1).strip() == b"keep-alive")
        if chunked:
            length = None
        elif status in (204, 304):
            length = 0
        keep = keep and (chunked or length is not None)
        return Response(self, key, conn, status, head, length, chunked, keep)

    def close(self) -> None:
        for conns in self._idle.values():
            for c in conns:
                c.abort()
        self._idle.clear()
