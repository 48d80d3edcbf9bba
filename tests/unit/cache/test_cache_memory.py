"""L1 memory tier: round trips, watermark LRU, pins, two-phase puts, leak checks."""

from __future__ import annotations

import numpy as np
import pytest

from pdfabric.cache import GetOutcome, MemoryTier, PutOutcome
from pdfabric.errors import CacheError
from pdfabric.testing.cache_data import make_chunks, make_keys


def _dsts(n: int, size: int) -> list[np.ndarray]:
    return [np.zeros(size, dtype=np.uint8) for _ in range(n)]


def test_round_trip_batched(chunk_bytes: int, data) -> None:  # type: ignore[no-untyped-def]
    keys, chunks = data(6, chunk_bytes)
    with MemoryTier(8 * chunk_bytes, chunk_bytes) as m:
        assert m.put(list(zip(keys, chunks))) == [PutOutcome.STORED] * 6
        assert m.put([(keys[0], chunks[0])]) == [PutOutcome.EXISTS]
        assert m.contains(keys + make_keys(1, "other")) == [True] * 6 + [False]
        dsts = _dsts(6, chunk_bytes)
        assert m.get_into(keys, dsts) == [GetOutcome.HIT] * 6
        assert all(np.array_equal(a, b) for a, b in zip(chunks, dsts))
        got = m.get(keys[:2] + make_keys(1, "other"))
        assert [g.outcome for g in got] == [GetOutcome.HIT, GetOutcome.HIT, GetOutcome.MISS]
        assert bytes(got[1].data) == chunks[1].tobytes() and got[2].data is None
        s = m.stats()
        assert (s.hits, s.misses, s.stores, s.entries) == (8, 1, 6, 6)
        assert s.bytes_read == 8 * chunk_bytes and s.bytes_written == 6 * chunk_bytes
        assert m.delete(keys[:2]) == 2 and m.contains(keys[:2]) == [False, False]
        assert m.open_leases() == 0 and m.stats().pinned == 0


def test_buffers_of_any_dtype_and_wrong_sizes(chunk_f32: int) -> None:
    keys, chunks = make_keys(2), make_chunks(2, chunk_f32)
    with MemoryTier(4 * chunk_f32, chunk_f32) as m:
        m.put([(keys[0], chunks[0].view(np.float32))])
        dst = np.empty(chunk_f32 // 4, dtype=np.float32)
        assert m.get_into(keys[:1], [dst]) == [GetOutcome.HIT]
        assert dst.tobytes() == chunks[0].tobytes()
        assert m.put([(keys[1], np.zeros(chunk_f32 + 1, np.uint8))]) == [PutOutcome.REJECTED_TOO_LARGE]
        # the key names the chunk geometry: a buffer of another length means corruption
        assert m.get_into(keys[:1], [np.empty(chunk_f32 - 8, np.uint8)]) == [GetOutcome.CORRUPT]
        assert m.contains(keys[:1]) == [False] and m.stats().corrupt == 1
        with pytest.raises(ValueError, match="2 keys but 1 buffers"):
            m.get_into(keys, [dst])
        with pytest.raises(ValueError, match="writable"):
            m.get_into(keys[:1], [bytes(chunk_f32)])


def test_lru_with_watermarks(chunk_f32: int) -> None:
    keys, chunks = make_keys(12), make_chunks(12, chunk_f32)
    with MemoryTier(10 * chunk_f32, chunk_f32, high_watermark=0.8, low_watermark=0.5) as m:
        assert m.num_slots == 10
        m.put(list(zip(keys[:8], chunks[:8])))  # at the high watermark, nothing evicted yet
        assert m.stats().evictions == 0
        m.get_into(keys[:2], _dsts(2, chunk_f32))  # 0 and 1 become most recently used
        m.put([(keys[8], chunks[8])])  # would exceed 8: evict LRU down to 5, then store
        assert m.stats().evictions == 3
        assert m.contains(keys[:9]) == [True, True, False, False, False, True, True, True, True]
        assert m.stats().entries == 6


def test_pinned_chunks_are_never_evicted(chunk_f32: int) -> None:
    keys, chunks = make_keys(10), make_chunks(10, chunk_f32)
    with MemoryTier(4 * chunk_f32, chunk_f32, high_watermark=1.0, low_watermark=0.5) as m:
        m.put(list(zip(keys[:4], chunks[:4])))
        lease = m.prepare_get(keys[:4])
        assert lease.outcomes == (GetOutcome.HIT,) * 4
        assert m.put([(keys[4], chunks[4])]) == [PutOutcome.NO_SPACE]  # all four pinned
        assert bytes(lease.views[2]) == chunks[2].tobytes() and lease.views[2].readonly
        m.complete_get(lease)
        assert m.put([(keys[4], chunks[4])]) == [PutOutcome.STORED]
        lease = m.prepare_get([keys[3], keys[4]])
        m.put(list(zip(keys[5:9], chunks[5:9])))  # churn: 3 and 4 must survive
        assert m.contains([keys[3], keys[4]]) == [True, True]
        assert bytes(lease.views[0]) == chunks[3].tobytes()
        m.complete_get(lease)
        with pytest.raises(CacheError, match="not open"):
            m.complete_get(lease)
        assert m.open_leases() == 0 and m.stats().pinned == 0


def test_delete_while_pinned_frees_the_slot_at_unpin(chunk_f32: int) -> None:
    keys, chunks = make_keys(2), make_chunks(2, chunk_f32)
    with MemoryTier(1 * chunk_f32, chunk_f32) as m:
        m.put([(keys[0], chunks[0])])
        lease = m.prepare_get(keys[:1])
        assert m.delete(keys[:1]) == 1 and m.contains(keys[:1]) == [False]
        assert m.put([(keys[1], chunks[1])]) == [PutOutcome.NO_SPACE]  # the slot is still in use
        assert bytes(lease.views[0]) == chunks[0].tobytes()
        m.complete_get(lease)
        assert m.put([(keys[1], chunks[1])]) == [PutOutcome.STORED]


def test_two_phase_put_publishes_only_on_complete(chunk_f32: int) -> None:
    keys, chunks = make_keys(3), make_chunks(3, chunk_f32)
    with MemoryTier(4 * chunk_f32, chunk_f32) as m:
        m.put([(keys[0], chunks[0])])
        lease = m.prepare_put(keys, chunk_f32)
        assert lease.outcomes[0] is PutOutcome.EXISTS and lease.buffers[0] is None
        lease.buffers[1][:] = memoryview(chunks[1])
        lease.buffers[2][:] = memoryview(chunks[2])
        assert m.contains(keys) == [True, False, False]  # not visible while being written
        racing = m.prepare_put(keys[1:2], chunk_f32)  # another writer of the same chunk
        assert racing.outcomes == (PutOutcome.EXISTS,) and racing.buffers == (None,)
        assert m.complete_put(racing) == [PutOutcome.EXISTS]
        assert m.complete_put(lease) == [PutOutcome.EXISTS, PutOutcome.STORED, PutOutcome.STORED]
        dst = _dsts(1, chunk_f32)
        assert m.get_into(keys[2:], dst) == [GetOutcome.HIT] and np.array_equal(dst[0], chunks[2])


def test_two_phase_put_abort_returns_the_slots(chunk_f32: int) -> None:
    keys = make_keys(2)
    with MemoryTier(2 * chunk_f32, chunk_f32) as m:
        lease = m.prepare_put(keys, chunk_f32)
        assert m.complete_put(lease, commit=False) == [PutOutcome.ABORTED] * 2
        assert m.contains(keys) == [False, False]
        assert m.stats().pinned == 0 and m.open_leases() == 0
        assert len(m._free) == 2


def test_sizes_and_closed_tier(chunk_f32: int) -> None:
    with pytest.raises(ValueError, match="holds no chunk"):
        MemoryTier(chunk_f32 - 1, chunk_f32)
    with pytest.raises(ValueError, match="low_watermark"):
        MemoryTier(4 * chunk_f32, chunk_f32, high_watermark=0.5, low_watermark=0.6)
    m = MemoryTier(2 * chunk_f32, chunk_f32)
    assert not m.pinned_memory  # no CUDA here
    m.close()
    m.close()
    with pytest.raises(CacheError, match="closed"):
        m.put([(make_keys(1)[0], make_chunks(1, chunk_f32)[0])])
