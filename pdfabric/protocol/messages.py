"""Typed control-plane messages between a consumer (decode) worker and a producer
(prefill) worker.

Every message is a msgspec ``Struct`` tagged by its class name and encoded with
msgpack; nothing is ever unpickled. ``decode`` refuses unknown tags, unknown fields and
wrong types with a ``ProtocolError`` that says what came and where.

Conversation (one consumer worker -> one producer worker, a ZMQ DEALER -> ROUTER link)::

    D -> P  Hello(wire_version, engine, fingerprint, layout, data)   once per link
    P -> D  HelloOk(engine, fingerprint, writer)  |  Refuse(reason)
    D -> P  Grant(transfer_id, blocks, num_tokens, ...)                per request
    D -> P  Heartbeat(transfer_ids)                                    while D waits to grant
    P -> D  Abort(transfer_id, reason)     P cannot serve it (unknown, expired, aborted)
    D -> P  Abort(transfer_id, reason)     D gave up (abort, timeout)
    *  -> *  Status()  ->  StatusReply(counters)                        leak checks, probes

Data never travels here: the producer pushes it through the transport, one write per
layer (sub-transfer ``<transfer_id>#<layer>``), each write's notification a ``Done``.

WIRE_VERSION history (bump on any change a peer of the previous version would misread):

1. First version: Hello/HelloOk/Refuse, Grant, Abort, Heartbeat, Status/StatusReply,
   Done as the data-path notification.
2. ``Grant.staging``: the address of the consumer's host staging slot (0: none).
3. ``HelloOk.writer``: the incarnation of the producer's transport, so the consumer can
   name the expected writer of its grants (``Transport.grant(..., writer=)``; nixl offers
   a grant to that peer only).
"""

from __future__ import annotations

from typing import Union

import msgspec

from pdfabric.errors import FabricError

__all__ = [
    "WIRE_VERSION",
    "ProtocolError",
    "LayoutInfo",
    "Hello",
    "HelloOk",
    "Refuse",
    "Grant",
    "Abort",
    "Heartbeat",
    "Status",
    "StatusReply",
    "Done",
    "Message",
    "encode",
    "decode",
    "sub_transfer_id",
]

WIRE_VERSION = 3


class ProtocolError(FabricError):
    """A control message that could not be read or was not allowed (counted, refused)."""

    status_hint = 502


class _Msg(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag=True):
    pass


class LayoutInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where a consumer's KV cache lives, so the producer can address its blocks."""

    geometry: dict[str, str | int]
    layer_addrs: list[int]
    block_stride: int
    segment_stride: int


class Hello(_Msg):
    wire_version: int
    engine: str
    fingerprint: dict[str, str | int]
    layout: LayoutInfo
    data: bytes  # the consumer transport's PeerDescriptor, msgpack-encoded


class HelloOk(_Msg):
    engine: str
    fingerprint: dict[str, str | int]
    writer: str  # the producer transport's incarnation (its PeerDescriptor's)


class Refuse(_Msg):
    """Reply to a Hello the producer will not accept (version, fingerprint, transport)."""

    reason: str


class Grant(_Msg):
    """The consumer reserved ``blocks`` for ``transfer_id``: push the prompt's KV blocks
    ``first_block ..`` into them, one write per layer. ``num_tokens`` is the prompt
    length (checked against the producer's); the blocks cover its first
    ``num_tokens - 1`` tokens - the consumer recomputes the last one to sample from it.

    ``staging``: 0 when the grant covers the blocks themselves; else the consumer stages
    (``pdfabric.connector.staging``) and granted, instead, the host slot at this address
    that holds ``len(blocks)`` blocks of every layer in staging order."""

    transfer_id: str
    engine: str
    blocks: list[int]
    first_block: int
    num_tokens: int
    timeout_s: float
    staging: int = 0


class Abort(_Msg):
    """Stop a transfer. ``rehello``: the producer lost this link's handshake (it
    restarted); the consumer says Hello again and repeats the grant once."""

    transfer_id: str
    reason: str
    rehello: bool = False


class Heartbeat(_Msg):
    """The consumer still wants these transfers: extend the producer's leases."""

    transfer_ids: list[str]


class Status(_Msg):
    pass


class StatusReply(_Msg):
    role: str
    engine: str
    counters: dict[str, int]
    open_transfers: list[str]
    fingerprint: dict[str, str | int] = {}
    # the latest received transfers: [transfer_id, bytes, seconds from grant to last byte]
    recent: list[tuple[str, int, float]] = []
    # the latest pushed transfers: [transfer_id, bytes, seconds on the wire (sum of layer writes)]
    pushed: list[tuple[str, int, float]] = []


class Done(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    """Notification carried by each layer write (not a control message)."""

    transfer_id: str
    layer: int
    nbytes: int


Message = Union[Hello, HelloOk, Refuse, Grant, Abort, Heartbeat, Status, StatusReply]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(msg: Message | Done) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes) -> Message:
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError as e:
        raise ProtocolError(f"unreadable control message: {e}") from None


def decode_done(data: bytes) -> Done:
    try:
        return msgspec.msgpack.decode(data, type=Done)
    except msgspec.DecodeError as e:
        raise ProtocolError(f"unreadable transfer notification: {e}") from None


def sub_transfer_id(transfer_id: str, layer: int) -> str:
    """The transport-level id of one layer's write of a transfer."""
    return f"{transfer_id}#{layer}"
