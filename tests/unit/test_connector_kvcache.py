"""The connector's chunk copier: chunk bytes <-> KV blocks, checked against tensor indexing
for every layout kind (CPU, flash NHD/HND, MLA)."""

from __future__ import annotations

import pytest
import torch

from pdfabric.connector.kvcache import ChunkCopier, cache_fingerprint, chunk_bytes_for
from pdfabric.layout import KVLayout

from test_layout import BLOCK_SIZE, HEAD_DIM, HEADS, KINDS, NUM_LAYERS, block_bytes, make_caches, segments

CHUNK_TOKENS = 4 * BLOCK_SIZE  # 4 blocks per chunk


def expected_chunk(caches: dict[str, torch.Tensor], kind: str, blocks: list[int]) -> bytes:
    """Canonical order: per layer, per segment (K then V), the blocks in order."""
    out = []
    for t in caches.values():
        for seg in segments(kind):
            for b in blocks:
                out.append(block_bytes(t, kind, seg, b).numpy().tobytes())
    return b"".join(out)


@pytest.mark.parametrize("kind", KINDS)
def test_gather_matches_tensor_indexing(kind: str) -> None:
    caches = make_caches(kind, torch.bfloat16)
    copier = ChunkCopier(KVLayout.from_kv_caches(caches, block_size=BLOCK_SIZE), CHUNK_TOKENS)
    for blocks in ([0, 1, 2, 3], [9, 3, 10, 4], [11, 7, 6, 5]):  # contiguous, scattered, descending
        buf = bytearray(copier.chunk_bytes)
        copier.gather(blocks, memoryview(buf))
        assert bytes(buf) == expected_chunk(caches, kind, blocks)


@pytest.mark.parametrize("kind", KINDS)
def test_scatter_writes_exactly_the_blocks_it_is_given(kind: str) -> None:
    src = make_caches(kind, torch.float32, seed=1)
    dst = make_caches(kind, torch.float32, seed=2)
    before = {n: t.clone() for n, t in dst.items()}
    lay_src = KVLayout.from_kv_caches(src, block_size=BLOCK_SIZE)
    lay_dst = KVLayout.from_kv_caches(dst, block_size=BLOCK_SIZE)
    chunk = bytearray(ChunkCopier(lay_src, CHUNK_TOKENS).chunk_bytes)
    ChunkCopier(lay_src, CHUNK_TOKENS).gather([1, 2, 3, 4], memoryview(chunk))
    ChunkCopier(lay_dst, CHUNK_TOKENS).scatter(memoryview(chunk), [8, 0, 5, 6], skip=1)
    assert expected_chunk(dst, kind, [0, 5, 6]) == expected_chunk(src, kind, [2, 3, 4])
    untouched = [b for b in range(12) if b not in (0, 5, 6)]  # block 8 skipped (a local hit)
    assert expected_chunk(dst, kind, untouched) == expected_chunk(before, kind, untouched)


def test_chunk_size_is_the_same_whatever_the_layout() -> None:
    sizes = {ChunkCopier(KVLayout.from_kv_caches(make_caches(k, torch.float16), block_size=BLOCK_SIZE),
                         CHUNK_TOKENS).chunk_bytes for k in ("cpu", "flash_nhd", "flash_hnd")}
    assert sizes == {chunk_bytes_for(NUM_LAYERS, HEADS, HEAD_DIM, 2, CHUNK_TOKENS)}


def test_bad_sizes_are_refused_with_the_numbers() -> None:
    copier = ChunkCopier(KVLayout.from_kv_caches(make_caches("cpu", torch.float32), block_size=BLOCK_SIZE),
                         CHUNK_TOKENS)
    with pytest.raises(ValueError, match="a chunk is 4 blocks, got 3"):
        copier.gather([0, 1, 2], memoryview(bytearray(copier.chunk_bytes)))
    with pytest.raises(ValueError, match=f"a chunk is {copier.chunk_bytes} bytes"):
        copier.scatter(memoryview(bytearray(10)), [0, 1, 2, 3])
    with pytest.raises(ValueError, match="not a multiple of the block size"):
        ChunkCopier(copier.layout, BLOCK_SIZE + 1)


def test_fingerprints_differ_in_everything_that_changes_kv() -> None:
    base = dict(model="m", device="cpu", dtype="bfloat16", num_layers=4, num_kv_heads=2, head_dim=64,
                block_size=16, tp_size=1)
    fps = {cache_fingerprint(**base)}
    for key, other in (("model", "m2"), ("device", "cuda"), ("dtype", "float32"), ("num_layers", 5),
                       ("num_kv_heads", 4), ("head_dim", 128), ("block_size", 32), ("tp_size", 2)):
        fps.add(cache_fingerprint(**{**base, key: other}))
    assert len(fps) == 9
