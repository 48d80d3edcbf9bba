"""checksum64: equal for equal bytes in any buffer type; changes on the faults it guards against."""

from __future__ import annotations

import numpy as np
import pytest

from pdfabric.cache import checksum64


@pytest.mark.parametrize("n", [0, 1, 7, 8, 4095, 4096, 4097, 1 << 20, (1 << 20) + 3])
def test_same_bytes_same_sum_any_buffer(n: int) -> None:
    a = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    assert checksum64(a) == checksum64(bytes(a)) == checksum64(memoryview(a)) == checksum64(bytearray(a))
    assert 0 <= checksum64(a) < 2**64


def test_detects_flips_truncation_zeroed_pages_and_moved_rows() -> None:
    a = np.random.default_rng(1).integers(0, 256, 1 << 20, dtype=np.uint8)
    base = checksum64(a)
    for pos in (0, 8, 4095, 500_000, (1 << 20) - 1):
        for bit in (0, 7):
            b = a.copy()
            b[pos] ^= 1 << bit
            assert checksum64(b) != base
    assert checksum64(a[:-4096]) != base
    assert checksum64(np.concatenate([a, np.zeros(8, np.uint8)])) != base
    z = a.copy()
    z[8192:12288] = 0
    assert checksum64(z) != base
    rows = a.reshape(-1, 4096).copy()
    rows[[3, 9]] = rows[[9, 3]]
    assert checksum64(rows.reshape(-1)) != base
    assert checksum64(np.zeros(4096, np.uint8)) != checksum64(np.zeros(8192, np.uint8))
