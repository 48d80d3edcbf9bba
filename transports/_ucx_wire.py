"""Tags and control messages of the ``ucx`` transport.

UCX matches tagged messages per *worker*, not per endpoint, so everything a message needs
to be routed travels in its 64-bit tag::

    CTRL  0x1 << 60 | key << 40                  a control message
    DATA  0x2 << 60 | key << 40 | seq << 24 | i  message ``i`` of write ``seq``

``key`` (20 bits) is the receiver's key for the sending peer, handed out in HelloOk (0: a
Hello, from a sender not known yet); ``seq`` (16 bits) numbers the sender's writes; a
write has at most ``MAX_SEGMENTS`` segments.

A control message is ``MAGIC`` then one msgpack-encoded, tagged msgspec struct. Nothing is
pickled; a message that does not start with ``MAGIC`` or does not decode is foreign and
refused (``decode`` raises ``FrameError``).

One write, sender S to receiver R::

    S -> R  Ask(seq, tid, segs, notify)   the destination segments S wants to fill
    S => R  one tagged send per message, tag DATA|key|seq|i, right behind the Ask: UCX
            holds each as an unexpected message (a rendezvous one as its header only)
            until R takes it; R takes the segments of ``seq`` only after it checked the
            Ask against its grant (Rule 1), and each one only into its granted bytes after
            checking its index and length
    R -> S  Fin(seq, nbytes)              every byte landed; the grant is complete
            or AskNo(seq, code, reason)   R refused the Ask (it drops the segments unread)
            or Nack(seq, code, reason)    R refused a segment, or the grant ended
    S -> R  Cancel(seq, posted, reason)   S could post only ``posted`` of its segments

``PeerInfo`` is the ``extra`` of a ``PeerDescriptor``: the UCX worker address (how a
sender makes an endpoint to the receiver) and what identifies the receiving process.

*Messages.* A message is one segment, or - for a run of consecutive segments each under
``STAGE_BELOW`` bytes - up to ``STAGE_BYTES`` of them packed back to back (the sender
gathers them into one buffer, the receiver scatters it): UCX costs ~15 us of Python and a
rendezvous handshake per message, which left 32 KiB KV blocks at 0.07x memcpy. Both sides
derive the grouping from the Ask's segment lengths (``message_groups``); the receiver
checks a packed message's length against the sum of its segments, and the grant table
takes it as one write of all of them.

UCX_WIRE_VERSION history:
  1  first version.
  2  runs of small segments travel packed (``message_groups``); tags number messages.
"""

from __future__ import annotations

import enum

import msgspec
import numpy as np

from pdfabric.errors import FrameError

__all__ = [
    "CTRL",
    "DATA",
    "KEY_BITS",
    "KEY_MASK",
    "KIND_MASK",
    "MAGIC",
    "MAX_CTRL_BYTES",
    "MAX_SEGMENTS",
    "UCX_WIRE_VERSION",
    "WRITE_MASK",
    "Ask",
    "AskNo",
    "Bye",
    "Cancel",
    "Code",
    "Fin",
    "Hello",
    "HelloNo",
    "HelloOk",
    "Message",
    "Nack",
    "PeerInfo",
    "Ping",
    "Pong",
    "ctrl_tag",
    "data_tag",
    "decode",
    "decode_info",
    "encode",
    "encode_info",
    "key_of",
    "key_tag",
    "pack_segments",
    "message_groups",
    "split_data_tag",
    "unpack_segments",
    "write_tag",
]

UCX_WIRE_VERSION = 2
MAGIC = b"PFUX"

_KIND_SHIFT = 60
CTRL = 1 << _KIND_SHIFT
DATA = 2 << _KIND_SHIFT
KIND_MASK = 0xF << _KIND_SHIFT
KEY_BITS = 20
KEY_MASK = ((1 << KEY_BITS) - 1) << 40  # as it sits in a tag
_SEQ_MASK = (1 << 16) - 1
_SEG_MASK = (1 << 24) - 1
WRITE_MASK = KIND_MASK | KEY_MASK | (_SEQ_MASK << 24)  # the tags of one write
STAGE_BELOW = 64 << 10  # segments under this many bytes travel packed ...
STAGE_BYTES = 1 << 20  # ... up to this many bytes per message,
STAGE_LIMIT = 64 << 20  # and up to this many bytes per write (the rest go one per message)
MAX_SEGMENTS = _SEG_MASK + 1
MAX_CTRL_BYTES = 64 << 20  # an Ask of ~4M segments; anything longer is refused unread


class Code(enum.IntEnum):
    """Why a receiver said no; mapped back to the error class on the sender."""

    REFUSED = 1  # GrantRefused: unknown id, outside the grant, a segment that does not fit
    ABORTED = 2  # TransferAborted: revoked, cancelled
    FRAME = 3  # FrameError: byte counts do not match the grant
    STALE = 4  # StalePeer: the hello named another incarnation
    VERSION = 5  # ConnectError: wire versions differ
    GONE = 6  # PeerGone: the data path failed under the transfer


class _Msg(msgspec.Struct, tag=True, array_like=True, frozen=True):
    pass


class PeerInfo(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """What a peer needs to reach a transport (the descriptor's ``extra``)."""

    version: int
    address: bytes  # the UCX worker address
    pidns: str  # /proc/self/ns/pid target: pid checks only within one pid namespace
    start: int  # process start time (clock ticks since boot): pid reuse guard


class Hello(_Msg):
    version: int
    to: str  # the receiver incarnation the sender expects
    frm: str  # the sender's incarnation
    address: bytes  # the sender's worker address, so the receiver can answer
    key: int  # tag key the receiver uses for messages to the sender
    pid: int
    host_id: str
    pidns: str
    start: int


class HelloOk(_Msg):
    frm: str
    key: int  # tag key the sender uses for messages to the receiver


class HelloNo(_Msg):
    code: int
    reason: str


class Ask(_Msg):
    seq: int
    tid: str
    segs: bytes  # pack_segments of the destination (addr, length) pairs, in send order
    notify: bytes


class AskNo(_Msg):
    seq: int
    code: int
    reason: str


class Fin(_Msg):
    seq: int
    nbytes: int


class Nack(_Msg):
    seq: int
    code: int
    reason: str


class Cancel(_Msg):
    seq: int
    posted: int  # segments sent before the failure
    reason: str


class Ping(_Msg):
    pass


class Pong(_Msg):
    pass


class Bye(_Msg):
    reason: str


Message = Hello | HelloOk | HelloNo | Ask | AskNo | Fin | Nack | Cancel | Ping | Pong | Bye

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(Message)  # type: ignore[arg-type]
_info_dec = msgspec.msgpack.Decoder(PeerInfo)


def ctrl_tag(key: int) -> int:
    return CTRL | ((key << 40) & KEY_MASK)


def key_of(tag: int) -> int:
    return (tag & KEY_MASK) >> 40


def write_tag(key: int, seq: int) -> int:
    """The tag prefix of write ``seq`` (match it with ``WRITE_MASK``)."""
    return DATA | ((key << 40) & KEY_MASK) | ((seq & _SEQ_MASK) << 24)


def data_tag(key: int, seq: int, index: int) -> int:
    return write_tag(key, seq) | (index & _SEG_MASK)


def key_tag(key: int) -> int:
    """The prefix of every DATA tag from one peer (match it with ``KIND_MASK | KEY_MASK``)."""
    return DATA | ((key << 40) & KEY_MASK)


def message_groups(lens: list[int]) -> list[tuple[int, int]]:
    """The messages of a write whose segments have these lengths, as [start, end) ranges
    of segment indices: a segment of ``STAGE_BELOW`` bytes or more alone; consecutive
    smaller ones packed while their sum stays within ``STAGE_BYTES``; once ``STAGE_LIMIT``
    bytes were packed, the rest alone (what a write holds in buffers on each side)."""
    out: list[tuple[int, int]] = []
    start, run, packed = 0, 0, 0  # the open packed run: its first segment, its bytes; bytes packed
    for i, n in enumerate(lens):
        if n < STAGE_BELOW and packed + run + n > STAGE_LIMIT:
            if start < i:
                out.append((start, i))
            out.extend((j, j + 1) for j in range(i, len(lens)))
            return out
        if n >= STAGE_BELOW:
            packed += run
            if start < i:
                out.append((start, i))
            out.append((i, i + 1))
            start, run = i + 1, 0
        elif run + n > STAGE_BYTES and start < i:
            out.append((start, i))
            start, run, packed = i, n, packed + run
        else:
            run += n
    if start < len(lens):
        out.append((start, len(lens)))
    return out


def split_data_tag(tag: int) -> int:
    """A DATA tag -> its segment index."""
    return tag & _SEG_MASK


def encode(msg: _Msg) -> bytes:
    return MAGIC + _enc.encode(msg)


def decode(data: bytes | memoryview) -> Message:
    """A control message -> message; FrameError when it is not one of ours."""
    if bytes(data[: len(MAGIC)]) != MAGIC:
        raise FrameError(f"foreign control message ({len(data)} bytes, no pdfabric magic)")
    try:
        return _dec.decode(memoryview(data)[len(MAGIC) :])
    except (msgspec.DecodeError, ValueError) as e:  # ValueError: bad UTF-8 in a str field
        raise FrameError(f"malformed control message: {e}") from None


def encode_info(info: PeerInfo) -> bytes:
    return MAGIC + _enc.encode(info)


def decode_info(data: bytes) -> PeerInfo:
    """A descriptor's ``extra`` -> PeerInfo; FrameError when it is not a ucx descriptor."""
    if not data.startswith(MAGIC):
        raise FrameError("descriptor carries no pdfabric UCX worker information")
    try:
        info = _info_dec.decode(memoryview(data)[len(MAGIC) :])
    except (msgspec.DecodeError, ValueError) as e:  # ValueError: bad UTF-8 in a str field
        raise FrameError(f"descriptor's UCX worker information does not decode: {e}") from None
    if not info.address:
        raise FrameError("descriptor carries an empty UCX worker address")
    return info


def pack_segments(segs: np.ndarray) -> bytes:
    """(n, 2) [addr, length] -> little-endian uint64 bytes."""
    return np.ascontiguousarray(segs, dtype="<u8").tobytes()


def unpack_segments(data: bytes) -> np.ndarray:
    """Inverse of ``pack_segments``; FrameError for a truncated table."""
    if len(data) % 16:
        raise FrameError(f"segment table of {len(data)} bytes is not a whole number of (addr, length) pairs")
    return np.frombuffer(data, dtype="<u8").reshape(-1, 2).astype(np.uint64)
