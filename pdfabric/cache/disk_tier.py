"""L2: one file per chunk under a local directory, bounded in size, LRU-evicted.

Theory of operation
-------------------
A chunk with key hex ``abcd...`` lives at ``ROOT/ab/cd/abcd....kv``: a 64-byte header
then the value. The header holds a magic, a version, the value length, the value's
``checksum64``, the key, and a CRC32 of the header itself.

Rule 1 - atomic files. A value is written to ``<name>.tmp.<pid>.<thread>`` in the same
directory (``writev`` of header and value, ``fsync`` if asked) and renamed over the final
name, so a reader sees a whole file or none. Leftover temporary files of a crashed
writer are removed at start.

Rule 2 - verified reads. ``get_into`` reads header and value with one ``readv`` straight
into the caller's buffer, then checks magic, key, length, size on disk and checksum.
A file failing any check is reported CORRUPT, deleted and counted. A batch of at least
two chunks and ``_PARALLEL_MIN_BYTES`` is read (and a batch put is written) by
``read_threads`` threads, each taking every n-th chunk: ``readv`` and the checksum's numpy reductions release the
GIL, so with a free core the check costs no wall time (single-threaded, the checksum
adds about half of a page-cache read of the same bytes).

Rule 3 - bounded size. Space is reserved before a write: when the reservation would take
the bytes used above ``high_watermark`` of ``capacity_bytes``, least-recently-used
unpinned files are deleted until usage is at ``low_watermark``. A device that runs out
of space (ENOSPC) triggers the same eviction and one retry. A full tier evicts; it
answers NO_SPACE only when everything left is pinned.

Rule 4 - restart. Recency lives in memory; at start the directory is scanned and files
are ordered by modification time, so a restarted tier finds its chunks. One process owns
a directory at a time (an ``flock`` on ``ROOT/.lock``).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
import zlib
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pdfabric.cache.checksum import checksum64
from pdfabric.cache.keys import KEY_BYTES, ChunkKey
from pdfabric.cache.tier import (
    CacheTier,
    GetOutcome,
    GetResult,
    PutOutcome,
    TierCapabilities,
    as_byte_view,
)
from pdfabric.errors import CacheError

__all__ = ["HEADER_BYTES", "DiskTier"]

_MAGIC = b"PDFKVC\x00\x01"
_VERSION = 1
_PARALLEL_MIN_BYTES = 256 << 10  # below this a batch is read on the caller's thread
_BODY = struct.Struct("<8sHHIQQ16s")  # magic, version, header bytes, flags, length, checksum, key
_HEADER = struct.Struct(f"<{_BODY.size}sI12x")  # body, crc32(body), padding
HEADER_BYTES = _HEADER.size
_SUFFIX = ".kv"
_NAME_LEN = 2 * KEY_BYTES + len(_SUFFIX)


def _header(key: bytes, length: int, checksum: int) -> bytes:
    body = _BODY.pack(_MAGIC, _VERSION, HEADER_BYTES, 0, length, checksum, key)
    return _HEADER.pack(body, zlib.crc32(body))


def _header_ok(raw: bytes | bytearray, key: bytes, length: int) -> int | None:
    """The stored checksum when the header is sound and names ``key`` and ``length``."""
    body, crc = _HEADER.unpack(raw)
    if zlib.crc32(body) != crc:
        return None
    magic, version, hlen, _flags, n, checksum, k = _BODY.unpack(body)
    if magic != _MAGIC or version != _VERSION or hlen != HEADER_BYTES or n != length or k != key:
        return None
    return int(checksum)


def _write_all(fd: int, parts: list[Any]) -> None:
    total = sum(len(p) for p in parts)
    done = os.writev(fd, parts)
    while done < total:  # short writes are rare on files; finish piecewise
        flat = b"".join(bytes(p) for p in parts)
        done += os.write(fd, memoryview(flat)[done:])


class DiskTier(CacheTier):
    """Files under ``root``; at most ``capacity_bytes`` (headers included) on disk."""

    kind = "disk"
    capabilities = TierCapabilities(persistent=True, pins=True)

    def __init__(
        self,
        root: str | os.PathLike[str],
        capacity_bytes: int,
        *,
        name: str | None = None,
        high_watermark: float = 0.95,
        low_watermark: float = 0.85,
        fsync: bool = False,
        read_threads: int = 2,
    ) -> None:
        super().__init__(name)
        if read_threads < 1:
            raise ValueError(f"disk tier read_threads must be >= 1, got {read_threads}")
        if capacity_bytes <= HEADER_BYTES:
            raise ValueError(f"disk tier capacity must exceed {HEADER_BYTES} bytes, got {capacity_bytes}")
        if not 0.0 < low_watermark < high_watermark <= 1.0:
            raise ValueError(
                "expected 0 < low_watermark < high_watermark <= 1, got "
                f"low={low_watermark} high={high_watermark}"
            )
        self.root = os.fspath(root)
        self.capacity_bytes = capacity_bytes
        self._high = int(high_watermark * capacity_bytes)
        self._low = int(low_watermark * capacity_bytes)
        self._fsync = fsync
        self.read_threads = read_threads
        self._pool: ThreadPoolExecutor | None = None
        self._index: OrderedDict[ChunkKey, int] = OrderedDict()  # key -> bytes on disk
        self._writing: dict[ChunkKey, int] = {}
        self._pinned: Counter[ChunkKey] = Counter()
        self._used = 0
        self._dirs: set[str] = set()
        os.makedirs(self.root, exist_ok=True)
        self._lock_fd = self._take_ownership()
        try:
            self._scan()
        except BaseException:
            os.close(self._lock_fd)
            raise

    # ---- start --------------------------------------------------------------------------

    def _take_ownership(self) -> int:
        fd = os.open(os.path.join(self.root, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise CacheError(
                f"disk cache directory {self.root} is in use by another process (it holds "
                f"{self.root}/.lock); give each cache its own directory, or stop the other owner"
            ) from None
        return fd

    def _scan(self) -> None:
        """Index existing files by modification time; remove leftover temporary files."""
        found: list[tuple[float, ChunkKey, int]] = []
        for top in os.scandir(self.root):
            if not (top.is_dir(follow_symlinks=False) and len(top.name) == 2):
                continue
            for sub in os.scandir(top.path):
                if sub.is_dir(follow_symlinks=False):
                    self._dirs.add(sub.path)
                    found += self._scan_leaf(sub.path)
        found.sort()
        for _, key, size in found:
            self._index[key] = size
            self._used += size
        with self._lock:
            self._evict_to(self.capacity_bytes)

    def _scan_leaf(self, path: str) -> list[tuple[float, ChunkKey, int]]:
        out = []
        for entry in os.scandir(path):
            if ".tmp." in entry.name:
                self._unlink(entry.path)
                continue
            if len(entry.name) != _NAME_LEN or not entry.name.endswith(_SUFFIX):
                continue
            try:
                key = ChunkKey(bytes.fromhex(entry.name[: 2 * KEY_BYTES]))
                st = entry.stat(follow_symlinks=False)
            except (ValueError, OSError):
                continue
            if st.st_size >= HEADER_BYTES:
                out.append((st.st_mtime, key, st.st_size))
        return out

    # ---- index (caller holds the lock) ----------------------------------------------------

    def _path(self, key: bytes) -> str:
        h = key.hex()
        return f"{self.root}/{h[0:2]}/{h[2:4]}/{h}{_SUFFIX}"

    @staticmethod
    def _unlink(path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def _forget(self, key: ChunkKey) -> bool:
        size = self._index.pop(key, None)
        if size is None:
            return False
        self._used -= size
        self._unlink(self._path(key))
        return True

    def _evict_to(self, target: int) -> None:
        if self._used <= target:
            return
        victims = []
        used = self._used
        for key, size in self._index.items():
            if not self._pinned[key]:
                victims.append(key)
                used -= size
                if used <= target:
                    break
        for key in victims:
            self._forget(key)
        self._counters.evictions += len(victims)

    def _room_for(self, size: int) -> bool:
        if self._used + size > self._high:
            self._evict_to(min(self._low, self._high - size))
        if self._used + size > self.capacity_bytes:
            return False
        self._used += size
        return True

    # ---- reads ----------------------------------------------------------------------------

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        with self._lock:
            return [k in self._index for k in keys]

    def _read_file(self, key: ChunkKey, dst: memoryview, header: bytearray, extra: bytearray) -> GetOutcome:
        """Read one file into ``dst`` (exactly the value's length) and verify it; no locks."""
        try:
            fd = os.open(self._path(key), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return GetOutcome.MISS
        try:
            got = os.readv(fd, [header, dst, extra])
        finally:
            os.close(fd)
        stored = _header_ok(header, key, len(dst)) if got >= HEADER_BYTES else None
        if got != HEADER_BYTES + len(dst) or stored is None or checksum64(dst) != stored:
            return GetOutcome.CORRUPT
        return GetOutcome.HIT

    def _read_many(self, keys: Sequence[ChunkKey], dsts: Sequence[memoryview]) -> list[GetOutcome]:
        """One lock to look up and touch, the reads without it, one lock to account."""
        with self._lock:
            self._check_open()
            present = [k in self._index for k in keys]
            for k, p in zip(keys, present):
                if p:
                    self._index.move_to_end(k)
        outs = [GetOutcome.MISS] * len(keys)
        todo = [i for i, p in enumerate(present) if p]
        header_extra = [(bytearray(HEADER_BYTES), bytearray(1)) for _ in range(self.read_threads)]

        def read(lane: int, i: int) -> None:
            try:
                outs[i] = self._read_file(keys[i], dsts[i], *header_extra[lane])
            except OSError:
                outs[i] = GetOutcome.ERROR

        self._in_lanes(read, todo, sum(len(dsts[i]) for i in todo))
        c = self._counters
        with self._lock:
            for k, d, p, o in zip(keys, dsts, present, outs):
                if o is GetOutcome.HIT:
                    c.hits += 1
                    c.bytes_read += len(d)
                elif o is GetOutcome.MISS:
                    c.misses += 1
                    if p:  # the file was removed behind our back: forget it
                        self._used -= self._index.pop(k, 0)
                elif o is GetOutcome.CORRUPT:
                    c.corrupt += 1
                    self._forget(k)
                else:
                    c.errors += 1
        return outs

    def _in_lanes(self, fn: Callable[[int, int], None], todo: Sequence[int], nbytes: int) -> None:
        """``fn(lane, i)`` for every index in ``todo``; lane j of n takes every n-th index.
        Lanes past the first run on the pool when the batch is worth it."""
        lanes = min(self.read_threads, len(todo))
        if lanes < 2 or nbytes < _PARALLEL_MIN_BYTES:
            for i in todo:
                fn(0, i)
            return

        def lane(j: int) -> None:
            for i in todo[j::lanes]:
                fn(j, i)

        pool = self._read_pool()
        futures = []
        for j in range(1, lanes):
            try:
                futures.append(pool.submit(lane, j))
            except RuntimeError:  # closed meanwhile: run that lane here
                lane(j)
        lane(0)
        for f in futures:
            f.result()

    def _read_pool(self) -> ThreadPoolExecutor:
        with self._lock:
            self._check_open()
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.read_threads - 1, thread_name_prefix=f"pdfabric-{self.name}-read")
            return self._pool

    def get_into(self, keys: Sequence[ChunkKey], buffers: Sequence[Any]) -> list[GetOutcome]:
        if len(buffers) != len(keys):
            raise ValueError(f"get_into: {len(keys)} keys but {len(buffers)} buffers")
        return self._read_many(keys, [as_byte_view(b, writable=True) for b in buffers])

    def get(self, keys: Sequence[ChunkKey]) -> list[GetResult]:
        with self._lock:
            sizes = [self._index.get(k, HEADER_BYTES) - HEADER_BYTES for k in keys]
        bufs = [memoryview(bytearray(n)) for n in sizes]
        outs = self._read_many(keys, bufs)
        return [GetResult(o, b if o is GetOutcome.HIT else None) for o, b in zip(outs, bufs)]

    def _pin(self, keys: Sequence[ChunkKey]) -> tuple[list[GetOutcome], list[memoryview | None], Any]:
        with self._lock:
            self._check_open()
            held = [k for k in keys if k in self._index]
            self._pinned.update(held)
            outs = [GetOutcome.HIT if k in self._index else GetOutcome.MISS for k in keys]
        return outs, [None] * len(keys), held

    def _unpin(self, token: Any) -> None:
        with self._lock:
            self._pinned.subtract(token)
            for k in token:
                if self._pinned[k] <= 0:
                    del self._pinned[k]

    # ---- writes ---------------------------------------------------------------------------

    def max_value_bytes(self) -> int:
        return self.capacity_bytes - HEADER_BYTES

    def _claim(self, key: ChunkKey, size: int) -> PutOutcome | None:
        """Reserve ``size`` bytes for ``key``; None when the caller may write."""
        with self._lock:
            self._check_open()
            if key in self._index or key in self._writing:
                if key in self._index:
                    self._index.move_to_end(key)
                return PutOutcome.EXISTS
            if size > self.capacity_bytes:
                self._counters.rejected += 1
                return PutOutcome.REJECTED_TOO_LARGE
            if not self._room_for(size):
                self._counters.rejected += 1
                return PutOutcome.NO_SPACE
            self._writing[key] = size
            return None

    def _write_file(self, key: ChunkKey, data: memoryview) -> None:
        final = self._path(key)
        folder = final.rsplit("/", 1)[0]
        if folder not in self._dirs:
            os.makedirs(folder, exist_ok=True)
            self._dirs.add(folder)
        tmp = f"{final}.tmp.{os.getpid()}.{threading.get_ident()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            _write_all(fd, [_header(key, len(data), checksum64(data)), data])
            if self._fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            self._unlink(tmp)
            raise
        os.close(fd)
        os.replace(tmp, final)

    def _put_one(self, key: ChunkKey, data: memoryview) -> PutOutcome:
        size = HEADER_BYTES + len(data)
        out = self._claim(key, size)
        if out is not None:
            return out
        try:
            try:
                self._write_file(key, data)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                with self._lock:  # the device is fuller than our budget: free this value's
                    # size plus the watermark gap from other files, then retry once
                    self._evict_to(max(0, self._used - size - (self._high - self._low)))
                self._write_file(key, data)
        except OSError:
            with self._lock:
                del self._writing[key]
                self._used -= size
                self._counters.errors += 1
            return PutOutcome.ERROR
        with self._lock:
            del self._writing[key]
            self._index[key] = size
            self._counters.stores += 1
            self._counters.bytes_written += len(data)
        return PutOutcome.STORED

    def put(self, items: Sequence[tuple[ChunkKey, Any]]) -> list[PutOutcome]:
        views = [as_byte_view(v) for _, v in items]
        outs = [PutOutcome.ERROR] * len(items)

        def write(_lane: int, i: int) -> None:
            outs[i] = self._put_one(items[i][0], views[i])

        self._in_lanes(write, range(len(items)), sum(len(v) for v in views))
        return outs

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        with self._lock:
            return sum(1 for k in keys if self._forget(k))

    def delete_prefix(self, prefix: bytes) -> int:
        with self._lock:
            return self.delete([k for k in self._index if k.startswith(prefix)])

    # ---- stats and lifecycle ----------------------------------------------------------------

    def _gauges(self) -> dict[str, int]:
        return {
            "entries": len(self._index),
            "bytes_used": sum(self._index.values()),
            "capacity_bytes": self.capacity_bytes,
            "pinned": len(self._pinned),
        }

    def close(self) -> None:
        """Release the directory (files stay for the next owner)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.close(self._lock_fd)
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
