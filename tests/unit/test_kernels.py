"""The torch backend of gather_blocks/scatter_blocks against plain tensor indexing."""

from __future__ import annotations

import warnings
from typing import Any

import pytest

from pdfabric.errors import LayoutError
from pdfabric.kernels import (
    BlockCopyError,
    block_geometry,
    gather_blocks,
    kernel_backend,
    scatter_blocks,
    staging_nbytes,
)

torch = pytest.importorskip("torch")

NUM_BLOCKS = 12
# vLLM's layouts, small: (shape, block dim)
LAYOUTS = {
    "flash_nhd": ((2, NUM_BLOCKS, 4, 2, 8), 1),
    "flash_hnd": ((2, NUM_BLOCKS, 2, 4, 8), 1),
    "cpu": ((NUM_BLOCKS, 2, 4, 16), 0),
    "mla": ((NUM_BLOCKS, 4, 24), 0),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_layers(layout: str, dtype: torch.dtype, n: int = 3, seed: int = 0) -> list[torch.Tensor]:
    shape, _ = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(n)]


def reference_gather(layers: list[torch.Tensor], ids: list[int], block_dim: int) -> torch.Tensor:
    """Rule 1 by advanced indexing: per layer, ``t[..., ids, ...]`` flattened."""
    index = (slice(None),) * block_dim + (torch.tensor(ids, dtype=torch.long),)
    return torch.cat([t[index].reshape(-1) for t in layers])


def random_ids(seed: int, n: int = 7) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, NUM_BLOCKS, (n,), generator=g).tolist()
    return ids + [ids[0], NUM_BLOCKS - 1, 0]  # a repeat, and both ends


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gather_matches_indexing(layout: str, dtype: torch.dtype) -> None:
    layers = make_layers(layout, dtype)
    block_dim = LAYOUTS[layout][1]
    for seed in range(3):
        ids = random_ids(seed)
        got = gather_blocks(layers, ids)
        assert got.dtype == dtype and got.dim() == 1
        assert got.numel() * got.element_size() == staging_nbytes(layers, len(ids))
        assert torch.equal(got, reference_gather(layers, ids, block_dim))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_scatter_of_gather_round_trips_and_touches_nothing_else(layout: str, dtype: torch.dtype) -> None:
    layers = make_layers(layout, dtype)
    block_dim = LAYOUTS[layout][1]
    ids = random_ids(1)
    staging = gather_blocks(layers, ids)
    cache = [torch.zeros_like(t) for t in layers]
    scatter_blocks(cache, ids, staging)
    index = (slice(None),) * block_dim
    for src, dst in zip(layers, cache):
        for b in range(NUM_BLOCKS):
            want = src[index + (b,)] if b in ids else torch.zeros_like(src[index + (b,)])
            assert torch.equal(dst[index + (b,)], want), f"block {b}"


def test_ids_as_tensor_and_into_a_given_buffer() -> None:
    layers = make_layers("flash_nhd", torch.bfloat16)
    ids = [5, 1, 1, 9]
    want = reference_gather(layers, ids, 1)
    for id_tensor in (torch.tensor(ids, dtype=torch.int32), torch.tensor(ids)):
        assert torch.equal(gather_blocks(layers, id_tensor), want)
    out = torch.empty(staging_nbytes(layers, len(ids)), dtype=torch.uint8)
    assert gather_blocks(layers, ids, out) is out
    assert torch.equal(out, want.view(torch.uint8))
    cache = [torch.zeros_like(t) for t in layers]
    scatter_blocks(cache, torch.tensor(ids), out)  # a uint8 staging buffer scatters too
    assert torch.equal(gather_blocks(cache, ids), want)


def test_any_dtype_moves_as_bytes() -> None:
    fp8 = getattr(torch, "float8_e4m3fn", torch.int8)
    layers = [torch.randn(NUM_BLOCKS, 4, 24).to(fp8) for _ in range(2)]
    ids = [3, 0, 11]
    got = gather_blocks(layers, ids)
    want = torch.cat([t.view(torch.uint8)[ids].reshape(-1) for t in layers])
    assert torch.equal(got.view(torch.uint8), want)


def test_block_dim_override_and_empty_ids() -> None:
    layers = [torch.arange(4 * NUM_BLOCKS * 6, dtype=torch.float32).view(4, NUM_BLOCKS, 6) for _ in range(2)]
    geom = block_geometry(layers, block_dim=1)
    assert (geom.outer, geom.num_blocks, geom.inner_bytes) == (4, NUM_BLOCKS, 24)
    assert torch.equal(gather_blocks(layers, [2, 7], block_dim=1), reference_gather(layers, [2, 7], 1))
    empty = gather_blocks(layers, [], block_dim=1)
    assert empty.numel() == 0
    scatter_blocks(layers, [], empty, block_dim=1)


def test_geometry_of_vllm_layouts() -> None:
    flash = block_geometry(make_layers("flash_nhd", torch.bfloat16))
    assert (flash.num_layers, flash.outer, flash.num_blocks, flash.inner_bytes) == (3, 2, NUM_BLOCKS, 4 * 2 * 8 * 2)
    cpu = block_geometry(make_layers("cpu", torch.float32))
    assert (cpu.outer, cpu.num_blocks, cpu.inner_bytes) == (1, NUM_BLOCKS, 2 * 4 * 16 * 4)
    assert kernel_backend("cpu") == "torch"


def _raises(match: str, fn, *args, **kwargs) -> BlockCopyError:  # type: ignore[no-untyped-def]
    with pytest.raises(BlockCopyError, match=match) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, ValueError) and isinstance(info.value, LayoutError)
    return info.value


def test_bad_ids_are_named() -> None:
    layers = make_layers("flash_nhd", torch.float32)
    _raises(r"block_ids\[2\] = 12 is out of range: .*num_blocks=12 \(valid 0\.\.11\)", gather_blocks, layers, [0, 3, 12])
    _raises(r"block_ids\[0\] = -1 is out of range", gather_blocks, layers, torch.tensor([-1, 2]))
    _raises(r"block_ids\[1\] = 99", scatter_blocks, layers, [1, 99], torch.empty(0))
    _raises(r"block_ids: expected a sequence of ints", gather_blocks, layers, [1.5])
    _raises(r"block_ids: expected a 1-D integer tensor, got torch.float32", gather_blocks, layers, torch.tensor([1.0]))
    _raises(r"block_ids: expected a 1-D integer tensor", gather_blocks, layers, torch.tensor([[1]]))


def test_mismatched_layers_are_named() -> None:
    layers = make_layers("flash_nhd", torch.float32)
    _raises(r"layers\[2\]: shape \[2, 11, 4, 2, 8\] differs from \[2, 12, 4, 2, 8\] of layers\[0\]",
            gather_blocks, [*layers[:2], torch.zeros(2, 11, 4, 2, 8)], [0])
    _raises(r"layers\[1\]: dtype torch.bfloat16 differs from torch.float32",
            gather_blocks, [layers[0], layers[1].bfloat16()], [0])
    _raises(r"layers\[1\]: tensor is not contiguous", gather_blocks,
            [layers[0], layers[1].transpose(2, 3).contiguous().transpose(2, 3)], [0])
    _raises(r"layers\[1\]: expected a torch.Tensor, got list", gather_blocks, [layers[0], [1, 2]], [0])
    _raises(r"layers: expected a non-empty sequence", gather_blocks, [], [0])
    _raises(r"layers: expected a non-empty sequence", gather_blocks, layers[0], [0])
    _raises(r"cannot tell the block dim .* pass block_dim=", gather_blocks, [torch.zeros(3, 4)], [0])
    _raises(r"block_dim: expected 0\.\.1 for shape \[3, 4\], got 2", gather_blocks, [torch.zeros(3, 4)], [0], block_dim=2)


def test_bad_staging_is_named() -> None:
    layers = make_layers("mla", torch.bfloat16)
    ids = [1, 2]
    nbytes = staging_nbytes(layers, len(ids))
    _raises(rf"out: holds {nbytes - 2} bytes, expected {nbytes} \(3 layers x 1 x 2 ids x 192 bytes\)",
            gather_blocks, layers, ids, torch.empty(nbytes // 2 - 1, dtype=torch.bfloat16))
    _raises(r"staging: dtype torch.float32 does not match the layers' torch.bfloat16",
            scatter_blocks, layers, ids, torch.empty(nbytes // 4, dtype=torch.float32))
    _raises(r"out: is on meta but the layers are on cpu", gather_blocks, layers, ids,
            torch.empty(nbytes, dtype=torch.uint8, device="meta"))
    _raises(r"staging: must be contiguous", scatter_blocks, layers, ids,
            torch.empty(2 * nbytes, dtype=torch.uint8)[::2])
    _raises(r"staging: expected a torch.Tensor, got bytes", scatter_blocks, layers, ids, bytes(nbytes))
    _raises(r"backend='cuda' needs CUDA tensors; the layers are on cpu", gather_blocks, layers, ids, backend="cuda")
    _raises(r"backend: expected 'auto', 'cuda' or 'torch', got 'gpu'", gather_blocks, layers, ids, backend="gpu")


class _FakeCupy:
    """Just enough of cupy's namespace for ``external_stream``."""

    def __init__(self, from_external: Any) -> None:
        self.made: list[tuple[str, int]] = []
        fake = self

        class Stream:
            pass

        if from_external is not None:
            Stream.from_external = staticmethod(from_external)  # type: ignore[attr-defined]

        class ExternalStream:
            def __init__(self, ptr: int) -> None:
                warnings.warn("ExternalStream is deprecated", DeprecationWarning, stacklevel=2)
                fake.made.append(("ExternalStream", ptr))

        self.cuda = type("cuda", (), {"Stream": Stream, "ExternalStream": ExternalStream})


def test_external_stream_hands_cupy_the_pointer_through_the_stream_protocol() -> None:
    from pdfabric.kernels.cuda import external_stream

    seen = []
    fake = _FakeCupy(lambda obj: seen.append(obj.__cuda_stream__()) or "stream")
    assert external_stream(fake, 0xABC) == "stream"
    assert seen == [(0, 0xABC)] and fake.made == []


@pytest.mark.parametrize("from_external", [None, "refuses"])
def test_external_stream_falls_back_without_the_deprecation_warning(from_external: Any) -> None:
    from pdfabric.kernels.cuda import external_stream

    def refuses(obj: Any) -> Any:
        raise TypeError("wants another protocol version")

    fake = _FakeCupy(refuses if from_external else None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        external_stream(fake, 0x10)
    assert fake.made == [("ExternalStream", 0x10)]


@pytest.mark.parametrize("offset", [0, 1, 2, 4, 8])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_staging_at_any_byte_offset_round_trips(layout: str, offset: int) -> None:
    """The torch backend copies in wide elements when sizes and addresses allow, bytes
    otherwise: a staging buffer that starts at any byte of a larger one gives the same bytes."""
    layers = make_layers(layout, torch.bfloat16)
    ids = random_ids(5)[:-3]  # no repeats: the scatter must be exact
    nbytes = staging_nbytes(layers, len(ids))
    backing = torch.zeros(nbytes + 16, dtype=torch.uint8)
    out = backing[offset: offset + nbytes]
    gather_blocks(layers, ids, out=out)
    want = reference_gather(layers, ids, LAYOUTS[layout][1]).view(torch.uint8)
    assert torch.equal(out, want)
    assert not backing[:offset].any() and not backing[offset + nbytes:].any()  # nothing outside
    fresh = [torch.zeros_like(t) for t in layers]
    scatter_blocks(fresh, ids, out)
    bd = LAYOUTS[layout][1]
    index = (slice(None),) * bd + (torch.tensor(ids),)
    for a, b in zip(fresh, layers):
        assert torch.equal(a[index], b[index])
