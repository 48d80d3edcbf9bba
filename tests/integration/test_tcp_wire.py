"""The tcp receiver against hand-made frames: bad input is refused, typed, and contained."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest

from pdfabric.errors import FrameError, GrantRefused, PeerGone, StalePeer
from pdfabric.memory import Region, region_of
from pdfabric.transports import TransferId, TransferPlan
from pdfabric.transports import _wire as w
from pdfabric.transports.tcp import TcpTransport

SENTINEL = 0x5A


@pytest.fixture
def receiver():
    t = TcpTransport(streams=1)
    buf = np.full(1 << 20, SENTINEL, dtype=np.uint8)
    t.register([region_of(buf)])
    yield t, buf
    t.close()


def _raw(t: TcpTransport, incarnation: str | None = None, version: int = w.WIRE_VERSION) -> socket.socket:
    host, port = t.descriptor().endpoint.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=5)
    body = w.Hello.pack(incarnation or t.descriptor().incarnation, "rawclient", 1)
    if version != w.WIRE_VERSION:
        body = version.to_bytes(2, "big") + body[2:]
    s.sendall(w.header(w.FrameType.HELLO, b"", 0, len(body)) + body)
    return s


def _reply(s: socket.socket) -> tuple[w.FrameType, bytes]:
    hdr = w.recv_header(s)
    assert hdr is not None, "receiver closed without a reply"
    kind, _, _, n = hdr
    return kind, bytes(w.recv_exact(s, n))


def _closed(s: socket.socket) -> bool:
    s.settimeout(5)
    try:
        while True:
            if not s.recv(65536):
                return True
    except ConnectionResetError:
        return True


def _data(tid: bytes, segments: list[tuple[int, int]], payload_len: int | None = None) -> bytes:
    total = sum(n for _, n in segments) if payload_len is None else payload_len
    flat = [v for seg in segments for v in seg]
    return w.header(w.FrameType.DATA, tid, len(segments), total) + w.pack_u64s(flat)


def test_handshake_ok_then_bad_magic_closes_and_counts(receiver):
    t, _ = receiver
    s = _raw(t)
    assert _reply(s)[0] is w.FrameType.HELLO_OK
    s.sendall(b"XX" + bytes(14))
    kind, body = _reply(s)
    assert kind is w.FrameType.ERR and body[0] == w.ErrCode.FRAME and b"magic" in body
    assert _closed(s)
    assert any("magic" in r.reason for r in t.rejections)
    s.close()


def test_garbage_instead_of_hello_is_refused(receiver):
    t, _ = receiver
    host, port = t.descriptor().endpoint.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _closed(s)
    assert t.rejections, "a non-pdfabric client was not counted"


def test_wrong_incarnation_is_stale(receiver):
    t, _ = receiver
    with _raw(t, incarnation="0" * 32) as s:
        kind, body = _reply(s)
        assert kind is w.FrameType.ERR and body[0] == w.ErrCode.STALE
        assert b"restarted" in body


def test_wrong_wire_version_is_refused(receiver):
    t, _ = receiver
    with _raw(t, version=99) as s:
        kind, body = _reply(s)
        assert kind is w.FrameType.ERR and body[0] == w.ErrCode.VERSION
        assert b"99" in body


def test_unknown_transfer_id_refused_memory_untouched(receiver):
    t, buf = receiver
    base = region_of(buf).addr
    with _raw(t) as s:
        assert _reply(s)[0] is w.FrameType.HELLO_OK
        s.sendall(_data(b"ghost", [(base, 4096)]) + b"\x01" * 4096)
        kind, body = _reply(s)
        assert kind is w.FrameType.ERR and body[0] == w.ErrCode.REFUSED and b"unknown transfer" in body
    assert (buf == SENTINEL).all()


def test_write_outside_grant_refused_memory_untouched(receiver):
    t, buf = receiver
    base = region_of(buf).addr
    t.grant("g", [Region(base, 65536)])
    with _raw(t) as s:
        assert _reply(s)[0] is w.FrameType.HELLO_OK
        s.sendall(_data(b"g", [(base, 4096), (base + 65536, 4096)]) + b"\x01" * 8192)
        kind, body = _reply(s)
        assert kind is w.FrameType.ERR and body[0] == w.ErrCode.REFUSED and b"outside the grant" in body
        assert _closed(s)
    assert (buf == SENTINEL).all(), "no byte of a refused frame may land, not even the in-grant part"
    with pytest.raises(GrantRefused):
        t.wait_recv("g", 5)


def test_truncated_frame_fails_transfer_as_peer_gone(receiver):
    t, buf = receiver
    base = region_of(buf).addr
    t.grant("cut", [Region(base, 65536)])
    with _raw(t) as s:
        assert _reply(s)[0] is w.FrameType.HELLO_OK
        s.sendall(_data(b"cut", [(base, 65536)]) + b"\x02" * 1000)
    with pytest.raises(PeerGone):
        t.wait_recv("cut", 5)
    assert (buf[65536:] == SENTINEL).all()


def test_segment_table_disagreeing_with_length_is_a_frame_error(receiver):
    t, buf = receiver
    base = region_of(buf).addr
    t.grant("lie", [Region(base, 65536)])
    with _raw(t) as s:
        assert _reply(s)[0] is w.FrameType.HELLO_OK
        s.sendall(_data(b"lie", [(base, 4096)], payload_len=8192))
        kind, body = _reply(s)
        assert kind is w.FrameType.ERR and body[0] == w.ErrCode.FRAME
    assert (buf == SENTINEL).all()


def test_end_with_missing_bytes_fails_not_completes(receiver):
    t, buf = receiver
    base = region_of(buf).addr
    t.grant("short", [Region(base, 8192)])
    with _raw(t) as s:
        assert _reply(s)[0] is w.FrameType.HELLO_OK
        end = w.END_BODY.pack(4096, 4096, 1)
        s.sendall(_data(b"short", [(base, 4096)]) + b"\x03" * 4096 + w.header(w.FrameType.END, b"short", 0, len(end)) + end)
        kind, body = _reply(s)
        assert kind is w.FrameType.ERR and b"granted" in body
    with pytest.raises(FrameError):
        t.wait_recv("short", 5)


def test_restarted_peer_on_same_port_is_stale():
    first = TcpTransport(streams=1)
    old = first.descriptor()
    port = int(old.endpoint.rsplit(":", 1)[1])
    first.close()
    second = TcpTransport(port=port, streams=1)
    sender = TcpTransport(streams=1)
    try:
        t0 = time.monotonic()
        with pytest.raises(StalePeer, match="restarted"):
            sender.connect(old)
        assert time.monotonic() - t0 < 2
        sender.connect(second.descriptor())  # the fresh descriptor works
    finally:
        sender.close()
        second.close()


def test_unreachable_peer_is_a_connect_error_within_timeout():
    from pdfabric.errors import ConnectError

    gone = TcpTransport(streams=1)
    desc = gone.descriptor()
    gone.close()
    sender = TcpTransport(streams=1)
    try:
        with pytest.raises(ConnectError, match="cannot reach"):
            sender.connect(desc, timeout=1)
        plan = TransferPlan(TransferId("x"), (Region(1, 1),), (Region(1, 1),))
        with pytest.raises(ConnectError, match="not connected"):
            sender.write("nobody", plan)  # type: ignore[arg-type]
    finally:
        sender.close()
