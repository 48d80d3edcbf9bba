"""Per-peer state of the ``nixl`` transport (both roles); owned by the NIXL thread except
``Peer.tids``, which ``write`` checks under the transport's lock."""

from __future__ import annotations

import concurrent.futures as cf
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pdfabric.errors import TransportError

from ._nixl_dlists import DlistCache, RegSet
from .base import TransferHandle

__all__ = ["Peer", "Write", "Approval"]


@dataclass(eq=False)
class Write:
    """One write on the sender: Asked, prepared while the answer travels, posted on AskOk,
    complete when NIXL reports the WRITE done."""

    seq: int
    handle: TransferHandle
    peer: "Peer"
    pieces: np.ndarray
    segs: bytes
    notify: bytes
    dests: np.ndarray  # the pieces' destinations, sorted and merged: (k, 2) [start, length]
    xfer: Any = None
    own_lists: tuple[Any, ...] = ()  # prepared only for this write; released with it


@dataclass(eq=False)
class Approval:
    """A write we allowed a peer to make into one grant, until its Done."""

    tid: str
    token: object
    nbytes: int
    digest: bytes
    offer: bool = False  # made by an Offer, before any Ask
    begun: bool = False  # an offer its peer said it is writing with (Begin)
    withdrawing: bool = False  # Withdraw sent; the token ends on Withdrawn, Done or Cancel

    @property
    def writing(self) -> bool:
        """A write is known to be under way: asked for, or an offer in use."""
        return not self.offer or self.begun


@dataclass(eq=False)
class Peer:
    """A remote agent, in either role: we write to it, it writes to us, or both."""

    agent: str
    label: str
    last_heard: float
    last_ping: float = 0.0
    pidfd: int | None = None
    bell: str = ""  # its doorbell, when it can be rung from here
    gone: TransportError | None = None
    said_hello: bool = False  # it wrote Hello to us: it may Ask
    regs: RegSet | None = None  # its registrations, when we write to it
    lists: DlistCache | None = None
    hello: cf.Future[None] | None = None
    writes: dict[int, Write] = field(default_factory=dict)
    tids: set[str] = field(default_factory=set)  # guarded by the transport's lock
    approved: dict[int, Approval] = field(default_factory=dict)
    offers: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # its offers to us: tid -> (seq, segs)
    known_epoch: int = -1  # our registrations it knows (receiver side)
    incarnation: str = ""  # its transport's incarnation, from its Hello (receiver side)
    offers_ok: bool = True  # sender side: False after an offer whose metadata would not load

    def owes(self) -> bool:
        """It owes us an answer: its silence counts toward ``peer_timeout_s`` (offers it
        has not taken up do not: most are never used)."""
        return bool(
            self.writes
            or any(a.writing or a.withdrawing for a in self.approved.values())
            or (self.hello is not None and not self.hello.done())
        )
