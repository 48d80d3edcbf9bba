"""The CUDA sources in csrc/ compile with nvcc, and their kernel code is right on the CPU.

No GPU is needed: nvcc compiles without one (skipped, with the reason, when nvcc is not
installed), and ``kv_gather_scatter.cu`` has no shared memory or barriers, so g++ can
build it against a small shim that runs every thread of every CTA one after another.
That run is compared with the torch backend, using the launch shape the CUDA backend
computes.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from pdfabric.kernels import block_geometry, gather_blocks, scatter_blocks
from pdfabric.kernels import cuda as kcuda

torch = pytest.importorskip("torch")

CSRC = Path(__file__).resolve().parents[2] / "csrc"
SOURCES = sorted(CSRC.glob("*.cu"))
TIMEOUT_S = 120


def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


NVCC = find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH or at /usr/local/cuda/bin/nvcc")


def run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"


def test_sources_exist_and_runtime_finds_them() -> None:
    assert CSRC / kcuda.SOURCE_NAME in SOURCES
    assert kcuda.source_path().resolve() == (CSRC / kcuda.SOURCE_NAME).resolve()


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_nvcc_compiles(source: Path, arch: str, tmp_path: Path) -> None:
    assert NVCC is not None
    run([NVCC, "--cubin", f"-arch={arch}", "-Werror", "all-warnings", "-o", str(tmp_path / "k.cubin"), str(source)])


@needs_nvcc
def test_compiles_with_the_runtime_options(tmp_path: Path) -> None:
    """The options given to cupy.RawModule (NVRTC) work, and the kernels keep C names."""
    assert NVCC is not None
    ptx = tmp_path / "k.ptx"
    source = CSRC / kcuda.SOURCE_NAME
    run([NVCC, "--ptx", "-arch=compute_80", *kcuda.NVRTC_OPTIONS, "-Werror", "all-warnings", "-o", str(ptx), str(source)])
    text = ptx.read_text()
    for name in ("kv_gather", "kv_scatter"):
        assert f".entry {name}(" in text, f"{name} is missing or mangled in the PTX"
    assert "v4" in text  # the 16-byte vector path exists


SHIM = r"""
struct kv_dim3 { unsigned x, y, z; };
static kv_dim3 threadIdx, blockIdx, blockDim, gridDim;
struct uint4 { unsigned x, y, z, w; };
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(n)
#include "SOURCE"

extern "C" void kv_emulate(int gather, const kv_u64* ptrs, int outer, kv_i64 num_blocks,
                           kv_i64 inner, const kv_i64* ids, kv_i64 n_ids, kv_byte* staging,
                           kv_i64 chunk, kv_i64 n_work, unsigned grid, unsigned block)
{
    gridDim.x = grid;
    blockDim.x = block;
    for (unsigned b = 0; b < grid; ++b) {
        for (unsigned t = 0; t < block; ++t) {
            blockIdx.x = b;
            threadIdx.x = t;
            if (gather) kv_gather(ptrs, outer, num_blocks, inner, ids, n_ids, staging, chunk, n_work);
            else kv_scatter(ptrs, outer, num_blocks, inner, ids, n_ids, staging, chunk, n_work);
        }
    }
}
"""


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found: cannot run the kernel source on the CPU")
    tmp = tmp_path_factory.mktemp("shim")
    (tmp / "shim.cpp").write_text(SHIM.replace("SOURCE", str(CSRC / kcuda.SOURCE_NAME)))
    lib = tmp / "shim.so"
    run([gxx, "-O1", "-fno-strict-aliasing", "-shared", "-fPIC", "-o", str(lib), str(tmp / "shim.cpp")])
    dll = ctypes.CDLL(str(lib))
    i32, i64, ptr, u32 = ctypes.c_int, ctypes.c_longlong, ctypes.c_void_p, ctypes.c_uint
    dll.kv_emulate.argtypes = [i32, ptr, i32, i64, i64, ptr, i64, ptr, i64, i64, u32, u32]
    dll.kv_emulate.restype = None
    return dll


def emulate(dll: ctypes.CDLL, kind: str, layers: list[torch.Tensor], ids: list[int], staging: torch.Tensor) -> None:
    geom = block_geometry(layers)
    cfg = kcuda.launch_config(geom, len(ids), sm_count=1)  # a small grid: CTAs stride
    ptrs = torch.tensor([t.data_ptr() for t in layers], dtype=torch.int64)
    id_t = torch.tensor(ids, dtype=torch.int64)
    dll.kv_emulate(
        kind == "gather", ptrs.data_ptr(), geom.outer, geom.num_blocks, geom.inner_bytes, id_t.data_ptr(),
        len(ids), staging.data_ptr(), cfg.chunk_bytes, cfg.n_work, cfg.grid, cfg.block,
    )


CASES = {
    # flash, 20 KiB per block and plane: two chunks, the second partial
    "flash-2chunks": ((2, 6, 16, 4, 80), torch.float32),
    "mla": ((6, 4, 24), torch.bfloat16),
    "cpu": ((6, 2, 4, 16), torch.float16),
    # 6 bytes per block: not a multiple of 16, so copies start misaligned (byte path)
    "unaligned": ((6, 1, 3), torch.float16),
}


@pytest.mark.parametrize("case", CASES)
def test_kernel_code_matches_torch_backend(emulator: ctypes.CDLL, case: str) -> None:
    shape, dtype = CASES[case]
    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(shape, generator=g).to(dtype) for _ in range(3)]
    ids = [4, 0, 5, 4, 2]
    want = gather_blocks(layers, ids, backend="torch")
    got = torch.full_like(want, 7)
    emulate(emulator, "gather", layers, ids, got)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))

    cache = [torch.zeros_like(t) for t in layers]
    emulate(emulator, "scatter", cache, ids, want)
    expect = [torch.zeros_like(t) for t in layers]
    scatter_blocks(expect, ids, want, backend="torch")
    for a, b in zip(cache, expect):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_kernel_code_with_a_misaligned_staging_buffer(emulator: ctypes.CDLL) -> None:
    layers = [torch.randn(6, 4, 32) for _ in range(2)]  # 512-byte blocks
    ids = [1, 3]
    want = gather_blocks(layers, ids, backend="torch").view(torch.uint8)
    raw = torch.zeros(want.numel() + 1, dtype=torch.uint8)
    emulate(emulator, "gather", layers, ids, raw[1:])  # one byte off 16-byte alignment
    assert torch.equal(raw[1:], want)
