"""Realistic cache test data: chunks of 256 tokens of the tiny Llama used in the tests
(4 layers, 2 KV heads, head dim 64, block 16: 1 MiB in fp32, 512 KiB in bf16)."""

from __future__ import annotations

import numpy as np

from pdfabric.cache.keys import ChunkKey, chunk_bytes_of, chunk_keys
from pdfabric.layout import KVGeometry

__all__ = ["CHUNK_F32", "TINY_BF16", "TINY_F32", "make_chunks", "make_keys"]

TINY_F32 = KVGeometry("cpu", num_layers=4, num_blocks=1, block_size=16, num_kv_heads=2, head_dim=64,
                      dtype="float32", element_size=4)  # fmt: skip
TINY_BF16 = KVGeometry("cpu", num_layers=4, num_blocks=1, block_size=16, num_kv_heads=2, head_dim=64,
                       dtype="bfloat16", element_size=2)  # fmt: skip
CHUNK_F32 = chunk_bytes_of(TINY_F32, 256)


def make_keys(n: int, fingerprint: str = "tiny-llama-test") -> list[ChunkKey]:
    """``n`` chained chunk keys of deterministic random prompts (one per fingerprint)."""
    rng = np.random.default_rng(len(fingerprint) + n)
    return chunk_keys(rng.integers(0, 32000, 256 * n).tolist(), fingerprint=fingerprint)


def make_chunks(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` random uint8 chunks of ``size`` bytes."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(n)]
