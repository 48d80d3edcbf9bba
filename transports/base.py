"""The transport interface every data path implements.

A transport moves bytes from registered memory of a *sender* into memory that a
*receiver* granted for one transfer id. The same object can play both roles.

Receiver::

    t.register([region, ...])            # memory peers may write into (whole KV tensors)
    t.grant(tid, [dst regions])          # allow exactly these bytes for this transfer
    result = t.wait_recv(tid, timeout)   # RecvResult(nbytes, notify) or a typed error
    t.revoke(tid)                        # stop accepting writes for tid (abort)

Sender::

    peer = t.connect(remote.descriptor())
    h = t.write(peer, TransferPlan(tid, src, dst), notify=b"...")
    t.wait(h, timeout)                   # returns once the receiver has the bytes in place

Contract:
- Buffers are owned by the caller. A registered or granted region must stay alive and
  must not be freed until ``close()`` (registered) or until the transfer ends (granted).
- ``write`` never blocks on the network: it validates the plan, queues it and returns a
  ``TransferHandle``. ``wait`` blocks at most ``timeout`` seconds and raises
  ``TransferTimeout``; every other failure raises a ``TransportError`` subclass.
  A handle is DONE only when the receiver acknowledged that every byte landed.
- A receiver never writes outside what it granted for that transfer id: a frame for an
  unknown id or outside the grant is refused (``GrantRefused`` on both ends), the
  connection closed, and the rejection counted in ``rejections``.
- All methods are thread safe. ``close()`` fails every pending transfer with
  ``TransportClosed`` and releases sockets, threads and registrations; it is idempotent.
"""

from __future__ import annotations

import enum
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, NewType, Sequence

import msgspec
import numpy as np

from pdfabric.errors import (
    TransferAborted,
    TransferTimeout,
    TransportClosed,
    TransportError,
)
from pdfabric.memory import Region, RegionArray, region_columns

__all__ = [
    "TransferId",
    "PeerId",
    "Status",
    "Capabilities",
    "PeerDescriptor",
    "TransferPlan",
    "TransferHandle",
    "RecvResult",
    "Rejection",
    "Transport",
]

TransferId = NewType("TransferId", str)
PeerId = NewType("PeerId", str)

MAX_TRANSFER_ID_BYTES = 128
MAX_NOTIFY_BYTES = 60 * 1024


class Status(enum.Enum):
    """State of one transfer, on either side."""

    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"
    ABORTED = "aborted"

    @property
    def finished(self) -> bool:
        return self is not Status.PENDING


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a transport can do; callers branch on these, never on the transport's name."""

    push: bool = True
    pull: bool = False
    device_memory: bool = False
    same_host_only: bool = False
    same_process_only: bool = False
    notifications: bool = True
    # a write the receiver approved ahead of time (nixl's offers) can complete with the
    # receiver's process stopped: one-sided, no receiver code runs while the bytes move
    one_sided: bool = False


class PeerDescriptor(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Everything a peer needs to reach a transport; travels inside the handshake.

    ``incarnation`` is random per transport object: a descriptor from before a restart
    names an incarnation that no longer exists and is refused with ``StalePeer``.
    """

    transport: str
    incarnation: str
    host: str
    pid: int
    endpoint: str
    host_id: str = ""
    extra: bytes = b""


_SMALL = 8  # plans of at most this many Region pairs are checked in plain Python


def _small_columns(tid: str, src: Sequence[Region], dst: Sequence[Region]) -> np.ndarray:
    """``TransferPlan.columns`` of a few Region pairs, with the checks of the array path:
    numpy's per-call overhead is most of a one-block plan's cost otherwise."""
    rows = []
    for i, (s, d) in enumerate(zip(src, dst)):
        for what, r in (("source", s), ("destination", d)):
            if not (0 <= r.addr < 1 << 64 and 0 <= r.length < 1 << 64):
                raise ValueError(f"plan {tid}: {what} of pair {i} has address {r.addr}, length {r.length} (out of range)")
        if s.length != d.length:
            raise ValueError(f"plan {tid}: pair {i} has source length {s.length}, destination {d.length}")
        rows.append((s.addr, d.addr, s.length))
    return np.array(rows, dtype=np.uint64).reshape(-1, 3)


@dataclass(frozen=True, slots=True)
class TransferPlan:
    """Pairs of equal-length (source, destination) regions for one transfer.

    Sources are addresses in the sender's registered memory, destinations are addresses
    in the receiver's memory as the receiver granted them. ``src`` and ``dst`` are any
    sequences of regions; a ``RegionArray`` (or ``TransferPlan.from_arrays``) skips the
    Python object per block, which matters at thousands of blocks a transfer. ``columns``
    is the plan as an (n, 3) uint64 array [src addr, dst addr, length], made once here.
    """

    transfer_id: TransferId
    src: Sequence[Region]
    dst: Sequence[Region]
    columns: np.ndarray = field(init=False, repr=False, compare=False)
    nbytes: int = field(init=False, repr=False, compare=False)  # bytes the plan moves

    def __post_init__(self) -> None:
        tid = self.transfer_id
        if not tid or len(tid.encode()) > MAX_TRANSFER_ID_BYTES:
            raise ValueError(f"transfer id must be 1-{MAX_TRANSFER_ID_BYTES} bytes, got {tid!r}")
        if len(self.src) != len(self.dst):
            raise ValueError(
                f"plan {tid}: {len(self.src)} source regions but {len(self.dst)} destinations"
            )
        if not isinstance(self.src, RegionArray) and not isinstance(self.dst, RegionArray) and len(self.src) <= _SMALL:
            cols = _small_columns(tid, self.src, self.dst)
            object.__setattr__(self, "columns", cols)
            object.__setattr__(self, "nbytes", sum(r.length for r in self.src))
            return
        sa, sl = region_columns(self.src, f"plan {tid}: source of pair")
        da, dl = region_columns(self.dst, f"plan {tid}: destination of pair")
        bad = np.flatnonzero(sl != dl)
        if len(bad):
            i = int(bad[0])
            raise ValueError(f"plan {tid}: pair {i} has source length {int(sl[i])}, destination {int(dl[i])}")
        object.__setattr__(self, "columns", np.stack([sa, da, sl], axis=1) if len(sa) else np.empty((0, 3), np.uint64))
        object.__setattr__(self, "nbytes", int(sl.sum()))

    @classmethod
    def from_pairs(cls, transfer_id: str, pairs: Sequence[tuple[Region, Region]]) -> "TransferPlan":
        return cls(TransferId(transfer_id), tuple(p[0] for p in pairs), tuple(p[1] for p in pairs))

    @classmethod
    def from_arrays(cls, transfer_id: str, src_addrs: Any, dst_addrs: Any, lengths: Any) -> "TransferPlan":
        """A plan from three columns (block i: ``lengths[i]`` bytes from ``src_addrs[i]`` to
        ``dst_addrs[i]``)."""
        return cls(TransferId(transfer_id), RegionArray(src_addrs, lengths), RegionArray(dst_addrs, lengths))


@dataclass(frozen=True, slots=True)
class RecvResult:
    """A completed receive: how many bytes landed and the sender's notification."""

    transfer_id: TransferId
    nbytes: int
    notify: bytes


@dataclass(frozen=True, slots=True)
class Rejection:
    """A write the receiver refused, kept for metrics and tests."""

    transfer_id: str
    peer: str
    reason: str


class Latch:
    """A one-shot ``threading.Event``: ``set`` once, any number of ``wait``s. A bare lock held
    until set, so making one costs a C lock, not the Condition an Event builds in Python
    (a handle or a grant is made per transfer; with one small block that showed)."""

    __slots__ = ("_gate", "_set")

    def __init__(self) -> None:
        self._gate = threading.Lock()
        self._gate.acquire()
        self._set = False

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if self._set:
            return
        self._set = True
        try:
            self._gate.release()
        except RuntimeError:  # a racing set() released it first
            pass

    def wait(self, timeout: float | None = None) -> bool:
        """True once set; False when ``timeout`` passed first (None: no limit)."""
        if self._set:
            return True
        if not self._gate.acquire(True, -1 if timeout is None else max(0.0, timeout)):
            return self._set
        self._gate.release()  # let the next waiter through
        return True


@dataclass(eq=False)
class TransferHandle:
    """Completion of one ``write``. Thread safe; resolved exactly once."""

    transfer_id: TransferId
    peer: PeerId
    nbytes: int
    transport: str
    started: float = field(default_factory=time.perf_counter)
    finished_at: float | None = None
    _status: Status = Status.PENDING
    _error: TransportError | None = None
    _event: Latch = field(default_factory=Latch)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def status(self) -> Status:
        return self._status

    @property
    def error(self) -> TransportError | None:
        return self._error

    @property
    def seconds(self) -> float | None:
        return None if self.finished_at is None else self.finished_at - self.started

    def resolve(self, status: Status, error: TransportError | None = None) -> bool:
        """Set the final state; later calls are ignored. Returns True if this call won."""
        with self._lock:
            if self._status.finished:
                return False
            self._status = status
            self._error = error
            self.finished_at = time.perf_counter()
        self._event.set()
        return True

    def wait_done(self, timeout: float) -> bool:
        """Block until finished or ``timeout``; True when finished. Never raises."""
        return self._event.wait(timeout)

    def wait(self, timeout: float | None) -> None:
        """Block until finished; raise the transfer's error, or TransferTimeout."""
        if not self._event.wait(timeout):
            raise TransferTimeout(
                f"no completion after {timeout:.3g}s ({self.nbytes} bytes)",
                transfer_id=self.transfer_id,
                peer=self.peer,
                transport=self.transport,
            )
        if self._status is Status.DONE:
            return
        if self._error is not None:
            raise self._error
        raise TransferAborted(
            "transfer aborted", transfer_id=self.transfer_id, peer=self.peer, transport=self.transport
        )


class Transport(ABC):
    """A data path. Subclasses implement the sender side and feed the shared receiver
    state (``pdfabric.transports._state.GrantTable``) from their wire."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]

    #: default for ``wait``/``wait_recv`` when the caller passes no timeout
    transfer_timeout_s: float = 30.0

    # -- memory ------------------------------------------------------------------------
    @abstractmethod
    def register(self, regions: Sequence[Region]) -> None:
        """Make regions usable as write sources and grant destinations."""

    # -- peers -------------------------------------------------------------------------
    @abstractmethod
    def descriptor(self) -> PeerDescriptor:
        """What a peer passes to ``connect`` to reach this transport."""

    @abstractmethod
    def connect(self, peer: PeerDescriptor, timeout: float | None = None) -> PeerId:
        """Open (or reuse) the data path to ``peer``; raises ConnectError / StalePeer."""

    # -- sender ------------------------------------------------------------------------
    @abstractmethod
    def write(self, peer: PeerId, plan: TransferPlan, notify: bytes = b"") -> TransferHandle:
        """Queue a push of ``plan`` to ``peer``; ``notify`` reaches the receiver with it."""

    def poll(self, handle: TransferHandle) -> Status:
        return handle.status

    def wait(self, handle: TransferHandle, timeout: float | None = None) -> None:
        handle.wait(self.transfer_timeout_s if timeout is None else timeout)

    # -- receiver ----------------------------------------------------------------------
    @abstractmethod
    def grant(self, transfer_id: str, regions: Sequence[Region], writer: str | None = None) -> None:
        """Allow peers to write exactly ``regions`` for ``transfer_id``.

        ``writer``: the incarnation (``PeerDescriptor.incarnation``) of the peer expected to
        write it, when the caller knows it. A transport that approves writes ahead of time
        (``nixl`` offers) approves it to that peer only; None: to any connected peer. It
        does not restrict who may write: any peer's write is still checked against the
        grant. Transports that approve per write ignore it."""

    @abstractmethod
    def revoke(self, transfer_id: str) -> None:
        """Withdraw a grant; a pending ``wait_recv`` raises TransferAborted."""

    def revoke_many(self, transfer_ids: Sequence[str]) -> None:
        """``revoke`` several grants, returning once none of them is being written. Ending
        them all before waiting on any costs one wait instead of one each (nixl: one
        round trip to the holders of their offers)."""
        for tid in transfer_ids:
            self.revoke(tid)

    @abstractmethod
    def wait_recv(self, transfer_id: str, timeout: float | None = None) -> RecvResult:
        """Block until the transfer's bytes are all in place; the grant is then released."""

    @abstractmethod
    def poll_recv(self, transfer_id: str) -> Status:
        """State of a granted transfer without blocking."""

    def recv_changes(self) -> int:
        """A counter of finished receives (any outcome); see ``wait_recv_change``."""
        return 0

    def wait_recv_change(self, seen: int, timeout: float) -> int:
        """Block until ``recv_changes()`` differs from ``seen`` or ``timeout`` passed; returns it.
        Lets an idle receiver sleep instead of polling."""
        time.sleep(timeout)
        return seen

    @abstractmethod
    def recv_progress(self, transfer_id: str) -> tuple[int, int]:
        """(bytes received, bytes granted) for a live grant; (0, 0) when there is none."""

    @property
    @abstractmethod
    def rejections(self) -> list[Rejection]:
        """Writes this receiver refused (unknown id, outside the grant, bad frames)."""

    # -- lifecycle ---------------------------------------------------------------------
    @abstractmethod
    def close(self) -> None:
        """Fail pending transfers, stop threads, close sockets. Idempotent."""

    @property
    @abstractmethod
    def closed(self) -> bool: ...

    def _check_open(self) -> None:
        if self.closed:
            raise TransportClosed("transport is closed", transport=self.name)

    def __enter__(self) -> "Transport":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
