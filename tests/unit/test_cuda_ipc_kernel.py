"""The cuda_ipc copy kernel without a GPU: nvcc compiles it, and g++ runs it on the CPU.

The kernel has no shared memory or barriers, so a small shim (``blockIdx``/``threadIdx``
as globals, ``uint4`` as a struct) lets g++ build it and run every thread of every CTA one
after another, with the launch shapes ``launch_shape`` computes. Skipped, with the reason,
without nvcc or g++.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pdfabric.transports import _cuda_ipc_device as dev

_SHIM = """
#include <algorithm>
struct uint4 { unsigned int x, y, z, w; };
struct dim3 { unsigned int x, y, z; };
static dim3 blockIdx, threadIdx, gridDim;
#define __global__
#define __launch_bounds__(n)
#define __restrict__
using std::min;
"""
_RUN = """
extern "C" void run(const u64* rows, unsigned int first, unsigned int gx, unsigned int gy) {
    gridDim = {gx, gy, 1};
    for (unsigned int y = 0; y < gy; ++y)
        for (unsigned int x = 0; x < gx; ++x)
            for (unsigned int t = 0; t < THREADS; ++t) {
                blockIdx = {x, y, 0};
                threadIdx = {t, 0, 0};
                pdfabric_ipc_copy(rows, first);
            }
}
"""


def _tool(name: str) -> str | None:
    return shutil.which(name) or (f"/usr/local/cuda/bin/{name}" if Path(f"/usr/local/cuda/bin/{name}").is_file() else None)


@pytest.mark.skipif(_tool("nvcc") is None, reason="nvcc not found on PATH or at /usr/local/cuda/bin/nvcc")
def test_kernel_compiles_for_sm80_and_sm90(tmp_path: Path) -> None:
    src = tmp_path / "k.cu"
    src.write_text(dev._kernel_source())
    for arch in ("sm_80", "sm_90"):
        r = subprocess.run([str(_tool("nvcc")), "--cubin", f"-arch={arch}", "-Werror", "all-warnings", "-o",
                            str(tmp_path / "k.cubin"), str(src)], capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
        assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def cpu_kernel(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found (needed to run the kernel on the CPU)")
    d = tmp_path_factory.mktemp("kernel")
    (d / "k.cpp").write_text(_SHIM + dev._kernel_source() + _RUN)
    r = subprocess.run([gxx, "-O1", "-shared", "-fPIC", "-Wno-unknown-pragmas", "-o", str(d / "k.so"), str(d / "k.cpp")],
                       capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    lib = ctypes.CDLL(str(d / "k.so"))
    lib.run.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint]
    return lib


def _copy(lib: ctypes.CDLL, rows: np.ndarray, ctas: int, max_rows: int = 65535) -> None:
    table = np.ascontiguousarray(rows, dtype=np.uint64)
    for first, gx, count in dev.launch_shape(table[:, 2].tolist(), ctas, max_rows):
        lib.run(table.ctypes.data, first, gx, count)


@pytest.mark.parametrize(
    ("lengths", "src_off", "dst_off", "ctas"),
    [
        ([64 << 10] * 8, 0, 0, 1056),  # aligned blocks, one CTA per 16 KiB chunk
        ([(1 << 20) + 7, 1000, 16, 1], 0, 0, 4),  # grid-stride (few CTAs) and byte tails
        ([4096, 33, 70000], 3, 0, 64),  # misaligned source: byte copies
        ([4096, 70000], 16, 8, 64),  # 16-byte source, 8-byte destination
    ],
)
def test_rows_land_exactly_where_they_say(cpu_kernel: ctypes.CDLL, lengths: list[int], src_off: int, dst_off: int, ctas: int) -> None:
    rng = np.random.default_rng(len(lengths))
    total = sum(lengths)
    src = rng.integers(0, 256, total + 64, dtype=np.uint8)
    dst = np.full(2 * total + 4096, 0xA5, dtype=np.uint8)
    rows, s, d, expect = [], src_off, dst_off + 16, dst.copy()
    for n in reversed(lengths):  # destinations in another order than sources
        rows.append([src.ctypes.data + s, dst.ctypes.data + d, n])
        expect[d : d + n] = src[s : s + n]
        s, d = s + n, d + n + 48
    _copy(cpu_kernel, np.array(rows, dtype=np.uint64), ctas)
    assert np.array_equal(dst, expect)


def test_rows_beyond_one_launch_go_in_several(cpu_kernel: ctypes.CDLL) -> None:
    src = np.arange(10 * 32, dtype=np.uint32).view(np.uint8)
    dst = np.zeros_like(src)
    rows = np.array([[src.ctypes.data + i * 128, dst.ctypes.data + (9 - i) * 128, 128] for i in range(10)], dtype=np.uint64)
    assert [(f, c) for f, _, c in dev.launch_shape(rows[:, 2].tolist(), 8, max_rows=3)] == [(0, 3), (3, 3), (6, 3), (9, 1)]
    _copy(cpu_kernel, rows, 8, max_rows=3)
    assert np.array_equal(dst.reshape(10, 128), src.reshape(10, 128)[::-1])


def test_launch_shape_aims_at_one_wave() -> None:
    chunk = dev._CHUNK
    assert dev.launch_shape([2 << 20] * 128, 1056) == [(0, 8, 128)]  # 1056 // 128 CTAs per row
    assert dev.launch_shape([64 << 10] * 1000, 1056) == [(0, 1, 1000)]
    assert dev.launch_shape([256 << 20], 1056) == [(0, 1056, 1)]  # one row: the whole wave strides over it
    assert dev.launch_shape([chunk // 2], 1056) == [(0, 1, 1)]
    assert dev.launch_shape([], 1056) == []


def test_launch_constants_match_the_kernel_source() -> None:
    import re

    src = dev._kernel_source()
    defined = {k: int(v) for k, v in re.findall(r"^#define (THREADS|UNROLL) (\d+)$", src, re.MULTILINE)}
    assert defined == {"THREADS": dev._THREADS, "UNROLL": dev._UNROLL}
    assert dev._CHUNK == dev._THREADS * dev._UNROLL * 16
    assert dev._THREADS * dev._CTAS_PER_SM == 2048  # one full wave: the most threads an SM holds
