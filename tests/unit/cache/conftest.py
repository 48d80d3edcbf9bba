"""Fixtures for the cache unit tests: realistic chunk sizes (256 tokens of the tiny Llama)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from pdfabric.cache import ChunkKey, chunk_bytes_of
from pdfabric.testing.cache_data import (
    CHUNK_F32,
    TINY_BF16,
    TINY_F32,
    make_chunks,
    make_keys,
)


@pytest.fixture(params=[TINY_F32, TINY_BF16], ids=["f32", "bf16"])
def chunk_bytes(request: pytest.FixtureRequest) -> int:
    """1 MiB (fp32) or 512 KiB (bf16): 256 tokens x 4 layers x K,V x 2 heads x 64."""
    return chunk_bytes_of(request.param, 256)


@pytest.fixture
def chunk_f32() -> int:
    return CHUNK_F32


@pytest.fixture
def data() -> Callable[[int, int], tuple[list[ChunkKey], list[np.ndarray]]]:
    """``data(n, size)``: n chained keys and n random chunks of ``size`` bytes."""
    return lambda n, size: (make_keys(n), make_chunks(n, size))
