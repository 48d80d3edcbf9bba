"""L2 disk tier: verified files, restart, corruption, bounded size, pins, ownership."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from pdfabric.cache import DiskTier, GetOutcome, PutOutcome
from pdfabric.cache.disk_tier import HEADER_BYTES
from pdfabric.errors import CacheError
from pdfabric.testing.cache_data import make_chunks, make_keys


def _dsts(n: int, size: int) -> list[np.ndarray]:
    return [np.zeros(size, dtype=np.uint8) for _ in range(n)]


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.kv"))


def test_round_trip_and_layout(tmp_path: Path, chunk_bytes: int, data) -> None:  # type: ignore[no-untyped-def]
    keys, chunks = data(5, chunk_bytes)
    with DiskTier(tmp_path, 10 * chunk_bytes) as d:
        assert d.put(list(zip(keys, chunks))) == [PutOutcome.STORED] * 5
        assert d.put([(keys[0], chunks[0])]) == [PutOutcome.EXISTS]
        files = _files(tmp_path)
        assert len(files) == 5 and all(f.stat().st_size == HEADER_BYTES + chunk_bytes for f in files)
        h = keys[0].hex()
        assert (tmp_path / h[:2] / h[2:4] / f"{h}.kv").exists()
        assert not list(tmp_path.rglob("*.tmp.*"))
        dsts = _dsts(5, chunk_bytes)
        assert d.get_into(keys, dsts) == [GetOutcome.HIT] * 5
        assert all(np.array_equal(a, b) for a, b in zip(chunks, dsts))
        got = d.get([keys[4], make_keys(1, "other")[0]])
        assert got[0].outcome is GetOutcome.HIT and bytes(got[0].data) == chunks[4].tobytes()
        assert got[1].outcome is GetOutcome.MISS
        assert d.delete(keys[:1]) == 1 and len(_files(tmp_path)) == 4
        s = d.stats()
        assert (s.hits, s.misses, s.stores, s.entries) == (6, 1, 5, 4)
        assert s.bytes_used == 4 * (HEADER_BYTES + chunk_bytes)


def test_restart_finds_its_chunks(tmp_path: Path, chunk_f32: int) -> None:
    keys, chunks = make_keys(4), make_chunks(4, chunk_f32)
    with DiskTier(tmp_path, 10 * chunk_f32) as d:
        d.put(list(zip(keys, chunks)))
    (tmp_path / "ab" / "cd").mkdir(parents=True)
    (tmp_path / "ab" / "cd" / "leftover.kv.tmp.1.2").write_bytes(b"half a chunk")
    with DiskTier(tmp_path, 10 * chunk_f32) as d:
        assert d.contains(keys) == [True] * 4
        assert d.stats().bytes_used == 4 * (HEADER_BYTES + chunk_f32)
        dsts = _dsts(4, chunk_f32)
        assert d.get_into(keys, dsts) == [GetOutcome.HIT] * 4
        assert np.array_equal(dsts[3], chunks[3])
    assert not list(tmp_path.rglob("*.tmp.*"))


@pytest.mark.parametrize("damage", ["flip", "truncate", "header", "swap"])
def test_corruption_is_detected_and_dropped(tmp_path: Path, chunk_f32: int, damage: str) -> None:
    keys, chunks = make_keys(2), make_chunks(2, chunk_f32)
    with DiskTier(tmp_path, 10 * chunk_f32) as d:
        d.put(list(zip(keys, chunks)))
        h = keys[0].hex()
        path = tmp_path / h[:2] / h[2:4] / f"{h}.kv"
        raw = bytearray(path.read_bytes())
        if damage == "flip":
            raw[HEADER_BYTES + 12345] ^= 0x01
        elif damage == "truncate":
            del raw[-4096:]
        elif damage == "header":
            raw[20] ^= 0xFF
        else:  # another chunk's file under this name
            h1 = keys[1].hex()
            raw = bytearray((tmp_path / h1[:2] / h1[2:4] / f"{h1}.kv").read_bytes())
        path.write_bytes(bytes(raw))
        dsts = _dsts(2, chunk_f32)
        assert d.get_into(keys, dsts) == [GetOutcome.CORRUPT, GetOutcome.HIT]
        assert not path.exists() and d.contains(keys) == [False, True]
        assert d.stats().corrupt == 1
        assert d.get_into(keys[:1], dsts[:1]) == [GetOutcome.MISS]


def test_a_file_removed_behind_its_back_is_a_miss(tmp_path: Path, chunk_f32: int) -> None:
    keys, chunks = make_keys(1), make_chunks(1, chunk_f32)
    with DiskTier(tmp_path, 4 * chunk_f32) as d:
        d.put([(keys[0], chunks[0])])
        _files(tmp_path)[0].unlink()
        assert d.get_into(keys, _dsts(1, chunk_f32)) == [GetOutcome.MISS]
        assert d.stats().bytes_used == 0


def test_full_tier_evicts_lru_instead_of_failing(tmp_path: Path, chunk_f32: int) -> None:
    per = HEADER_BYTES + chunk_f32
    keys, chunks = make_keys(12), make_chunks(12, chunk_f32)
    with DiskTier(tmp_path, 10 * per, high_watermark=0.8, low_watermark=0.5) as d:
        assert d.put(list(zip(keys[:8], chunks[:8]))) == [PutOutcome.STORED] * 8
        d.get_into(keys[:1], _dsts(1, chunk_f32))  # 0 is most recently used
        assert d.put(list(zip(keys[8:12], chunks[8:12]))) == [PutOutcome.STORED] * 4
        s = d.stats()
        assert s.evictions > 0 and s.bytes_used <= 0.8 * 10 * per
        assert d.contains(keys[:1]) == [True] and d.contains(keys[1:2]) == [False]
        assert d.contains(keys[8:12]) == [True] * 4
        assert len(_files(tmp_path)) == s.entries


def test_pinned_files_are_not_evicted(tmp_path: Path, chunk_f32: int) -> None:
    per = HEADER_BYTES + chunk_f32
    keys, chunks = make_keys(6), make_chunks(6, chunk_f32)
    with DiskTier(tmp_path, 3 * per, high_watermark=1.0, low_watermark=0.3) as d:
        d.put(list(zip(keys[:3], chunks[:3])))
        lease = d.prepare_get(keys[:3])
        assert lease.outcomes == (GetOutcome.HIT,) * 3 and d.stats().pinned == 3
        assert d.put([(keys[3], chunks[3])]) == [PutOutcome.NO_SPACE]
        dst = _dsts(1, chunk_f32)
        assert d.get_into(keys[1:2], dst) == [GetOutcome.HIT] and np.array_equal(dst[0], chunks[1])
        d.complete_get(lease)
        assert d.put([(keys[3], chunks[3])]) == [PutOutcome.STORED]
        assert d.open_leases() == 0 and d.stats().pinned == 0


def test_two_phase_put_through_staging_buffers(tmp_path: Path, chunk_f32: int) -> None:
    keys, chunks = make_keys(2), make_chunks(2, chunk_f32)
    with DiskTier(tmp_path, 4 * chunk_f32) as d:
        lease = d.prepare_put(keys, chunk_f32)
        for buf, c in zip(lease.buffers, chunks):
            buf[:] = memoryview(c)
        assert d.complete_put(lease) == [PutOutcome.STORED] * 2
        assert d.get_into(keys, _dsts(2, chunk_f32)) == [GetOutcome.HIT] * 2
        assert d.put([(keys[0], np.zeros(5 * chunk_f32, np.uint8))]) == [PutOutcome.EXISTS]
        assert d.put([(make_keys(1, "x")[0], np.zeros(5 * chunk_f32, np.uint8))]) == [PutOutcome.REJECTED_TOO_LARGE]


def test_one_owner_per_directory(tmp_path: Path, chunk_f32: int) -> None:
    with DiskTier(tmp_path, 4 * chunk_f32):
        with pytest.raises(CacheError, match="in use by another process"):
            DiskTier(tmp_path, 4 * chunk_f32)
    DiskTier(tmp_path, 4 * chunk_f32).close()


def test_restart_with_a_smaller_budget_evicts(tmp_path: Path, chunk_f32: int) -> None:
    keys, chunks = make_keys(6), make_chunks(6, chunk_f32)
    with DiskTier(tmp_path, 10 * chunk_f32) as d:
        d.put(list(zip(keys, chunks)))
    with DiskTier(tmp_path, 3 * (HEADER_BYTES + chunk_f32)) as d:
        assert d.stats().entries == 3 and len(_files(tmp_path)) == 3
    assert os.path.exists(tmp_path / ".lock")


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_batches_read_and_written_in_lanes_keep_every_outcome(tmp_path: Path, chunk_f32: int, threads: int) -> None:
    import threading

    keys, chunks = make_keys(9), make_chunks(9, chunk_f32)
    with DiskTier(tmp_path, 20 * chunk_f32, read_threads=threads) as d:
        assert d.put(list(zip(keys[:8], chunks[:8]))) == [PutOutcome.STORED] * 8
        h = keys[5].hex()  # lane 5 % threads: corrupt one that another lane reads
        path = tmp_path / h[:2] / h[2:4] / f"{h}.kv"
        raw = bytearray(path.read_bytes())
        raw[HEADER_BYTES + 7] ^= 0x40
        path.write_bytes(bytes(raw))
        order = [keys[8], *keys[:8]]  # a miss first, then the stored ones
        dsts = _dsts(9, chunk_f32)
        want = [GetOutcome.MISS] + [GetOutcome.CORRUPT if i == 5 else GetOutcome.HIT for i in range(8)]
        assert d.get_into(order, dsts) == want
        assert all(np.array_equal(dsts[i + 1], chunks[i]) for i in range(8) if i != 5)
        s = d.stats()
        assert (s.hits, s.misses, s.corrupt, s.entries) == (7, 1, 1, 7)
        readers = [t for t in threading.enumerate() if t.name.startswith("pdfabric-disk-read")]
        assert len(readers) == (threads - 1)
    assert not [t for t in threading.enumerate() if t.name.startswith("pdfabric-disk-read")]


def test_read_threads_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="read_threads must be >= 1, got 0"):
        DiskTier(tmp_path, 1 << 20, read_threads=0)
