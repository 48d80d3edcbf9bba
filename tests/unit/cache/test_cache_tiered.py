"""TieredCache over real memory and disk tiers: prefix lookups, promotion, write-behind,
admission, construction from the topology's config, metrics."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdfabric.cache import (
    ChunkKey,
    ChunkKeyer,
    DiskTier,
    GetOutcome,
    MemoryTier,
    PutOutcome,
    TieredCache,
    render_metrics,
)
from pdfabric.cache.redis_tier import RedisTier
from pdfabric.config.models import CacheConfig
from pdfabric.errors import ConfigError
from pdfabric.testing.cache_data import make_chunks, make_keys


class GatedTier(MemoryTier):
    """A memory tier whose puts wait for ``gate`` (a slow lower tier)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.entered = threading.Event()

    def put(self, items: Sequence[tuple[ChunkKey, Any]]) -> list[PutOutcome]:
        self.entered.set()
        assert self.gate.wait(10), "test gate never opened"
        return super().put(items)


def _dsts(n: int, size: int) -> list[np.ndarray]:
    return [np.zeros(size, dtype=np.uint8) for _ in range(n)]


@pytest.fixture
def two_tier(tmp_path: Path, chunk_f32: int):  # type: ignore[no-untyped-def]
    cache = TieredCache([MemoryTier(4 * chunk_f32, chunk_f32), DiskTier(tmp_path / "l2", 64 * chunk_f32)])
    yield cache
    cache.close()
    assert cache.open_leases() == 0


def test_prefix_lookup_across_tiers(two_tier: TieredCache, chunk_f32: int) -> None:
    keys, chunks = make_keys(6), make_chunks(6, chunk_f32)
    l1, l2 = two_tier.tiers
    l1.put([(keys[0], chunks[0]), (keys[2], chunks[2])])
    l2.put([(keys[1], chunks[1]), (keys[2], chunks[2]), (keys[4], chunks[4])])
    assert two_tier.lookup(keys) == 3  # 0 (L1), 1 (L2), 2 (both); 3 missing; 4 unusable
    assert two_tier.lookup(keys[:2]) == 2
    assert two_tier.lookup([]) == 0
    dsts = _dsts(6, chunk_f32)
    read = two_tier.get_into(keys, dsts)
    assert read.chunks == 3 and read.sources == ("memory", "disk", "memory")
    assert all(np.array_equal(chunks[i], dsts[i]) for i in range(3))
    assert l1.contains(keys[:3]) == [True, True, True]  # chunk 1 promoted
    assert two_tier.stats().promotions == 1


def test_write_behind_reaches_the_lower_tier(two_tier: TieredCache, chunk_f32: int) -> None:
    keys, chunks = make_keys(3), make_chunks(3, chunk_f32)
    assert two_tier.put(keys, chunks) == [PutOutcome.STORED] * 3
    assert two_tier.flush(10)
    l1, l2 = two_tier.tiers
    assert l2.contains(keys) == [True] * 3
    l1.delete(keys)
    dsts = _dsts(3, chunk_f32)
    read = two_tier.get_into(keys, dsts)
    assert read.chunks == 3 and set(read.sources) == {"disk"}
    assert np.array_equal(dsts[2], chunks[2])
    s = two_tier.stats()
    assert s.write_behind_queued == 3 and s.write_behind_dropped == 0 and s.write_behind_pending == 0


def test_full_queue_drops_instead_of_blocking_and_pins_hold(chunk_f32: int) -> None:
    keys, chunks = make_keys(5), make_chunks(5, chunk_f32)
    l1 = MemoryTier(3 * chunk_f32, chunk_f32, high_watermark=1.0, low_watermark=0.5)
    slow = GatedTier(8 * chunk_f32, chunk_f32, name="slow")
    cache = TieredCache([l1, slow], queue_size=1)
    try:
        cache.put(keys[0:1], chunks[0:1])  # taken by the writer, which waits at the gate
        assert slow.entered.wait(10)
        cache.put(keys[1:2], chunks[1:2])  # fills the queue
        cache.put(keys[2:3], chunks[2:3])  # queue full: dropped, not blocked
        s = cache.stats()
        assert (s.write_behind_queued, s.write_behind_dropped) == (2, 1)
        # chunks 0 and 1 are pinned in L1 until written below; 2 is not
        assert l1.put([(keys[3], chunks[3])]) == [PutOutcome.STORED]  # evicts 2, the only unpinned
        assert l1.contains(keys[:3]) == [True, True, False]
        slow.gate.set()
        assert cache.flush(10)
        assert slow.contains(keys[:2]) == [True, True]
        assert cache.open_leases() == 0
    finally:
        slow.gate.set()
        cache.close()


def test_admission_stores_chunks_seen_twice(two_tier: TieredCache, chunk_f32: int, tmp_path: Path) -> None:
    keys, chunks = make_keys(2), make_chunks(2, chunk_f32)
    cache = TieredCache([MemoryTier(4 * chunk_f32, chunk_f32)], admit_after=2)
    try:
        assert cache.put(keys, chunks) == [PutOutcome.NOT_ADMITTED] * 2
        assert cache.lookup(keys) == 0
        assert cache.put(keys[:1], chunks[:1]) == [PutOutcome.STORED]
        assert cache.lookup(keys) == 1
        assert cache.stats().not_admitted == 2
    finally:
        cache.close()


def test_keys_of_another_fingerprint_never_hit(chunk_f32: int) -> None:
    tokens = list(range(256 * 3))
    a = ChunkKeyer.create("model-a", 256)
    b = ChunkKeyer.create("model-b", 256)
    cache = TieredCache([MemoryTier(4 * chunk_f32, chunk_f32)], keyer=a)
    try:
        cache.put(a.keys(tokens), make_chunks(3, chunk_f32))
        assert cache.lookup(a.keys(tokens)) == 3
        assert cache.lookup(b.keys(tokens)) == 0
        assert cache.lookup(ChunkKeyer.create("model-a", 256, salt="t").keys(tokens)) == 0
    finally:
        cache.close()


def test_token_hit_ratio_and_metrics_text(chunk_f32: int) -> None:
    keyer = ChunkKeyer.create("fp", 256)
    tokens = list(range(256 * 4 + 10))
    cache = TieredCache([MemoryTier(4 * chunk_f32, chunk_f32)], keyer=keyer)
    try:
        keys = keyer.keys(tokens)
        cache.put(keys[:2], make_chunks(2, chunk_f32))
        assert cache.lookup_tokens(tokens) == 512
        s = cache.stats()
        assert (s.lookup_tokens, s.hit_tokens) == (len(tokens), 512)
        assert s.token_hit_ratio == pytest.approx(512 / len(tokens))
        cache.get_into(keys, _dsts(4, chunk_f32))
        text = render_metrics(cache.stats())
    finally:
        cache.close()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    hits = {s.labels["tier"]: s.value for s in families["pdfabric_cache_hits"].samples if s.name.endswith("_total")}
    assert hits == {"memory": 2}
    assert families["pdfabric_cache_hits"].type == "counter"
    assert families["pdfabric_cache_token_hit_ratio"].samples[0].value == pytest.approx(512 / len(tokens), abs=1e-6)
    for name in ("misses", "evictions", "errors", "corrupt"):
        assert f"pdfabric_cache_{name}" in families


def test_from_config_builds_tiers_relative_to_the_topology(tmp_path: Path, chunk_f32: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_REDIS_PW", "s3cret")
    cfg = CacheConfig.model_validate({
        "chunk_tokens": 256,
        "tiers": [
            {"kind": "memory", "size": "8MiB"},
            {"kind": "disk", "path": "kv-disk", "size": "64MiB"},
            {"kind": "redis", "url": "redis://127.0.0.1:1/0", "password": {"env": "TEST_REDIS_PW"}, "ttl_s": 60},
        ],
    })  # fmt: skip
    cache = TieredCache.from_config(cfg, chunk_f32, fingerprint="fp", block_size=16, base_dir=tmp_path, write_behind=False)
    try:
        mem, disk, redis_tier = cache.tiers
        assert isinstance(mem, MemoryTier) and mem.num_slots == 8
        assert isinstance(disk, DiskTier) and Path(disk.root) == tmp_path / "kv-disk"
        assert isinstance(redis_tier, RedisTier)
        assert redis_tier._client.connection_pool.connection_kwargs["password"] == "s3cret"
        assert cache.keyer is not None and cache.keyer.chunk_tokens == 256
    finally:
        cache.close()

    monkeypatch.delenv("TEST_REDIS_PW")
    with pytest.raises(ConfigError, match=r"cache\.tiers\[2\]\.password: environment variable TEST_REDIS_PW is not set"):
        TieredCache.from_config(cfg, chunk_f32, base_dir=tmp_path, source="topo.yaml")
    DiskTier(tmp_path / "kv-disk", 1 << 20).close()  # the failed build released the directory


def test_from_config_checks_chunk_tokens_against_block_size(chunk_f32: int) -> None:
    cfg = CacheConfig.model_validate({"chunk_tokens": 100, "tiers": [{"kind": "memory", "size": "4MiB"}]})
    with pytest.raises(ValueError, match="multiple of the engine block size 32"):
        TieredCache.from_config(cfg, chunk_f32, fingerprint="fp", block_size=32)


def test_inline_mode_and_lower_tier_outcomes(tmp_path: Path, chunk_f32: int) -> None:
    keys, chunks = make_keys(2), make_chunks(2, chunk_f32)
    with TieredCache([MemoryTier(2 * chunk_f32, chunk_f32), DiskTier(tmp_path, 8 * chunk_f32)], write_behind=False) as c:
        c.put(keys, chunks)
        assert c.tiers[1].contains(keys) == [True, True]
        c.delete(keys)
        assert c.lookup(keys) == 0
        assert c.tiers[1].get_into(keys[:1], _dsts(1, chunk_f32)) == [GetOutcome.MISS]


def test_two_phase_read_loads_lower_tier_chunks_into_l1(two_tier: TieredCache, chunk_f32: int) -> None:
    keys, chunks = make_keys(4), make_chunks(4, chunk_f32)
    l1, l2 = two_tier.tiers
    l1.put([(keys[0], chunks[0])])
    l2.put([(keys[1], chunks[1]), (keys[3], chunks[3])])
    lease = two_tier.prepare_get(keys)
    assert lease.outcomes == (GetOutcome.HIT, GetOutcome.HIT, GetOutcome.MISS, GetOutcome.HIT)
    assert lease.views[2] is None
    assert bytes(lease.views[1]) == chunks[1].tobytes() and bytes(lease.views[3]) == chunks[3].tobytes()
    assert l1.contains(keys) == [True, True, False, True]
    assert l1.stats().pinned == 3
    two_tier.complete_get(lease)
    assert l1.stats().pinned == 0 and two_tier.open_leases() == 0
    with pytest.raises(Exception, match="not open"):
        two_tier.complete_get(lease)


def test_two_phase_write_fills_l1_slots_and_writes_behind(two_tier: TieredCache, chunk_f32: int) -> None:
    keys, chunks = make_keys(3), make_chunks(3, chunk_f32)
    two_tier.put(keys[:1], chunks[:1])
    lease = two_tier.prepare_put(keys, chunk_f32)
    assert lease.outcomes[0] is PutOutcome.EXISTS and lease.buffers[0] is None
    for buf, c in zip(lease.buffers[1:], chunks[1:]):
        buf[:] = memoryview(c)
    assert two_tier.complete_put(lease) == [PutOutcome.EXISTS, PutOutcome.STORED, PutOutcome.STORED]
    assert two_tier.flush(10)
    assert two_tier.tiers[1].contains(keys) == [True] * 3
    aborted = two_tier.prepare_put(make_keys(2, "other"), chunk_f32)
    assert two_tier.complete_put(aborted, commit=False) == [PutOutcome.ABORTED] * 2
    assert two_tier.lookup(make_keys(2, "other")) == 0


def test_evict_prefix_and_clear(two_tier: TieredCache, chunk_f32: int) -> None:
    keys, chunks = make_keys(4), make_chunks(4, chunk_f32)
    two_tier.put(keys, chunks)
    assert two_tier.flush(10)
    assert two_tier.evict_prefix(keys[2][:3]) == 2  # one key, from both tiers
    assert two_tier.lookup(keys) == 2
    assert two_tier.clear() == 6
    assert two_tier.lookup(keys) == 0


def test_from_tiers_and_an_mmap_arena(tmp_path: Path, chunk_f32: int) -> None:
    import mmap

    from pdfabric.config.models import MemoryTier as MemorySpec

    size = MemoryTier.arena_bytes_for(3 * chunk_f32 + 100, chunk_f32)
    assert size == 3 * chunk_f32
    with open(tmp_path / "arena", "w+b") as f:
        f.truncate(size)
        m = mmap.mmap(f.fileno(), size)
    arena = np.frombuffer(m, dtype=np.uint8)
    tier = MemoryTier(size, chunk_f32, arena=arena)
    keys, chunks = make_keys(1), make_chunks(1, chunk_f32)
    tier.put([(keys[0], chunks[0])])
    assert bytes(m[: chunk_f32]) == chunks[0].tobytes()  # the slot is the caller's memory
    tier.close()
    del arena
    m.close()  # no exports left behind by the tier
    cache = TieredCache.from_tiers([MemorySpec.model_validate({"size": "4MiB"})], chunk_f32)
    assert isinstance(cache.tiers[0], MemoryTier) and cache.tiers[0].num_slots == 4
    cache.close()


def test_concurrent_readers_and_writers_never_see_wrong_bytes(tmp_path: Path) -> None:
    size = 64 * 1024
    keys, chunks = make_keys(24), make_chunks(24, size)
    expected = {k: c for k, c in zip(keys, chunks)}
    cache = TieredCache([MemoryTier(8 * size, size, high_watermark=0.9, low_watermark=0.5),
                         DiskTier(tmp_path, 16 * (size + 64))], queue_size=4)  # fmt: skip
    errors: list[str] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        dst = [np.zeros(size, np.uint8)]
        for _ in range(150):
            i = int(rng.integers(0, 24))
            if rng.random() < 0.4:
                cache.put([keys[i]], [chunks[i]])
            elif rng.random() < 0.5:
                lease = cache.prepare_get([keys[i]])
                v = lease.views[0]
                if v is not None and bytes(v) != expected[keys[i]].tobytes():
                    errors.append(f"view of chunk {i} differs")
                cache.complete_get(lease)
            elif cache.get_into([keys[i]], dst).chunks == 1 and not np.array_equal(dst[0], chunks[i]):
                errors.append(f"chunk {i} differs")

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert not errors, errors[:3]
        assert cache.flush(10)
        assert cache.open_leases() == 0 and cache.tiers[0].stats().pinned == 0
    finally:
        cache.close()
