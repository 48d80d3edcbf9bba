"""Transfer plans -> NIXL prepared descriptor lists and block indices.

Theory of operation
-------------------
NIXL's fast path is ``make_prepped_xfer(op, local_dlist, local_idx, remote_dlist,
remote_idx)``: both descriptor lists are prepared once, a write only names indices. A
plan here is arbitrary (src, dst, length) pieces, so every side's registrations are cut
into *granules* of ``g`` bytes - the largest power of two (at most ``MAX_GRANULE``) that
divides every piece's length and both its offsets inside the registration that holds it.
A piece of ``k * g`` bytes is then ``k`` consecutive indices; NIXL merges consecutive
descriptors back into one transfer descriptor, so a small granule costs index arrays,
not extra network operations.

A prepared list is kept per (side, registrations epoch, memory kind, granule): local
lists once per registration, remote lists once per peer and per peer registration.
A list that would have more than ``MAX_ENTRIES`` descriptors is not built; that write
prepares lists of exactly its own pieces instead (slower per write, bounded memory).

Registrations may overlap or touch (a freed buffer's registration stays until close);
a piece belongs to the newest registration that holds it whole, and a piece that spans
two registrations is split at their boundary.
"""

from __future__ import annotations

import collections
import functools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from pdfabric.errors import RegistrationError

__all__ = ["RegSet", "Mapped", "map_pieces", "granule", "dlist_rows", "block_indices", "DlistCache", "MEM_NAMES"]

MAX_GRANULE = 1 << 20
MAX_ENTRIES = 1 << 19  # descriptors in one prepared list (~50 bytes each in NIXL)
_MAX_CACHED = 8  # prepared lists per side before the oldest is retired
MEM_NAMES = ("DRAM", "VRAM")


@dataclass(frozen=True)
class RegSet:
    """One side's registrations in registration order, as arrays."""

    starts: np.ndarray
    lens: np.ndarray
    kinds: np.ndarray
    devs: np.ndarray
    epoch: int

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence[int]], epoch: int) -> "RegSet":
        a = np.array([list(r) for r in rows], dtype=np.uint64).reshape(-1, 4)
        return cls(a[:, 0].copy(), a[:, 1].copy(), a[:, 2].astype(np.int64), a[:, 3].astype(np.int64), epoch)

    def __len__(self) -> int:
        return len(self.starts)

    @functools.cached_property
    def _by_start(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(order by start, starts in that order) when no two registrations overlap (they
        may touch); None otherwise."""
        order = np.argsort(self.starts, kind="stable")
        st = self.starts[order]
        if len(st) > 1 and bool(np.any(st[1:] < st[:-1] + self.lens[order][:-1])):
            return None
        return order, st

    @functools.cached_property
    def kind(self) -> int | None:
        """The memory kind of every registration, or None when they mix kinds."""
        k = np.unique(self.kinds)
        return int(k[0]) if len(k) == 1 else None

    def locate(self, addrs: np.ndarray, lens: np.ndarray) -> np.ndarray:
        """Per (addr, len): index of the newest registration holding it whole, or -1."""
        by_start = self._by_start
        if by_start is not None and len(self.starts) > 1 and bool(lens.all()):
            # disjoint registrations: only the one starting last at or before addr can hold
            # a non-empty piece - one binary search per piece instead of a pass per registration
            order, st = by_start
            i = np.searchsorted(st, addrs, side="right") - 1
            r = order[np.maximum(i, 0)]
            e = self.starts[r] + self.lens[r]
            ok = (i >= 0) & (addrs <= e) & (lens <= e - np.minimum(addrs, e))
            return np.where(ok, r.astype(np.int64), -1)
        return self._locate_each(addrs, lens)

    def _locate_each(self, addrs: np.ndarray, lens: np.ndarray) -> np.ndarray:
        """``locate`` for any registrations: one pass per registration, newest first."""
        out = np.full(len(addrs), -1, dtype=np.int64)
        for r in range(len(self.starts) - 1, -1, -1):
            s, e = self.starts[r], self.starts[r] + self.lens[r]
            # lens <= e - addrs, written so that uint64 cannot wrap
            m = (out < 0) & (addrs >= s) & (addrs <= e) & (lens <= e - np.minimum(addrs, e))
            out[m] = r
        return out

    def boundaries(self) -> np.ndarray:
        return np.unique(np.concatenate([self.starts, self.starts + self.lens]))


@dataclass(frozen=True)
class Mapped:
    """A plan's pieces placed in both sides' registrations."""

    pieces: np.ndarray  # (n, 3) uint64 [src, dst, len], split at registration boundaries
    src_reg: np.ndarray
    dst_reg: np.ndarray
    src_kind: int
    dst_kind: int


def _split(pieces: np.ndarray, cuts_src: np.ndarray, cuts_dst: np.ndarray) -> np.ndarray:
    """Split each piece at every registration boundary strictly inside it (either side)."""
    out: list[list[int]] = []
    for s, d, n in pieces.tolist():
        offs = {int(c) - s for c in cuts_src if s < c < s + n} | {int(c) - d for c in cuts_dst if d < c < d + n}
        prev = 0
        for o in sorted(offs) + [n]:
            out.append([s + prev, d + prev, o - prev])
            prev = o
    return np.array(out, dtype=np.uint64).reshape(-1, 3)


def map_pieces(pieces: np.ndarray, local: RegSet, remote: RegSet) -> Mapped:
    """Place [src, dst, len] pieces in local (src) and remote (dst) registrations;
    RegistrationError names the first piece that no registration holds."""
    src_reg = local.locate(pieces[:, 0], pieces[:, 2])
    dst_reg = remote.locate(pieces[:, 1], pieces[:, 2])
    bad = (src_reg < 0) | (dst_reg < 0)
    if bad.any():  # pieces across two registrations: cut them at the boundaries
        fixed = _split(pieces[bad], local.boundaries(), remote.boundaries())
        pieces = np.concatenate([pieces[~bad], fixed])
        src_reg = local.locate(pieces[:, 0], pieces[:, 2])
        dst_reg = remote.locate(pieces[:, 1], pieces[:, 2])
    for side, reg, col in (("source", src_reg, 0), ("destination", dst_reg, 1)):
        miss = np.flatnonzero(reg < 0)
        if len(miss):
            i = int(miss[0])
            whose = "this transport's" if col == 0 else "the peer's"
            raise RegistrationError(
                f"{side} {int(pieces[i, 2])} bytes at {int(pieces[i, col]):#x} are not inside {whose} "
                "NIXL-registered memory; register the buffer before using it in a transfer"
            )
    kinds = []
    for side, regs, reg in (("source", local, src_reg), ("destination", remote, dst_reg)):
        if regs.kind is not None:  # one kind of memory registered: nothing to look at
            kinds.append(regs.kind)
            continue
        k = np.unique(regs.kinds[reg])
        if len(k) != 1:
            raise RegistrationError(f"a write must not mix host (DRAM) and device (VRAM) memory on its {side} side")
        kinds.append(int(k[0]))
    return Mapped(pieces, src_reg, dst_reg, kinds[0], kinds[1])


def granule(m: Mapped, local: RegSet, remote: RegSet) -> int:
    """Largest power of two <= MAX_GRANULE dividing every length and offset of ``m``."""
    p = m.pieces
    v = np.bitwise_or.reduce(
        np.concatenate([p[:, 2], p[:, 0] - local.starts[m.src_reg], p[:, 1] - remote.starts[m.dst_reg]])
    )
    v = int(v) | MAX_GRANULE
    return v & -v


def dlist_rows(regs: RegSet, kind: int, g: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(rows (n, 3) [addr, g, dev] covering every registration of ``kind`` in granules,
    first row index per registration); None when that would be over MAX_ENTRIES rows."""
    counts = np.where(regs.kinds == kind, regs.lens // np.uint64(g), 0).astype(np.int64)
    total = int(counts.sum())
    if total > MAX_ENTRIES:
        return None
    base = np.cumsum(counts) - counts
    within = np.arange(total, dtype=np.int64) - np.repeat(base, counts)
    addrs = np.repeat(regs.starts, counts) + within.astype(np.uint64) * np.uint64(g)
    rows = np.stack([addrs, np.full(total, g, np.uint64), np.repeat(regs.devs, counts).astype(np.uint64)], axis=1)
    return rows, base


def block_indices(base: np.ndarray, regs: RegSet, reg: np.ndarray, addrs: np.ndarray, lens: np.ndarray, g: int) -> np.ndarray:
    """int32 indices of every granule of every piece, in piece order."""
    counts = (lens // np.uint64(g)).astype(np.int64)
    first = base[reg] + ((addrs - regs.starts[reg]) // np.uint64(g)).astype(np.int64)
    before = np.cumsum(counts) - counts
    return (np.repeat(first - before, counts) + np.arange(int(counts.sum()), dtype=np.int64)).astype(np.int32)


class DlistCache:
    """Prepared descriptor lists of one side (local, or one remote agent).

    Owned by the transport's NIXL thread; handles replaced by newer ones are retired and
    released only when no transfer made from them can still be in flight."""

    def __init__(self, agent: Any, target: str) -> None:
        self._agent = agent
        self._target = target  # "" for the local side, else the remote agent's name
        self._lists: collections.OrderedDict[tuple[int, int, int], tuple[Any, np.ndarray]] = collections.OrderedDict()
        self._retired: list[Any] = []

    def get(self, regs: RegSet, kind: int, g: int) -> tuple[Any, np.ndarray] | None:
        key = (regs.epoch, kind, g)
        hit = self._lists.get(key)
        if hit is not None:
            self._lists.move_to_end(key)
            return hit
        for old in [k for k in self._lists if k[0] != regs.epoch]:  # registrations changed
            self._retired.append(self._lists.pop(old)[0])
        built = dlist_rows(regs, kind, g)
        if built is None:
            return None
        rows, base = built
        handle = self._agent.prep_xfer_dlist(self._target or "NIXL_INIT_AGENT", rows, MEM_NAMES[kind])
        self._lists[key] = (handle, base)
        while len(self._lists) > _MAX_CACHED:
            self._retired.append(self._lists.popitem(last=False)[1][0])
        return handle, base

    def release_retired(self) -> None:
        while self._retired:
            self._retired.pop().release()

    def close(self) -> None:
        """Release every list (the caller has released the transfers made from them)."""
        self._retired.extend(h for h, _ in self._lists.values())
        self._lists.clear()
        self.release_retired()
