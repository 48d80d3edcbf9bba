"""Per-peer state of the ``ucx`` transport (both roles); owned by the UCX thread except
``Peer.tids``, which ``write`` checks under the transport's lock."""

from __future__ import annotations

import concurrent.futures as cf
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pdfabric.errors import TransportError

from .base import TransferHandle

__all__ = ["Approval", "Peer", "Write", "split_completed", "FULL_SCAN_S"]

#: how often the UCX thread looks at every pending request, not only the leading ones
FULL_SCAN_S = 0.02


@dataclass(eq=False)
class Write:
    """One write on the sender: Ask and segments sent at once, DONE on Fin."""

    seq: int
    handle: TransferHandle
    peer: Peer
    pieces: np.ndarray  # (n, 3) [src, dst, length]; segment i is row i
    segs: bytes
    notify: bytes
    messages: int = 0  # messages the segments travel in (``_ucx_wire.message_groups``)
    staged: list[np.ndarray] = field(default_factory=list)  # packed messages' buffers, until sent


@dataclass(eq=False)
class Approval:
    """A write a peer Asked to make into one grant, until every segment it sent was taken:
    received into the grant, or - once it is ``dead`` (refused, failed) - dropped unread."""

    seq: int
    tid: str
    peer: Peer
    prefix: Any  # UCXXTag of the write's segments (match with WRITE_MASK)
    segs: np.ndarray  # (n, 2) uint64 [addr, length], in the sender's send order
    lens: list[int]
    notify: bytes
    nbytes: int
    got: bytearray  # 1 per message received
    expected: int  # messages the sender sends (fewer after its Cancel)
    groups: list[tuple[int, int]] = field(default_factory=list)  # message i: segments [start, end)
    taken: int = 0  # messages taken off UCX's queue (received or dropped)
    received: int = 0
    outstanding: int = 0  # receives posted, not complete
    dead: bool = False  # refused or failed: the rest of its segments are dropped unread


@dataclass(eq=False)
class Peer:
    """A remote transport, in either role: we write to it, it writes to us, or both."""

    inc: str  # its incarnation
    label: str
    ep: Any  # our UCX endpoint to it
    key_in: int  # it tags control messages to us with this key
    last_heard: float
    key_out: int = 0  # we tag control messages to it with this key (from its Hello/HelloOk)
    last_ping: float = 0.0
    pidfd: int | None = None
    gone: TransportError | None = None
    said_hello: bool = False  # it sent Hello to us: it may Ask
    hello: cf.Future[None] | None = None
    writes: dict[int, Write] = field(default_factory=dict)
    tids: set[str] = field(default_factory=set)  # guarded by the transport's lock
    approvals: dict[int, Approval] = field(default_factory=dict)  # by write seq

    def owes(self) -> bool:
        return bool(self.writes or self.approvals or (self.hello is not None and not self.hello.done()))


def split_completed(items: list[Any], full: bool) -> tuple[list[Any], list[Any]]:
    """(completed, pending) of UCX request items (tuples, the request first).

    UCX completes one endpoint's messages in about the order they were posted, so a step
    takes only the leading run of completed items: O(completions), where looking at every
    pending one each step made a write of n segments cost O(n^2). ``full`` looks at all of
    them (the UCX thread does so every ``FULL_SCAN_S``), so a request that failed behind a
    slow one still surfaces."""
    if full:
        done: list[Any] = []
        still: list[Any] = []
        for x in items:
            (done if x[0].completed else still).append(x)
        return done, still
    k = 0
    for x in items:
        if not x[0].completed:
            break
        k += 1
    return (items[:k], items[k:]) if k else ([], items)
