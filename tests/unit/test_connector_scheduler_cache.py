"""``FabricScheduler`` with the shared cache (a real in-process TieredCache behind the client
interface): what it loads before computing, what it stores after, and how a cached prompt
changes a decode request's transfer (fake vLLM requests, no engine)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from pdfabric.cache.client import LocalCacheClient
from pdfabric.cache.keys import ChunkKeyer
from pdfabric.cache.memory_tier import MemoryTier
from pdfabric.cache.tiered import TieredCache
from pdfabric.connector.kvcache import CacheLoad, CacheStore
from pdfabric.connector.scheduler import FabricScheduler
from pdfabric.connector.settings import resolve_settings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    RequestStatus = pytest.importorskip("vllm.v1.request").RequestStatus

BLOCK, CHUNK = 4, 8  # two blocks per chunk
PRODUCER = "127.0.0.1:8101"
CHUNK_BYTES = 64


@dataclass
class Req:
    request_id: str
    prompt_token_ids: list[int]
    kv_transfer_params: dict[str, Any] | None = None
    output: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: Any = RequestStatus.WAITING

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output


@pytest.fixture
def cache() -> Iterator[LocalCacheClient]:
    tc = TieredCache([MemoryTier(1 << 20, CHUNK_BYTES)])
    try:
        yield LocalCacheClient(tc, CHUNK_BYTES, CHUNK)
    finally:
        tc.close()


KEYER = ChunkKeyer.create("test-model", CHUNK, block_size=BLOCK)


def sched(cache: LocalCacheClient, **cache_opts: Any) -> FabricScheduler:
    settings = resolve_settings({"control_port": 8101, "cache": {"tiers": [{"kind": "memory", "size": "1MiB"}],
                                                                  "chunk_tokens": CHUNK, **cache_opts}},
                                needs_control_port=False)
    return FabricScheduler(settings, producer=True, consumer=True, block_size=BLOCK,
                           block_ids_of=lambda rid: [], cache=cache, keyer=KEYER)


def put(cache: LocalCacheClient, tokens: list[int], chunks: int) -> list[bytes]:
    keys = KEYER.keys(tokens)[:chunks]
    with cache.reserve(keys) as room:
        for v in room.views:
            assert v is not None
            v[:] = b"\x01" * CHUNK_BYTES
    return keys


PROMPT = list(range(100, 121))  # 21 tokens: 20 loadable, two full chunks (16 tokens)


def test_a_cached_prefix_is_loaded_before_computing(cache: LocalCacheClient) -> None:
    keys = put(cache, PROMPT, 2)
    s = sched(cache)
    req = Req("r1", PROMPT)
    assert s.get_num_new_matched_tokens(req, 0) == (16, True)
    assert s.get_num_new_matched_tokens(req, 0) == (16, True)  # asked again while waiting for room
    assert s.counters["cache_lookups"] == 1
    s.update_state_after_alloc(req, [50, 51, 52, 53, 54, 55], 16)
    meta = s.build_meta({})
    assert meta.cache_loads == [CacheLoad("r1", keys, [50, 51, 52, 53], 0, False)]
    assert not meta.recvs
    s.transfers_finished(None, {"r1"})
    assert s.get_num_new_matched_tokens(req, 16) == (0, False)  # loaded (or failed): never again


def test_a_local_prefix_hit_is_skipped_inside_the_first_chunk(cache: LocalCacheClient) -> None:
    keys = put(cache, PROMPT, 2)
    s = sched(cache)
    req = Req("r1", PROMPT)
    assert s.get_num_new_matched_tokens(req, 4) == (12, True)  # one block computed locally already
    s.update_state_after_alloc(req, [50, 51, 52, 53, 54, 55], 12)
    (load,) = s.build_meta({}).cache_loads
    assert load.keys == keys and load.blocks == [50, 51, 52, 53] and load.skip == 1


def test_nothing_cached_means_nothing_to_load(cache: LocalCacheClient) -> None:
    put(cache, [7] * 21, 2)  # another prompt
    s = sched(cache)
    assert s.get_num_new_matched_tokens(Req("r1", PROMPT), 0) == (0, False)
    assert not s.build_meta({}).cache_loads


def test_the_prefix_chain_stops_at_the_first_missing_chunk(cache: LocalCacheClient) -> None:
    keys = KEYER.keys(PROMPT)
    with cache.reserve([keys[1]]) as room:  # the second chunk alone is useless
        room.views[0][:] = b"\x02" * CHUNK_BYTES  # type: ignore[index]
    s = sched(cache)
    assert s.get_num_new_matched_tokens(Req("r1", PROMPT), 0) == (0, False)


def consume(rid: str, prompt: list[int], tid: str = "t1") -> Req:
    return Req(rid, prompt, {"pdfabric": "consume", "transfer_id": tid, "producer": PRODUCER})


def test_a_decode_request_cached_but_for_a_short_rest_computes_it_and_cancels_the_push(cache: LocalCacheClient) -> None:
    keys = put(cache, PROMPT, 2)
    s = sched(cache, local_compute_tokens=8)
    req = consume("r1", PROMPT)
    assert s.get_num_new_matched_tokens(req, 0) == (16, True)  # 4 tokens left: computed here
    s.update_state_after_alloc(req, [50, 51, 52, 53, 54, 55], 16)
    meta = s.build_meta({})
    assert meta.cache_loads == [CacheLoad("r1", keys, [50, 51, 52, 53], 0, False)]
    assert not meta.recvs
    assert [(p, t) for p, t, _ in meta.unsent_aborts] == [(PRODUCER, "t1")]
    s.transfers_finished(None, {"r1"})
    req.num_computed_tokens = 21
    s.request_finished(req, [50, 51, 52, 53, 54, 55])
    assert not s.build_meta({}).unsent_aborts  # told once


def test_a_decode_request_takes_the_rest_from_the_producer(cache: LocalCacheClient) -> None:
    keys = put(cache, PROMPT, 2)
    s = sched(cache, local_compute_tokens=0)
    req = consume("r1", PROMPT)
    assert s.get_num_new_matched_tokens(req, 0) == (20, True)  # every prompt token but the last
    s.update_state_after_alloc(req, [50, 51, 52, 53, 54, 55], 20)
    meta = s.build_meta({})
    assert meta.cache_loads == [CacheLoad("r1", keys, [50, 51, 52, 53], 0, True)]
    (recv,) = meta.recvs
    assert recv.first_block == 4 and recv.blocks == [54]  # tokens 16..19: the producer's part
    assert not meta.unsent_aborts


def test_finished_requests_store_what_the_cache_lacks_and_hold_their_blocks(cache: LocalCacheClient) -> None:
    put(cache, PROMPT, 1)
    s = sched(cache)
    req = Req("r1", PROMPT, output=[1, 2, 3, 4, 5])
    req.num_computed_tokens = 25  # prompt + output - 1: the last output token has no KV yet
    blocks = [60, 61, 62, 63, 64, 65, 66]
    assert s.request_finished(req, blocks) == (True, None)
    (store,) = s.build_meta({}).cache_stores
    keys = KEYER.keys(req.all_token_ids[:25])
    assert store == CacheStore("r1", keys[1:3], [62, 63, 64, 65], False)  # chunk 0 was cached already
    assert s.has_pending_push_work()
    s.transfers_finished({"r1"}, None)
    assert not s.has_pending_push_work()


@pytest.mark.parametrize("why", ["aborted", "store off", "all cached", "too short"])
def test_nothing_is_stored_when_there_is_nothing_to_store(cache: LocalCacheClient, why: str) -> None:
    s = sched(cache, store=why != "store off")
    prompt = PROMPT[:7] if why == "too short" else PROMPT
    req = Req("r1", prompt)
    req.num_computed_tokens = len(prompt)
    if why == "aborted":
        req.status = RequestStatus.FINISHED_ABORTED
    if why == "all cached":
        put(cache, PROMPT, 2)
    assert s.request_finished(req, [60, 61, 62, 63, 64, 65]) == (False, None)
    assert not s.build_meta({}).cache_stores and not s.has_pending_push_work()


def test_a_produce_request_is_held_for_its_push_and_its_store_together(cache: LocalCacheClient) -> None:
    s = sched(cache)
    req = Req("p1", PROMPT, {"pdfabric": "produce", "transfer_id": "t9"})
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)
    s.update_state_after_alloc(req, [70, 71, 72, 73, 74, 75], 0)
    req.num_computed_tokens = 21
    req.status = RequestStatus.FINISHED_LENGTH_CAPPED
    held, params = s.request_finished(req, [70, 71, 72, 73, 74, 75])
    assert held and params is not None and params["transfer_id"] == "t9"
    meta = s.build_meta({})
    assert meta.cache_stores[0].with_push and meta.finished_sends[0].held


@dataclass
class Placeholder:
    offset: int
    length: int


@dataclass
class Feature:
    identifier: str
    mm_position: Placeholder
    modality: str = "image"


def test_a_request_salt_and_multimodal_items_name_their_own_chunks(cache: LocalCacheClient) -> None:
    put(cache, PROMPT, 2)  # the plain prompt's two chunks
    s = sched(cache)
    salted = Req("salted", PROMPT)
    salted.cache_salt = "tenant-b"  # type: ignore[attr-defined]
    assert s.get_num_new_matched_tokens(salted, 0) == (0, False)  # another tenant's KV is not served
    image = Req("img-a", PROMPT)
    image.mm_features = [Feature("hash-a", Placeholder(9, 4))]  # type: ignore[attr-defined]
    # the image sits in chunk 1: chunk 0 (tokens 0-7) is the plain prompt's, chunk 1 is not
    assert s.get_num_new_matched_tokens(image, 0) == (8, True)
    keys_a = KEYER.keys(PROMPT[:16], extras=[(9, b"hash-a")])
    assert keys_a[0] == KEYER.keys(PROMPT)[0] and keys_a[1] != KEYER.keys(PROMPT)[1]
    # after computing, the image request stores under its own keys; another image misses them
    image.num_computed_tokens, image.status = 21, RequestStatus.FINISHED_STOPPED
    held, _ = s.request_finished(image, [50, 51, 52, 53, 54, 55])
    (store,) = s.build_meta({}).cache_stores
    assert held and store.keys == keys_a[1:]
    other = Req("img-b", PROMPT)
    other.mm_features = [Feature("hash-b", Placeholder(9, 4))]  # type: ignore[attr-defined]
    assert s.get_num_new_matched_tokens(other, 0) == (8, True)


def test_a_multimodal_item_without_an_identifier_is_never_cached(cache: LocalCacheClient) -> None:
    put(cache, PROMPT, 2)
    s = sched(cache)
    req = Req("r1", PROMPT)
    req.mm_features = [Feature("", Placeholder(2, 4))]  # type: ignore[attr-defined]
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)
    assert s.counters["cache_unkeyable"] == 1 and s.counters["cache_lookups"] == 1
