"""Control messages of the ``nixl`` transport, carried as NIXL notifications.

NIXL moves the bytes (one-sided WRITE); everything else - handshake, the receiver's
approval of each write, completion - travels as NIXL notifications between the two
agents, encoded here: ``MAGIC`` then one msgpack-encoded, tagged msgspec struct. Nothing is
pickled. A notification that does not start with ``MAGIC`` or does not decode is foreign
and refused (``decode`` raises ``FrameError``).

One write, sender S to receiver R::

    S -> R  Ask(seq, tid, epoch, segs)       the destination segments S wants to write
    R -> S  AskOk(seq, epoch, metadata, regions)  R checked segs against its grant (Rule 1);
            or AskNo(seq, code, reason)      (metadata, regions: sent when R registered more
                                              memory than the epoch S named)
    S => R  WRITE of exactly segs, with notification Done(seq, tid, nbytes, digest, notify);
            S's write is complete when NIXL reports the WRITE done (R approved these bytes)
    R -> S  Nack(seq, code, reason)          R could not match Done to its approval, or the
                                             grant ended meanwhile (revoked): S logs it
    S -> R  Cancel(seq, tid, reason)         an approved write that S could not post

Offers: the approval sent before the Ask. When R grants ``tid`` it offers the grant to
every peer that said Hello (and, on Hello, a new peer gets the grants pending then)::

    R -> S  Offer(seq, tid, epoch, metadata, regions, segs)   segs: the whole grant,
                                             merged; seq < 0 (R's numbering, apart from S's)
    S => R  WRITE whose destination, merged, is exactly segs: no Ask, no wait; its
            Done(seq of the offer, ...) is matched as for an Ask-approved write
    S -> R  Begin(seq)                       the offer is used and the WRITE still in
                                             flight after posting (R polls, watches S)
    R -> S  Withdraw(seq, tid)               the grant completed through another write, or
                                             ended (revoked, failed): drop the offer
    S -> R  Withdrawn(seq)                   S will not use it; R lets the grant's memory go
                                             (an offer S used is answered by its Done)

A write whose destination is not exactly an offer's segments Asks as above.

``PeerInfo`` is the ``extra`` of a ``PeerDescriptor``: the agent's name and full NIXL
metadata, which is how a sender learns to reach a receiver (no NIXL listener thread).

NIXL_WIRE_VERSION history:
  1  first version.
  2  offers: Offer, Begin, Withdraw, Withdrawn; Hello carries the epoch the sender knows.
"""

from __future__ import annotations

import enum
import hashlib
from typing import Union

import msgspec
import numpy as np

from pdfabric.errors import FrameError

__all__ = [
    "NIXL_WIRE_VERSION",
    "MAGIC",
    "Code",
    "PeerInfo",
    "Hello",
    "HelloOk",
    "HelloNo",
    "Ask",
    "AskOk",
    "AskNo",
    "Done",
    "Nack",
    "Cancel",
    "Offer",
    "Begin",
    "Withdraw",
    "Withdrawn",
    "Ping",
    "Pong",
    "Bye",
    "Message",
    "encode",
    "decode",
    "encode_info",
    "decode_info",
    "pack_segments",
    "unpack_segments",
    "digest",
]

NIXL_WIRE_VERSION = 2
MAGIC = b"PFNX"

# (addr, length, memory kind, device id); memory kind: 0 DRAM, 1 VRAM
RegionRow = tuple[int, int, int, int]


class Code(enum.IntEnum):
    """Why a receiver said no; mapped back to the error class on the sender."""

    REFUSED = 1  # GrantRefused: unknown id, outside the grant, already written
    ABORTED = 2  # TransferAborted: revoked, cancelled
    FRAME = 3  # FrameError: byte count or digest does not match the approval
    STALE = 4  # StalePeer: the hello named another incarnation
    VERSION = 5  # ConnectError: wire versions differ
    INTERNAL = 6  # TransportError: the receiver failed


class _Msg(msgspec.Struct, tag=True, array_like=True, frozen=True):
    pass


class PeerInfo(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """What a peer needs to reach an agent (the descriptor's ``extra``)."""

    version: int
    agent: str
    metadata: bytes  # nixl_agent.get_agent_metadata(): connection info + registrations
    epoch: int  # registrations made so far; ``regions`` lists them
    regions: list[RegionRow]
    pidns: str  # /proc/self/ns/pid target: pid checks only within one pid namespace
    start: int  # process start time (clock ticks since boot): pid reuse guard
    bell: str  # abstract Unix socket to ring after each notification (same host and netns)
    netns: str


class Hello(_Msg):
    version: int
    to: str  # the receiver incarnation the sender expects
    frm: str  # the sender's incarnation
    metadata: bytes  # the sender's connection info, so the receiver can answer
    pid: int
    host_id: str
    pidns: str
    start: int
    bell: str
    netns: str
    epoch: int = -1  # the receiver's registrations the sender knows (from its descriptor);
    # a default, so that a version-1 Hello still decodes and gets a clear HelloNo


class HelloOk(_Msg):
    frm: str


class HelloNo(_Msg):
    code: int
    reason: str


class Ask(_Msg):
    seq: int
    tid: str
    epoch: int  # the receiver's registrations the sender knows
    segs: bytes  # pack_segments of the destination (addr, length) pairs


class AskOk(_Msg):
    seq: int
    epoch: int
    metadata: bytes  # full agent metadata when the Ask's epoch is behind, else b""
    regions: list[RegionRow]  # every registration, when the epoch moved (else empty)


class AskNo(_Msg):
    seq: int
    code: int
    reason: str


class Done(_Msg):
    seq: int
    tid: str
    nbytes: int
    digest: bytes
    notify: bytes


class Nack(_Msg):
    seq: int
    code: int
    reason: str


class Cancel(_Msg):
    seq: int
    tid: str
    reason: str


class Offer(_Msg):
    seq: int  # negative: the receiver's numbering
    tid: str
    epoch: int
    metadata: bytes  # full agent metadata when the sender's epoch is behind, else b""
    regions: list[RegionRow]  # every registration, when the epoch moved (else empty)
    segs: bytes  # pack_segments of the grant's (addr, length) ranges, sorted and merged


class Begin(_Msg):
    seq: int


class Withdraw(_Msg):
    seq: int
    tid: str


class Withdrawn(_Msg):
    seq: int


class Ping(_Msg):
    pass


class Pong(_Msg):
    pass


class Bye(_Msg):
    reason: str


Message = Union[Hello, HelloOk, HelloNo, Ask, AskOk, AskNo, Done, Nack, Cancel, Offer, Begin, Withdraw, Withdrawn, Ping, Pong, Bye]

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(Message)  # type: ignore[arg-type]
_info_dec = msgspec.msgpack.Decoder(PeerInfo)


def encode(msg: _Msg) -> bytes:
    return MAGIC + _enc.encode(msg)


def decode(data: bytes) -> Message:
    """A notification -> message; FrameError when it is not one of ours."""
    if not data.startswith(MAGIC):
        raise FrameError(f"foreign notification ({len(data)} bytes, no pdfabric magic)")
    try:
        return _dec.decode(memoryview(data)[len(MAGIC) :])
    except (msgspec.DecodeError, ValueError) as e:  # ValueError: bad UTF-8 in a str field
        raise FrameError(f"malformed notification: {e}") from None


def encode_info(info: PeerInfo) -> bytes:
    return MAGIC + _enc.encode(info)


def decode_info(data: bytes) -> PeerInfo:
    """A descriptor's ``extra`` -> PeerInfo; FrameError when it is not a nixl descriptor."""
    if not data.startswith(MAGIC):
        raise FrameError("descriptor carries no pdfabric NIXL agent information")
    try:
        return _info_dec.decode(memoryview(data)[len(MAGIC) :])
    except (msgspec.DecodeError, ValueError) as e:  # ValueError: bad UTF-8 in a str field
        raise FrameError(f"descriptor's NIXL agent information does not decode: {e}") from None


def pack_segments(segs: np.ndarray) -> bytes:
    """(n, 2) [addr, length] -> little-endian uint64 bytes."""
    return np.ascontiguousarray(segs, dtype="<u8").tobytes()


def unpack_segments(data: bytes) -> np.ndarray:
    """Inverse of ``pack_segments``; FrameError for a truncated table."""
    if len(data) % 16:
        raise FrameError(f"segment table of {len(data)} bytes is not a whole number of (addr, length) pairs")
    return np.frombuffer(data, dtype="<u8").reshape(-1, 2).astype(np.uint64)


def digest(segs: bytes) -> bytes:
    """8-byte digest of a packed segment table: ties a Done to the Ask it answers."""
    return hashlib.blake2b(segs, digest_size=8).digest()
