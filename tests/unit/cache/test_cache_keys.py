"""Chunk keys: deterministic across processes, isolated by fingerprint and salt, prefix-closed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pdfabric.cache import (
    KEY_BYTES,
    ChunkKeyer,
    check_chunk_tokens,
    chunk_bytes_of,
    chunk_keys,
    key_hex,
)
from pdfabric.layout import KVGeometry, LayoutFingerprint

TOKENS = list(range(1000, 1000 + 256 * 6 + 100))  # six full chunks and a partial one

_CHILD = """
import json, sys
from pdfabric.cache import chunk_keys
tokens = json.loads(sys.argv[1])
print(json.dumps([k.hex() for k in chunk_keys(tokens, fingerprint="model-a/layout-1", salt="tenant-7")]))
"""


def _keys_in_child(seed: str) -> list[str]:
    env = dict(os.environ, PYTHONHASHSEED=seed)
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(TOKENS)], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    return json.loads(out.stdout)


def test_same_keys_in_processes_with_different_hash_seeds() -> None:
    a, b = _keys_in_child("1"), _keys_in_child("12345")
    here = [key_hex(k) for k in chunk_keys(TOKENS, fingerprint="model-a/layout-1", salt="tenant-7")]
    assert a == b == here
    assert len(a) == 6


def test_only_full_chunks_get_keys_of_16_bytes() -> None:
    keys = chunk_keys(TOKENS, fingerprint="fp")
    assert len(keys) == len(TOKENS) // 256
    assert all(isinstance(k, bytes) and len(k) == KEY_BYTES for k in keys)
    assert len(set(keys)) == len(keys)
    assert chunk_keys(TOKENS[:255], fingerprint="fp") == []
    assert len(key_hex(keys[0])) == 32


def test_prefix_property() -> None:
    keys = chunk_keys(TOKENS, fingerprint="fp")
    for n in range(0, len(TOKENS), 97):
        part = chunk_keys(TOKENS[:n], fingerprint="fp")
        assert part == keys[: len(part)]


def test_a_changed_token_changes_its_chunk_and_every_later_key() -> None:
    keys = chunk_keys(TOKENS, fingerprint="fp")
    changed = list(TOKENS)
    changed[256 * 2 + 5] += 1
    other = chunk_keys(changed, fingerprint="fp")
    assert other[:2] == keys[:2]
    assert all(a != b for a, b in zip(other[2:], keys[2:]))


def test_fingerprint_and_salt_give_disjoint_keys() -> None:
    base = set(chunk_keys(TOKENS, fingerprint="fp-a"))
    assert base.isdisjoint(chunk_keys(TOKENS, fingerprint="fp-b"))
    assert base.isdisjoint(chunk_keys(TOKENS, fingerprint="fp-a", salt="tenant-1"))
    assert set(chunk_keys(TOKENS, fingerprint="fp-a", salt="t1")).isdisjoint(
        chunk_keys(TOKENS, fingerprint="fp-a", salt="t2")
    )


def test_layout_fingerprint_is_accepted_and_differs_by_dtype() -> None:
    fp = dict(model="tiny", kind="cpu", block_size=16, num_layers=4, num_kv_heads=2, head_dim=64, tp_rank=0, tp_size=1)
    f32 = LayoutFingerprint(dtype="float32", **fp)  # type: ignore[arg-type]
    bf16 = LayoutFingerprint(dtype="bfloat16", **fp)  # type: ignore[arg-type]
    k1 = chunk_keys(TOKENS, fingerprint=f32)
    assert k1 == chunk_keys(TOKENS, fingerprint=f32.digest())
    assert set(k1).isdisjoint(chunk_keys(TOKENS, fingerprint=bf16))


def test_numpy_tokens_match_lists() -> None:
    arr = np.asarray(TOKENS, dtype=np.int64)
    assert chunk_keys(arr, fingerprint="fp") == chunk_keys(TOKENS, fingerprint="fp")
    assert chunk_keys(arr.astype(np.uint32), fingerprint="fp") == chunk_keys(TOKENS, fingerprint="fp")


def test_chunk_tokens_must_be_a_multiple_of_the_block_size() -> None:
    assert check_chunk_tokens(256, 16) == 256
    with pytest.raises(ValueError, match=r"not a multiple of the engine block size 32.*use 224 or 256"):
        ChunkKeyer.create("fp", 250, block_size=32)
    with pytest.raises(ValueError, match="positive"):
        ChunkKeyer.create("fp", 0)
    with pytest.raises(ValueError, match="non-empty"):
        ChunkKeyer.create("", 256)


def test_bad_tokens_are_refused() -> None:
    with pytest.raises(ValueError, match="outside"):
        chunk_keys([-1] * 256, fingerprint="fp")
    with pytest.raises(ValueError, match="outside"):
        chunk_keys([2**32] * 256, fingerprint="fp")


def test_keyer_with_other_chunk_size() -> None:
    k = ChunkKeyer.create("fp", 32, block_size=16)
    assert len(k.keys(TOKENS)) == len(TOKENS) // 32
    assert k.num_chunks(100) == 3


def test_chunk_bytes_of_tiny_llama() -> None:
    g = KVGeometry("cpu", num_layers=4, num_blocks=1, block_size=16, num_kv_heads=2, head_dim=64,
                   dtype="float32", element_size=4)  # fmt: skip
    assert chunk_bytes_of(g, 256) == 256 * 4 * 2 * 2 * 64 * 4 == 1 << 20
    with pytest.raises(ValueError, match="multiple"):
        chunk_bytes_of(g, 100)


def test_request_salt_and_extras_change_the_chain_where_they_apply() -> None:
    k = ChunkKeyer.create("fp", 16)
    tokens = list(range(64))  # four chunks
    plain = k.keys(tokens)
    assert k.keys(tokens, salt=None, extras=()) == plain == k.keys(tokens, salt="")
    salted = k.keys(tokens, salt="tenant")
    assert all(a != b for a, b in zip(plain, salted)) and k.keys(tokens, salt=b"tenant") == salted
    assert ChunkKeyer.create("fp", 16, salt="tenant").keys(tokens) != salted  # engine salt != request salt
    img = k.keys(tokens, extras=[(20, b"image-1")])  # position 20: chunk 1
    assert img[0] == plain[0] and all(a != b for a, b in zip(plain[1:], img[1:]))
    assert k.keys(tokens, extras=[(31, b"image-1")]) == img  # same chunk, same key
    assert k.keys(tokens, extras=[(20, b"image-2")])[1] != img[1]
    two = k.keys(tokens, extras=[(40, b"b"), (20, b"a")])
    assert two == k.keys(tokens, extras=[(20, b"a"), (40, b"b")]) and two[1] == k.keys(tokens, extras=[(20, b"a")])[1]
    assert k.keys(tokens, extras=[(500, b"past the end")]) == plain
    with pytest.raises(ValueError, match="token position -1"):
        k.keys(tokens, extras=[(-1, b"x")])
