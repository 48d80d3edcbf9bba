"""Receiver and memory bookkeeping shared by every transport.

Theory of operation
-------------------
``MemoryTable`` holds the registered regions of one transport, each with a memoryview made
once at registration, so that the hot path slices views (~100 ns) instead of building a
ctypes array per block. Lookups bisect on region start addresses.

``GrantTable`` is the receiver's state machine, shared by all wire formats:

  Rule 1: bytes land only inside regions granted for that transfer id; ``check_write``
          is called with the destination of every segment *before* a byte is read from
          the wire, and refuses (``GrantRefused``) otherwise.
  Rule 2: a transfer is DONE when every stream the sender used has reported its END and
          the bytes counted per stream equal what the sender announced; anything else
          (missing bytes, a stream that lied) is a ``FrameError``.
  Rule 3: a connection that dies fails every unfinished transfer it carried bytes for,
          with ``PeerGone``; nothing waits for a peer that is gone.
  Rule 4: a finished, failed or revoked grant is forgotten by the data path at once, so
          late writes for it are refused like writes for an unknown id.
"""

from __future__ import annotations

import bisect
import collections
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, Hashable, Sequence

import numpy as np

from pdfabric.errors import (
    FrameError,
    GrantRefused,
    PeerGone,
    RegistrationError,
    TransferAborted,
    TransferTimeout,
    TransportClosed,
    TransportError,
)
from pdfabric.memory import Region, merge_columns, region_columns, view_of

from .base import Latch, Rejection, RecvResult, Status, TransferId

__all__ = ["MemoryTable", "GrantTable", "GrantReceiver", "merge_regions", "first_outside"]

log = logging.getLogger("pdfabric.transports")

_FINISHED_MEMORY = 4096
_LIST_RANGES = 64  # grants of up to this many ranges keep them as Python ints too


def first_outside(starts: np.ndarray, ends: np.ndarray, addrs: np.ndarray, lens: np.ndarray) -> int:
    """Index of the first (addr, len) not inside one of the sorted disjoint [start, end)
    ranges, or -1 when all are inside."""
    n = len(addrs)
    if n == 0:
        return -1
    if len(starts) == 0:
        return 0
    if n <= 8 and len(starts) <= _LIST_RANGES:  # numpy's per-call overhead dominates
        s_list, e_list = starts.tolist(), ends.tolist()
        for k, (a, ln) in enumerate(zip(addrs.tolist(), lens.tolist())):
            i = bisect.bisect_right(s_list, a) - 1
            if i < 0 or a + ln > e_list[i]:
                return k
        return -1
    i = np.searchsorted(starts, addrs, side="right").astype(np.int64) - 1
    end = ends[np.maximum(i, 0)]
    # lens <= end - addrs, not addrs + lens <= end: uint64 addition could wrap around
    ok = (i >= 0) & (addrs <= end) & (lens <= end - np.minimum(addrs, end))
    bad = np.flatnonzero(~ok)
    return int(bad[0]) if len(bad) else -1


def merge_regions(regions: Sequence[Region]) -> list[Region]:
    """Sort and merge overlapping or touching regions (``merge_columns`` on Region objects)."""
    starts, ends = merge_columns(*region_columns(regions))
    return [Region(a, e - a) for a, e in zip(starts.tolist(), ends.tolist())]


class MemoryTable:
    """Registered memory of one transport, with views for zero-copy slicing."""

    def __init__(self, transport: str) -> None:
        self._transport = transport
        self._lock = threading.Lock()
        # (starts, entries, start array, end array) swapped as one tuple by add(), so
        # readers need no lock
        self._index: tuple[list[int], list[tuple[Region, memoryview]], np.ndarray, np.ndarray] = (
            [], [], np.empty(0, np.uint64), np.empty(0, np.uint64)
        )

    def add(self, regions: Sequence[Region]) -> None:
        """Register regions; overlapping or touching ones merge into one."""
        for r in regions:
            if r.length <= 0:
                raise RegistrationError(
                    f"cannot register an empty region at {r.addr:#x}", transport=self._transport
                )
        with self._lock:
            merged = merge_regions([e[0] for e in self._index[1]] + list(regions))
            old = {e[0]: e[1] for e in self._index[1]}
            entries = [(r, old.get(r) or view_of(r)) for r in merged]
            self._index = (
                [r.addr for r in merged],
                entries,
                np.array([r.addr for r in merged], dtype=np.uint64),
                np.array([r.end for r in merged], dtype=np.uint64),
            )

    def regions(self) -> list[Region]:
        return [e[0] for e in self._index[1]]

    def _find(self, addr: int, length: int) -> tuple[Region, memoryview] | None:
        starts, entries = self._index[0], self._index[1]
        i = bisect.bisect_right(starts, addr) - 1
        if i >= 0 and i < len(entries) and entries[i][0].contains(addr, length):
            return entries[i]
        return None

    def contains(self, addr: int, length: int) -> bool:
        return self._find(addr, length) is not None

    def first_outside(self, addrs: np.ndarray, lens: np.ndarray) -> int:
        """Index of the first (addr, len) not inside one registered region; -1 when none."""
        return first_outside(self._index[2], self._index[3], addrs, lens)

    def check(self, addrs: np.ndarray, lens: np.ndarray) -> None:
        """Vectorized: RegistrationError unless every (addr, len) is inside one region."""
        bad = first_outside(self._index[2], self._index[3], addrs, lens)
        if bad >= 0:
            raise RegistrationError(
                f"{int(lens[bad])} bytes at {int(addrs[bad]):#x} are not inside registered memory; "
                "register the tensor (or buffer) before using it in a transfer",
                transport=self._transport,
            )

    def view(self, addr: int, length: int) -> memoryview:
        """Writable view of registered bytes; RegistrationError when not registered."""
        found = self._find(addr, length)
        if found is None:
            raise RegistrationError(
                f"{length} bytes at {addr:#x} are not inside registered memory; "
                "register the tensor (or buffer) before using it in a transfer",
                transport=self._transport,
            )
        region, mv = found
        off = addr - region.addr
        return mv[off : off + length]

    def clear(self) -> None:
        with self._lock:
            self._index = ([], [], np.empty(0, np.uint64), np.empty(0, np.uint64))


@dataclass(eq=False)
class _Grant:
    tid: TransferId
    starts: np.ndarray
    ends: np.ndarray
    granted: int
    received: int = 0
    per_conn: dict[Hashable, int] = field(default_factory=dict)
    stream_ends: dict[Hashable, int] = field(default_factory=dict)
    notify: bytes = b""
    status: Status = Status.PENDING
    error: TransportError | None = None
    active: int = 0
    writers: set[Hashable] = field(default_factory=set)
    event: Latch = field(default_factory=Latch)
    lists: tuple[list[int], list[int]] | None = None  # starts, ends as ints (small checks)
    writer: str | None = None  # the peer expected to write it (Transport.grant), if known

    def __post_init__(self) -> None:
        if len(self.starts) <= _LIST_RANGES:
            self.lists = (self.starts.tolist(), self.ends.tolist())

    def first_outside(self, segs: np.ndarray) -> int:
        if len(segs) > 8:
            return first_outside(self.starts, self.ends, segs[:, 0], segs[:, 1])
        if self.lists is None:  # a large grant checked a few segments at a time (ucx: one
            self.lists = (self.starts.tolist(), self.ends.tolist())  # per message): once
        s_list, e_list = self.lists  # a few segments: bisect on ints, one numpy call in all
        for k, (a, ln) in enumerate(segs.tolist()):
            i = bisect.bisect_right(s_list, a) - 1
            if i < 0 or a + ln > e_list[i]:
                return k
        return -1


class GrantTable:
    """The receiver side of every transport (see the module docstring's rules)."""

    def __init__(
        self,
        transport: str,
        memory: MemoryTable,
        kill_conn: Callable[[Hashable], None] | None = None,
        drain_s: float = 1.0,
        on_ended: Callable[[str, object], None] | None = None,
    ) -> None:
        self._transport = transport
        self._memory = memory
        self._kill_conn = kill_conn
        self._on_ended = on_ended  # a grant ended other than DONE (revoked, failed, closed)
        self._drain_s = drain_s
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._grants: dict[str, _Grant] = {}
        self._finished: collections.OrderedDict[str, Status] = collections.OrderedDict()
        self._rejections: collections.deque[Rejection] = collections.deque(maxlen=_FINISHED_MEMORY)
        self.rejected_total = 0
        self._closed = False
        self._changes = 0  # grants finished so far, for wait_change

    # -- owner API ---------------------------------------------------------------------
    def grant(self, tid: str, regions: Sequence[Region], writer: str | None = None) -> None:
        starts, ends = merge_columns(*region_columns(regions, f"grant {tid}: region"))
        bad = self._memory.first_outside(starts, ends - starts)
        if bad >= 0:
            raise RegistrationError(
                f"grant {tid}: {int(ends[bad] - starts[bad])} bytes at {int(starts[bad]):#x} are outside registered memory",
                transfer_id=tid,
                transport=self._transport,
            )
        with self._lock:
            if self._closed:
                raise TransportClosed("transport is closed", transport=self._transport)
            if tid in self._grants:
                raise ValueError(f"transfer {tid} is already granted")
            self._finished.pop(tid, None)
            self._grants[tid] = _Grant(TransferId(tid), starts, ends, int((ends - starts).sum()), writer=writer)

    def revoke(self, tid: str) -> None:
        """Withdraw the grant whatever its state; a waiter gets TransferAborted.

        Returns once no write into the grant's memory is in progress (see ``_drain``)."""
        self.revoke_many([tid])

    def revoke_many(self, tids: Sequence[str]) -> None:
        """``revoke`` each of ``tids``: all of them end first, then each is drained, so
        their writers are told (and answer) together."""
        ended = []
        for tid in tids:
            with self._lock:
                g = self._grants.get(tid)
            err = TransferAborted("grant revoked", transfer_id=tid, transport=self._transport)
            self._finish(tid, Status.ABORTED, err)
            with self._lock:
                if self._grants.get(tid) is g:
                    self._grants.pop(tid, None)
            if g is not None:
                ended.append(g)
        for g in ended:
            self._drain(g)

    def _drain(self, g: _Grant) -> None:
        """Return only when no write into ``g`` is open: a write on the wire gets
        ``drain_s`` to finish, then its connection is cut and we wait until it stopped.
        Every path that hands a grant's memory back to its owner goes through here."""
        with self._lock:
            if self._idle.wait_for(lambda: g.active == 0, self._drain_s):
                return
            stuck = list(g.writers)
        for conn in stuck:
            if self._kill_conn is not None:
                self._kill_conn(conn)
        with self._lock:
            while not self._idle.wait_for(lambda: g.active == 0, 10 * self._drain_s):
                log.error("grant %s: a write is still open after its connection was cut; waiting", g.tid)

    def wait(self, tid: str, timeout: float) -> RecvResult:
        with self._lock:
            g = self._grants.get(tid)
            if g is None:
                done = self._finished.get(tid)
                raise TransferAborted(
                    f"no grant for transfer (already {done.value})" if done else "no grant for transfer",
                    transfer_id=tid,
                    transport=self._transport,
                )
        if not g.event.wait(timeout):
            raise TransferTimeout(
                f"received {g.received} of {g.granted} granted bytes in {timeout:.3g}s",
                transfer_id=tid,
                transport=self._transport,
            )
        with self._lock:
            if self._grants.get(tid) is g:  # the id may have been granted anew meanwhile
                del self._grants[tid]
        self._drain(g)  # a failed transfer may still have another stream writing into it
        if g.status is Status.DONE:
            return RecvResult(g.tid, g.received, g.notify)
        assert g.error is not None
        raise g.error

    @property
    def changes(self) -> int:
        """How many grants finished (any way) so far."""
        return self._changes

    def wait_change(self, seen: int, timeout: float) -> int:
        """Block until a grant finishes after ``changes`` read ``seen``, or ``timeout``."""
        with self._lock:
            self._idle.wait_for(lambda: self._changes != seen, timeout)
            return self._changes

    def progress(self, tid: str) -> tuple[int, int]:
        """(bytes received, bytes granted) of a live grant; (0, 0) when there is none."""
        with self._lock:
            g = self._grants.get(tid)
            return (g.received, g.granted) if g is not None else (0, 0)

    def poll(self, tid: str) -> Status:
        with self._lock:
            g = self._grants.get(tid)
            if g is not None:
                return g.status
            done = self._finished.get(tid)
        if done is None:
            raise TransferAborted("no grant for transfer", transfer_id=tid, transport=self._transport)
        return done

    @property
    def rejections(self) -> list[Rejection]:
        with self._lock:
            return list(self._rejections)

    def pending(self) -> list[str]:
        with self._lock:
            return [t for t, g in self._grants.items() if not g.status.finished]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            tids = list(self._grants)
        for tid in tids:
            self._finish(tid, Status.ABORTED, TransportClosed("transport closed", transfer_id=tid))

    # -- wire API (called by the transport's receive loop) ---------------------------------
    def begin_write(self, tid: str, segments: np.ndarray, peer: str, conn: Hashable) -> object:
        """Rule 1: refuse unless every [addr, length] row of ``segments`` (an (n, 2) uint64
        array) lies inside the live grant for ``tid``.

        Returns a token for ``end_write``; while a write is open, ``revoke`` waits for it
        (and cuts its connection if it stalls), so freed memory is never written."""
        with self._lock:
            g = self._grants.get(tid)
            if g is not None and not g.status.finished:
                bad = g.first_outside(segments)
                if bad < 0:
                    g.active += 1
                    g.writers.add(conn)
                    return g
        if g is None or g.status.finished:
            state = self._finished.get(tid)
            self.reject(tid, peer, f"transfer already {state.value}" if state else "unknown transfer id")
        addr, length = int(segments[bad, 0]), int(segments[bad, 1])
        self.reject(tid, peer, f"write of {length} bytes at {addr:#x} is outside the grant")
        raise AssertionError("unreachable")

    def live(self, tid: str) -> tuple[object, np.ndarray, str | None] | None:
        """(token, (n, 2) [addr, length] ranges, expected writer) of the live grant ``tid``;
        None when there is none. The token is what ``hold`` takes and ``on_ended`` names."""
        with self._lock:
            g = self._grants.get(tid)
            if g is None or g.status.finished:
                return None
            return g, np.stack([g.starts, g.ends - g.starts], axis=1), g.writer

    def hold(self, token: object, conn: Hashable) -> bool:
        """Open a write for ``conn`` over the whole grant ``token`` (from ``live``) - an
        approval made before the writer asks (nixl's offers); False when that grant has
        ended meanwhile. Nothing is refused or counted: the caller offers what exists.
        The write ends with ``end_write`` like any other."""
        g = token
        assert isinstance(g, _Grant)
        with self._lock:
            if g.status.finished or self._grants.get(g.tid) is not g:
                return False
            g.active += 1
            g.writers.add(conn)
            return True

    @staticmethod
    def cancelled(token: object) -> bool:
        """True once the grant behind ``token`` finished (failed, revoked): stop copying."""
        assert isinstance(token, _Grant)
        return token.status.finished

    def end_write(self, token: object, conn: Hashable, n: int) -> None:
        g = token
        assert isinstance(g, _Grant)
        with self._lock:
            g.active -= 1
            g.received += n
            g.per_conn[conn] = g.per_conn.get(conn, 0) + n
            if g.active == 0:
                g.writers.clear()
                self._idle.notify_all()

    def record(self, rejection: Rejection) -> None:
        """Count a refusal that is not tied to a grant (a malformed frame)."""
        with self._lock:
            self._rejections.append(rejection)
            self.rejected_total += 1
        log.warning("refused frame: %s [transport=%s peer=%s]", rejection.reason, self._transport, rejection.peer)

    def reject(self, tid: str, peer: str, reason: str) -> None:
        """Record a refusal, fail the grant it was aimed at (if live), and raise it.

        The caller closes the connection; the receiver's waiter learns at once instead of
        timing out on bytes that will never come."""
        with self._lock:
            self._rejections.append(Rejection(tid, peer, reason))
            self.rejected_total += 1
        log.warning("refused write: %s [transport=%s peer=%s transfer=%s]", reason, self._transport, peer, tid)
        err = GrantRefused(reason, transfer_id=tid, peer=peer, transport=self._transport)
        self._finish(tid, Status.FAILED, err)
        raise err

    def stream_end(
        self, tid: str, conn: Hashable, stream_bytes: int, nstreams: int, total: int, notify: bytes
    ) -> TransportError | None:
        """A sender stream finished its part of ``tid``; complete when all have (Rule 2).

        Returns the error to send back to that stream, or None to acknowledge it."""
        with self._lock:
            g = self._grants.get(tid)
            if g is None or g.status is Status.ABORTED:
                return TransferAborted("receiver no longer holds a grant", transfer_id=tid)
            if g.status.finished:
                return g.error
            got = g.per_conn.get(conn, 0)
            bad = None
            if got != stream_bytes:
                bad = f"stream announced {stream_bytes} bytes but {got} arrived"
            elif total != g.granted:
                bad = f"sender announced {total} bytes; {g.granted} were granted"
            g.stream_ends[conn] = stream_bytes
            if notify:
                g.notify = notify
            complete = bad is None and len(g.stream_ends) >= nstreams and g.received == total
            if bad is None and len(g.stream_ends) >= nstreams and g.received != total:
                bad = f"all {nstreams} streams ended with {g.received} of {total} bytes"
        if bad is not None:
            err = FrameError(bad, transfer_id=tid, transport=self._transport)
            self._finish(tid, Status.FAILED, err)
            return err
        if complete:
            self._finish(tid, Status.DONE, None)
        return None

    def conn_lost(self, conn: Hashable, peer: str, why: str) -> None:
        """Rule 3: fail unfinished transfers that received bytes over ``conn``."""
        with self._lock:
            hit = [t for t, g in self._grants.items() if conn in g.per_conn and not g.status.finished]
        for tid in hit:
            err = PeerGone(f"connection lost mid-transfer: {why}", transfer_id=tid, peer=peer, transport=self._transport)
            self._finish(tid, Status.FAILED, err)

    def fail(self, tid: str, error: TransportError) -> None:
        self._finish(tid, Status.FAILED, error)

    def _finish(self, tid: str, status: Status, error: TransportError | None) -> None:
        with self._lock:
            g = self._grants.get(tid)
            if g is None or g.status.finished:
                return
            g.status, g.error = status, error
            self._finished[tid] = status
            self._changes += 1
            self._idle.notify_all()
            while len(self._finished) > _FINISHED_MEMORY:
                self._finished.popitem(last=False)
            if status is Status.ABORTED:
                self._grants.pop(tid, None)
        g.event.set()
        if status is not Status.DONE and self._on_ended is not None:
            self._on_ended(tid, g)


class GrantReceiver:
    """What every transport does the same way: memory registration (``self._mem``), the
    ``closed`` flag (``self._closed``) and the receiver verbs, served by ``self._grants``."""

    _mem: MemoryTable
    _grants: GrantTable
    _closed: bool
    transfer_timeout_s: float

    @property
    def closed(self) -> bool:
        return self._closed

    def register(self, regions: Sequence[Region]) -> None:
        self._check_open()  # type: ignore[attr-defined]  # from Transport
        self._mem.add(regions)

    def grant(self, transfer_id: str, regions: Sequence[Region], writer: str | None = None) -> None:
        self._check_open()  # type: ignore[attr-defined]  # from Transport
        self._grants.grant(transfer_id, regions, writer)

    def revoke(self, transfer_id: str) -> None:
        self._grants.revoke(transfer_id)

    def revoke_many(self, transfer_ids: Sequence[str]) -> None:
        self._grants.revoke_many(transfer_ids)

    def wait_recv(self, transfer_id: str, timeout: float | None = None) -> RecvResult:
        return self._grants.wait(transfer_id, self.transfer_timeout_s if timeout is None else timeout)

    def poll_recv(self, transfer_id: str) -> Status:
        return self._grants.poll(transfer_id)

    def recv_changes(self) -> int:
        return self._grants.changes

    def wait_recv_change(self, seen: int, timeout: float) -> int:
        return self._grants.wait_change(seen, timeout)

    def recv_progress(self, transfer_id: str) -> tuple[int, int]:
        return self._grants.progress(transfer_id)

    @property
    def rejections(self) -> list[Rejection]:
        return self._grants.rejections
