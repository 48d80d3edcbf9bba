"""The CUDA gather/scatter kernels against the torch backend on the CPU (needs a GPU and cupy)."""

from __future__ import annotations

import importlib.util

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"),
    pytest.mark.skipif(
        importlib.util.find_spec("cupy") is None, reason="needs cupy: pip install 'pdfabric[cuda]'"
    ),
]

from pdfabric.kernels import gather_blocks, kernel_backend, scatter_blocks

NUM_BLOCKS = 40
LAYOUTS = {
    # flash NHD at vLLM's usual size: 32 KiB per block and plane in bf16, two kernel chunks
    "flash": ((2, NUM_BLOCKS, 16, 8, 128), 1),
    "cpu": ((NUM_BLOCKS, 4, 16, 2 * 64), 0),
    "mla": ((NUM_BLOCKS, 16, 576), 0),
    # 30 bytes per block in bf16: copies start misaligned, the byte path runs
    "odd": ((NUM_BLOCKS, 3, 5), 0),
}
IDS = [7, 0, 39, 7, 12, 13, 14, 3]  # a repeat, a run, both ends


def make_layers(shape: tuple[int, ...], dtype: torch.dtype, n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(n)]


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.cpu().view(torch.uint8)


def test_auto_picks_the_kernels() -> None:
    assert kernel_backend("cuda") == "cuda"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gather_matches_cpu(layout: str, dtype: torch.dtype) -> None:
    shape, _ = LAYOUTS[layout]
    host = make_layers(shape, dtype)
    dev = [t.cuda() for t in host]
    want = gather_blocks(host, IDS)
    got = gather_blocks(dev, IDS, backend="cuda")
    assert got.is_cuda
    assert torch.equal(as_bytes(got), as_bytes(want))
    got_dev_ids = gather_blocks(dev, torch.tensor(IDS, device="cuda"), backend="cuda")
    assert torch.equal(as_bytes(got_dev_ids), as_bytes(want))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_scatter_of_gather_round_trips(layout: str, dtype: torch.dtype) -> None:
    shape, block_dim = LAYOUTS[layout]
    host = make_layers(shape, dtype)
    dev = [t.cuda() for t in host]
    staging = gather_blocks(dev, IDS, backend="cuda")
    cache = [torch.zeros_like(t) for t in dev]
    scatter_blocks(cache, IDS, staging, backend="cuda")
    expect = [torch.zeros_like(t) for t in host]
    scatter_blocks(expect, IDS, staging.cpu())
    for got, want in zip(cache, expect):
        assert torch.equal(as_bytes(got), as_bytes(want))
    index = (slice(None),) * block_dim
    untouched = [b for b in range(NUM_BLOCKS) if b not in IDS]
    assert not any(bool(t[index + (untouched,)].any()) for t in cache)


def test_runs_on_the_current_stream_into_a_misaligned_byte_buffer() -> None:
    shape, _ = LAYOUTS["mla"]
    dev = [t.cuda() for t in make_layers(shape, torch.bfloat16)]
    want = gather_blocks([t.cpu() for t in dev], IDS).view(torch.uint8)
    raw = torch.zeros(want.numel() + 1, dtype=torch.uint8, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        gather_blocks(dev, IDS, raw[1:], backend="cuda")
    side.synchronize()
    assert torch.equal(raw[1:].cpu(), want)
