"""Messages between engines and the cache server (ZMQ DEALER -> ROUTER, msgspec).

Data never travels in these messages: the server's L1 arena is a shared-memory file that
clients map; a ``Read`` or ``Reserve`` answers with offsets into it, pinned until the
client's ``Release`` / ``Commit`` (or until the lease expires, when a client died).

Every request carries a client-chosen ``seq`` that its answer repeats, so a late answer
to a request the client gave up on (timeout) is recognised and dropped.

Changes. ``CACHE_WIRE_VERSION`` changes only when an older peer could not work with a
message; a field added at the end with a default does not change it (msgspec decodes an
older peer's shorter message with the default and ignores trailing fields it does not know):

- 1: the first version.
- 1, unchanged: ``Hello.fingerprint`` and ``Hello.salted`` (the keying of the client's
  chunk keys, which the server publishes on ``/health`` for the proxy's cache lookups).
"""

from __future__ import annotations

import msgspec

__all__ = [
    "CACHE_WIRE_VERSION",
    "HELLO_FIRST",
    "Commit",
    "Count",
    "Done",
    "Hello",
    "HelloOk",
    "Leased",
    "Lookup",
    "Read",
    "Refused",
    "Release",
    "Reply",
    "Request",
    "Reserve",
    "Stats",
    "StatsReply",
    "decode_reply",
    "decode_request",
    "encode",
]

CACHE_WIRE_VERSION = 1
# the start of the reason a server refuses any message but Hello with, from a connection
# that did not say Hello to it (a client of a previous server on this port): the client
# connects again, says Hello and maps the new server's arena
HELLO_FIRST = "say Hello first"


class _Msg(msgspec.Struct, tag=True, array_like=True, frozen=True):
    seq: int


# -- requests --------------------------------------------------------------------------
class Hello(_Msg):
    version: int
    client: str
    chunk_bytes: int  # every value this client reads or writes has this size
    chunk_tokens: int = 0  # tokens per chunk (for the token hit ratio; 0: unknown)
    fingerprint: str = ""  # the client's ChunkKeyer fingerprint text ("": it computes no keys)
    salted: bool = False  # its keys carry a tenant salt: nobody else can compute them


class Lookup(_Msg):
    keys: list[bytes]  # a prefix chain: the answer is how many leading keys are cached
    count: bool = True  # counts toward the hit ratio (False: a store checking what is there)


class Read(_Msg):
    keys: list[bytes]  # pin these (promoting lower-tier hits into L1)


class Reserve(_Msg):
    keys: list[bytes]  # room for these in L1, to be filled and committed


class Release(_Msg):
    lease: int


class Commit(_Msg):
    lease: int
    ok: bool  # False: give the room back (nothing written)


class Stats(_Msg):
    pass


# -- replies ---------------------------------------------------------------------------
class HelloOk(_Msg):
    shm_path: str  # map this file (read-write) to reach the offsets of Leased
    arena_bytes: int
    chunk_bytes: int


class Count(_Msg):
    n: int


class Leased(_Msg):
    lease: int  # 0: nothing was pinned or reserved (every offset is -1)
    offsets: list[int]  # per key: the value's offset in the arena, -1 where absent / refused


class Done(_Msg):
    stored: int


class Refused(_Msg):
    reason: str


class StatsReply(_Msg):
    stats: dict[str, object]


Request = Hello | Lookup | Read | Reserve | Release | Commit | Stats
Reply = HelloOk | Count | Leased | Done | Refused | StatsReply

_ENC = msgspec.msgpack.Encoder()
_REQ = msgspec.msgpack.Decoder(Request)
_REP = msgspec.msgpack.Decoder(Reply)


def encode(msg: Request | Reply) -> bytes:
    return _ENC.encode(msg)


def decode_request(raw: bytes) -> Request:
    return _REQ.decode(raw)  # type: ignore[no-any-return]


def decode_reply(raw: bytes) -> Reply:
    return _REP.decode(raw)  # type: ignore[no-any-return]
