"""The cache wire stays readable across versions: fields are added at the end with defaults."""

from __future__ import annotations

import msgspec

from pdfabric.cache import wire


class _OldHello(msgspec.Struct, tag="Hello", array_like=True, frozen=True):
    """``Hello`` before ``fingerprint`` and ``salted``."""

    seq: int
    version: int
    client: str
    chunk_bytes: int
    chunk_tokens: int = 0


def test_an_old_clients_hello_decodes_with_defaults() -> None:
    msg = wire.decode_request(msgspec.msgpack.encode(_OldHello(1, wire.CACHE_WIRE_VERSION, "old", 4096, 64)))
    assert isinstance(msg, wire.Hello)
    assert (msg.chunk_bytes, msg.chunk_tokens, msg.fingerprint, msg.salted) == (4096, 64, "", False)


def test_a_new_hello_decodes_on_an_old_server() -> None:
    new = wire.encode(wire.Hello(2, wire.CACHE_WIRE_VERSION, "engine/scheduler", 4096, 64, "fp", True))
    old = msgspec.msgpack.Decoder(_OldHello).decode(new)
    assert (old.client, old.chunk_bytes, old.chunk_tokens) == ("engine/scheduler", 4096, 64)
