"""Transfer plans as numpy pieces: coalescing, overlap checks, splitting across streams.

A part of a transfer is an (n, 3) uint64 array of pieces: [src addr, dst addr, length].
"""

from __future__ import annotations

import numpy as np

from .base import TransferPlan

__all__ = ["coalesce_plan", "check_no_overlap", "dest_segments", "split_streams"]


def coalesce_plan(plan: TransferPlan) -> np.ndarray:
    """(src, dst) pairs -> (n, 3) uint64 pieces [src, dst, len], merging pairs that are
    contiguous on both sides and dropping empty ones."""
    a = plan.columns
    if len(a) == 1:  # the common small transfer: no numpy calls beyond the copy
        return a.copy() if plan.nbytes else a[:0].copy()
    if not a[:, 2].all():
        a = a[a[:, 2] != 0]
    if len(a) < 2:
        return a.reshape(-1, 3).copy()
    src, dst, ln = a[:, 0], a[:, 1], a[:, 2]
    brk = np.ones(len(a), dtype=bool)
    brk[1:] = (src[1:] != src[:-1] + ln[:-1]) | (dst[1:] != dst[:-1] + ln[:-1])
    idx = np.flatnonzero(brk)
    if len(idx) == len(a):
        return a.copy()
    return np.stack([src[idx], dst[idx], np.add.reduceat(ln, idx)], axis=1)


def check_no_overlap(pieces: np.ndarray, tid: str) -> None:
    """A plan must not name any destination byte twice: the receiver counts bytes, so a
    duplicate would hide a block that never arrived."""
    if len(pieces) >= 2:
        _by_destination(pieces, tid)


def dest_segments(pieces: np.ndarray, tid: str) -> np.ndarray:
    """``check_no_overlap``, and the destinations it sorted, merged where they touch:
    (k, 2) uint64 [start, length] in address order."""
    if len(pieces) < 2:
        return pieces[:, 1:3].copy()
    d, gap = _by_destination(pieces, tid)
    brk = np.ones(len(d), dtype=bool)
    brk[1:] = gap != d[:-1, 2]
    idx = np.flatnonzero(brk)
    return np.stack([d[idx, 1], np.add.reduceat(d[:, 2], idx)], axis=1)


def _by_destination(pieces: np.ndarray, tid: str) -> tuple[np.ndarray, np.ndarray]:
    """(pieces sorted by destination, gaps between consecutive destinations); ValueError
    when two pieces name one destination byte."""
    d = pieces[np.argsort(pieces[:, 1], kind="stable")]
    gap = d[1:, 1] - d[:-1, 1]  # sorted: no wrap-around
    bad = np.flatnonzero(gap < d[:-1, 2])
    if len(bad):
        raise ValueError(f"plan {tid}: destination bytes at {int(d[bad[0] + 1, 1]):#x} are written twice")
    return d, gap


def split_streams(pieces: np.ndarray, k: int, min_bytes: int, total: int | None = None) -> list[np.ndarray]:
    """Cut pieces into at most ``k`` parts of about equal bytes, splitting a piece that
    straddles a boundary. ``k`` is lowered so that parts average at least ``min_bytes``
    (the last part may be smaller than the others). Order and every byte are kept.
    ``total``: the pieces' byte count when the caller knows it."""
    if total is None:
        total = int(pieces[:, 2].sum()) if len(pieces) else 0
    k = max(1, min(k, total // max(1, min_bytes)))
    if k == 1:
        return [pieces]
    target = -(-total // k)
    p = pieces.copy()
    for cut in range(target, total, target):
        ends = np.cumsum(p[:, 2])
        i = int(np.searchsorted(ends, cut, side="left"))
        start = int(ends[i] - p[i, 2])
        if start < cut < int(ends[i]):  # split piece i at the boundary
            head = cut - start
            tail = p[i].copy()
            tail[0] += np.uint64(head)
            tail[1] += np.uint64(head)
            tail[2] -= np.uint64(head)
            p[i, 2] = head
            p = np.insert(p, i + 1, tail, axis=0)
    starts = np.cumsum(p[:, 2]) - p[:, 2]
    bounds = np.searchsorted(starts, np.arange(target, total, target), side="left")
    return [part for part in np.split(p, bounds) if len(part)]
