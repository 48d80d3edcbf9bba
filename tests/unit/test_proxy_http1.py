"""The proxy's lean HTTP/1.1 client (``pdfabric.proxy.http1``) against scripted loopback
servers: body framings split at every byte, keep-alive reuse, cuts, silence, hang-ups."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from pdfabric.proxy.http1 import AnswerCut, Client

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], "asyncio.Future[None] | object"]


async def _serve(script: Script) -> tuple[asyncio.Server, str, list[bytes]]:
    """A server that reads each request (head + Content-Length body) and runs ``script``."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                seen.append(head + await reader.readexactly(length))
                if await script(reader, writer) is False:  # type: ignore[misc]
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}", seen


def _bytewise(answer: bytes) -> Script:
    async def script(_: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        for i in range(len(answer)):  # one byte per write: every split point
            w.write(answer[i:i + 1])
            await w.drain()
            await asyncio.sleep(0)
    return script


CHUNKED = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: b\r\n\r\n"
           b"5\r\nhello\r\n1;ext=1\r\n \r\n5\r\nworld\r\n0\r\n\r\n")
LENGTH = b"HTTP/1.1 201 Created\r\nContent-Length: 11\r\n\r\nhello world"


@pytest.mark.parametrize("answer,status", [(CHUNKED, 200), (LENGTH, 201)], ids=["chunked", "length"])
def test_bodies_split_at_every_byte_then_the_connection_is_reused(answer: bytes, status: int) -> None:
    async def main() -> None:
        server, url, seen = await _serve(_bytewise(answer))
        client = Client(read_timeout_s=5)
        try:
            for _ in range(2):
                resp = await client.post(url, "/v1/completions", b'{"a":1}')
                assert resp.status == status
                assert ("X-A", "b") in resp.headers if answer is CHUNKED else resp.headers == [("Content-Length", "11")]
                assert await resp.read() == b"hello world"
            assert len(seen) == 2 and seen[0].startswith(b"POST /v1/completions HTTP/1.1\r\n")
            assert seen[0].endswith(b'\r\n\r\n{"a":1}') and seen[0] == seen[1]
            assert sum(len(v) for v in client._idle.values()) == 1  # one connection, reused
        finally:
            client.close()
            server.close()

    asyncio.run(main())


def test_pieces_arrive_as_written_and_a_body_without_length_ends_at_close() -> None:
    async def script(_: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\none\r\n")
        await w.drain()
        await asyncio.sleep(0.05)
        w.write(b"3\r\ntwo\r\n0\r\n\r\n")
        return True

    async def to_close(_: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.0 200 OK\r\n\r\nall of it")
        await w.drain()
        return False

    async def main() -> None:
        server, url, _ = await _serve(script)
        client = Client(read_timeout_s=5)
        try:
            resp = await client.post(url, "/x", b"{}")
            assert [p async for p in resp.pieces()] == [b"one", b"two"]
        finally:
            server.close()
        server, url, _ = await _serve(to_close)
        try:
            resp = await client.post(url, "/x", b"{}")
            assert await resp.read() == b"all of it"
        finally:
            client.close()
            server.close()

    asyncio.run(main())


def test_cut_refused_silent_and_abandoned_answers() -> None:
    async def cut(_: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
        await w.drain()
        return False

    async def silent(r: asyncio.StreamReader, _: asyncio.StreamWriter) -> None:
        await r.read()  # until the client hangs up

    async def main() -> None:
        client = Client(read_timeout_s=0.2)
        server, url, _ = await _serve(cut)
        resp = await client.post(url, "/x", b"{}")
        with pytest.raises(AnswerCut):
            await resp.read()
        server.close()
        await server.wait_closed()
        with pytest.raises(ConnectionError):
            await client.post(url, "/x", b"{}")  # nothing listens there now
        server, url, seen = await _serve(silent)
        with pytest.raises(asyncio.TimeoutError):
            await client.post(url, "/x", b"{}")
        task = asyncio.create_task(client.post(url, "/x", b"{}"))
        await asyncio.sleep(0.05)
        task.cancel()  # the caller gave up: the connection is closed, not pooled
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(seen) == 2 and not any(client._idle.values())
        client.close()
        server.close()

    asyncio.run(main())
