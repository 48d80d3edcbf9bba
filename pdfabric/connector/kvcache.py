"""The connector's path to the shared KV cache: chunk bytes <-> KV blocks, off the engine thread.

A chunk is ``chunk_tokens`` tokens = ``blocks_per_chunk`` whole KV blocks of every layer.
Its bytes are canonical for a layout: for each (layer, segment) of ``layout.segment_bases()``
(CPU: one segment per layer; GPU flash: K then V), the chunk's blocks in order. Two engines
with the same model and layout therefore read each other's chunks.

``CacheMover`` runs loads (cache -> the blocks vLLM allocated) and stores (a finished
request's blocks -> cache) on one background thread; the worker collects what finished
once per engine step. A load that cannot find every chunk fails as a whole (vLLM then
recomputes); a store that finds no room stores what it can. Neither ever blocks the engine.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pdfabric.cache.client import CacheClient
from pdfabric.layout import KVLayout
from pdfabric.memory import view_of

__all__ = ["ChunkCopier", "CacheMover", "CacheLoad", "CacheStore", "cache_fingerprint", "chunk_bytes_for"]

log = logging.getLogger("pdfabric.connector")


@dataclass(frozen=True)
class CacheLoad:
    """Load ``keys`` into ``blocks`` (``blocks_per_chunk`` per key); the first ``skip`` blocks
    already hold the right KV (a local prefix hit) and are left alone."""

    req_id: str
    keys: list[bytes]
    blocks: list[int]
    skip: int = 0
    with_transfer: bool = False  # the rest of the prompt comes from a producer: done when both are


@dataclass(frozen=True)
class CacheStore:
    """Store the chunks ``keys`` from ``blocks`` (``blocks_per_chunk`` per key)."""

    req_id: str
    keys: list[bytes]
    blocks: list[int]
    with_push: bool = False  # the blocks are also held for a push: freed when both are done


def chunk_bytes_for(num_layers: int, num_kv_heads: int, head_dim: int, element_size: int, chunk_tokens: int) -> int:
    """Bytes of one chunk (K and V of every layer), whatever the block layout."""
    return num_layers * 2 * num_kv_heads * head_dim * element_size * chunk_tokens


def cache_fingerprint(model: str, device: str, dtype: str, num_layers: int, num_kv_heads: int, head_dim: int,
                      block_size: int, tp_size: int) -> str:
    """What chunk keys are seeded with: engines agree on it exactly when they can share chunks."""
    return (f"model={model};device={device};dtype={dtype};layers={num_layers};kv_heads={num_kv_heads};"
            f"head_dim={head_dim};block={block_size};tp={tp_size}")


class ChunkCopier:
    """Copies between one chunk's bytes and the KV blocks of a layout (host memory)."""

    def __init__(self, layout: KVLayout, chunk_tokens: int) -> None:
        g = layout.geometry
        if chunk_tokens % g.block_size:
            raise ValueError(f"chunk_tokens {chunk_tokens} is not a multiple of the block size {g.block_size}")
        self.layout = layout
        self.blocks_per_chunk = chunk_tokens // g.block_size
        self._seg = g.segment_bytes
        self._stride = layout.block_stride
        bases = layout.segment_bases()
        regs = layout.registration_regions()
        self._layers = [np.frombuffer(view_of(r), dtype=np.uint8) for r in regs]
        # per (layer, segment): (which registration region, offset of block 0 in it)
        self._bases: list[tuple[int, int]] = []
        for b in bases:
            i = next(j for j, r in enumerate(regs) if r.addr <= b < r.end)
            self._bases.append((i, b - regs[i].addr))
        self.chunk_bytes = len(bases) * self.blocks_per_chunk * self._seg

    def _pieces(self, blocks: Sequence[int]) -> list[tuple[np.ndarray, int]]:
        """(KV memory of a run of blocks, its offset in the chunk) for every piece, in order."""
        runs: list[tuple[int, int, int]] = []  # first block, count, index in the chunk
        for i, b in enumerate(blocks):
            if runs and b == runs[-1][0] + runs[-1][1] and self._stride == self._seg:
                first, count, at = runs[-1]
                runs[-1] = (first, count + 1, at)
            else:
                runs.append((b, 1, i))
        seg, stride, per_base = self._seg, self._stride, len(blocks) * self._seg
        out = []
        for k, (li, off) in enumerate(self._bases):
            mem = self._layers[li]
            for first, count, at in runs:
                start = off + first * stride
                out.append((mem[start: start + count * seg], k * per_base + at * seg))
        return out

    def gather(self, blocks: Sequence[int], dst: memoryview) -> None:
        """KV blocks -> a chunk buffer."""
        self._check(blocks, dst)
        out = np.frombuffer(dst, dtype=np.uint8)
        for piece, at in self._pieces(blocks):
            out[at: at + piece.size] = piece

    def scatter(self, src: memoryview, blocks: Sequence[int], skip: int = 0) -> None:
        """A chunk buffer -> KV blocks, leaving the first ``skip`` blocks untouched."""
        self._check(blocks, src)
        data = np.frombuffer(src, dtype=np.uint8)
        if skip <= 0:
            for piece, at in self._pieces(blocks):
                piece[:] = data[at: at + piece.size]
            return
        seg, per_base = self._seg, len(blocks) * self._seg
        for i in range(skip, len(blocks)):  # rare (a local hit inside a chunk): block by block
            for k, (li, off) in enumerate(self._bases):
                start = off + blocks[i] * self._stride
                at = k * per_base + i * seg
                self._layers[li][start: start + seg] = data[at: at + seg]

    def _check(self, blocks: Sequence[int], buf: memoryview) -> None:
        if len(blocks) != self.blocks_per_chunk:
            raise ValueError(f"a chunk is {self.blocks_per_chunk} blocks, got {len(blocks)}")
        if buf.nbytes != self.chunk_bytes:
            raise ValueError(f"a chunk is {self.chunk_bytes} bytes, got a buffer of {buf.nbytes}")


class CacheMover:
    """Loads and stores on one background thread; ``results()`` once per engine step."""

    def __init__(self, client: CacheClient, copier: ChunkCopier) -> None:
        self.client = client
        self.copier = copier
        self.counters: Counter[str] = Counter()
        self._jobs: queue.SimpleQueue[CacheLoad | CacheStore | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._loaded: set[str] = set()
        self._failed: set[str] = set()
        self._stored: set[str] = set()
        self._pending = 0
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pdfabric-cache", daemon=True)
        self._thread.start()

    def submit(self, job: CacheLoad | CacheStore) -> None:
        with self._lock:
            self._pending += 1
        self._jobs.put(job)

    def busy(self) -> bool:
        """Jobs queued or running, or results not yet collected."""
        with self._lock:
            return bool(self._pending or self._loaded or self._failed or self._stored)

    def results(self) -> tuple[set[str], set[str], set[str]]:
        """(loaded, failed loads, stored) since the last call."""
        with self._lock:
            out = (self._loaded, self._failed, self._stored)
            self._loaded, self._failed, self._stored = set(), set(), set()
            self._wake.clear()
        return out

    def wait(self, timeout: float) -> bool:
        """Until a job finished (or ``timeout``); True if one did."""
        return self._wake.wait(timeout)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            t0 = time.perf_counter()
            try:
                ok = self._load(job) if isinstance(job, CacheLoad) else self._store(job)
            except Exception as e:  # never let one job stop the thread
                log.warning("pdfabric cache: %s of request %s failed: %s", type(job).__name__, job.req_id, e)
                self.counters["job_errors"] += 1
                ok = False
            self.counters["seconds"] += time.perf_counter() - t0  # type: ignore[assignment]
            with self._lock:
                self._pending -= 1
                if isinstance(job, CacheLoad):
                    (self._loaded if ok else self._failed).add(job.req_id)
                else:
                    self._stored.add(job.req_id)
                self._wake.set()

    def _load(self, job: CacheLoad) -> bool:
        bpc = self.copier.blocks_per_chunk
        with self.client.read(job.keys) as pinned:
            if pinned.found != len(job.keys):
                self.counters["load_misses"] += 1
                log.warning("pdfabric cache: request %s: %d of %d chunks are no longer cached; "
                            "the engine recomputes them", job.req_id, len(job.keys) - pinned.found, len(job.keys))
                return False
            for i, view in enumerate(pinned.views):
                assert view is not None
                skip = max(0, job.skip - i * bpc)
                if skip < bpc:
                    self.copier.scatter(view, job.blocks[i * bpc: (i + 1) * bpc], skip)
        self.counters["chunks_loaded"] += len(job.keys)
        self.counters["bytes_loaded"] += len(job.keys) * self.copier.chunk_bytes
        return True

    def _store(self, job: CacheStore) -> bool:
        bpc = self.copier.blocks_per_chunk
        with self.client.reserve(job.keys) as room:
            for i, view in enumerate(room.views):
                if view is not None:
                    self.copier.gather(job.blocks[i * bpc: (i + 1) * bpc], view)
            n = room.found
        self.counters["chunks_stored"] += n
        self.counters["bytes_stored"] += n * self.copier.chunk_bytes
        return True

    def close(self, timeout: float = 10.0) -> None:
        self._jobs.put(None)
        self._thread.join(timeout)
        self.client.close()
