"""``_iov.local_copy``: gathers and scatters within our own memory (the ucx transport's
packed messages), by ``process_vm_readv`` on our pid or, where a seccomp filter forbids
that, one ``memmove`` per piece."""

from __future__ import annotations

import ctypes
import errno

import numpy as np
import pytest

from pdfabric.errors import FrameError
from pdfabric.transports import _iov
from pdfabric.transports._iov import IOV_MAX, iovecs, local_copy


def _pieces(buf: np.ndarray, offsets: np.ndarray, lens: np.ndarray) -> np.ndarray:
    return iovecs(buf.ctypes.data + offsets.astype(np.uint64), lens.astype(np.uint64))


def _case(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, 5000, n)
    order = rng.permutation(n)  # the pieces sit scattered in src, in a different order
    src = rng.integers(0, 256, int(lens.sum()), dtype=np.uint8)
    offs = np.empty(n, dtype=np.int64)
    offs[order] = np.concatenate([[0], np.cumsum(lens[order])[:-1]])
    return src, offs, lens


@pytest.mark.parametrize("n", [1, 7, IOV_MAX + 5])
@pytest.mark.parametrize("forbidden", [False, True])
def test_gather_then_scatter_gives_back_every_byte(n: int, forbidden: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if forbidden:
        def refuse(*_: object) -> int:
            ctypes.set_errno(errno.EPERM)
            return -1
        monkeypatch.setattr(_iov, "_vm_readv", refuse)
    src, offs, lens = _case(n, n)
    packed = np.zeros(int(lens.sum()), dtype=np.uint8)
    one = iovecs(np.array([packed.ctypes.data], dtype=np.uint64), np.array([len(packed)], dtype=np.uint64))
    assert local_copy(_pieces(src, offs, lens), one) == len(packed)
    expect = np.concatenate([src[o : o + k] for o, k in zip(offs, lens)])
    assert (packed == expect).all()
    back = np.zeros_like(src)
    assert local_copy(one, _pieces(back, offs, lens)) == len(packed)
    assert (back == src).all()


def test_a_region_that_is_not_mapped_is_a_frame_error() -> None:
    dst = np.zeros(64, dtype=np.uint8)
    with pytest.raises(FrameError):
        local_copy(iovecs(np.array([8], dtype=np.uint64), np.array([64], dtype=np.uint64)),
                   iovecs(np.array([dst.ctypes.data], dtype=np.uint64), np.array([64], dtype=np.uint64)))
