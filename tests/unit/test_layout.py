"""KV layout: geometry detection, block regions checked against real tensors, pairing,
fingerprints."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from pdfabric.errors import LayoutError, ProtocolMismatch
from pdfabric.layout import (
    KVGeometry,
    KVLayout,
    LayoutFingerprint,
    coalesce_block_ids,
    pair_columns,
    pair_regions,
)
from pdfabric.memory import view_of
from pdfabric.transports._state import merge_regions
from pdfabric.transports.base import TransferPlan

KINDS = ["cpu", "flash_nhd", "flash_hnd", "mla"]
DTYPES = [torch.float32, torch.bfloat16]
NUM_LAYERS, BLOCK_SIZE, HEADS, HEAD_DIM = 3, 4, 2, 8
SCATTERED = [3, 4, 5, 9, 10, 0, 11, 7]


def shape_of(kind: str, num_blocks: int) -> tuple[int, ...]:
    nb, bs, h, d = num_blocks, BLOCK_SIZE, HEADS, HEAD_DIM
    return {
        "cpu": (nb, h, bs, 2 * d),
        "flash_nhd": (2, nb, bs, h, d),
        "flash_hnd": (2, nb, h, bs, d),
        "mla": (nb, bs, d),
    }[kind]


def make_caches(
    kind: str, dtype: torch.dtype, num_blocks: int = 12, seed: int = 0
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    caches = {}
    for i in range(NUM_LAYERS):
        t = torch.empty(shape_of(kind, num_blocks), dtype=dtype)
        u8 = t.view(torch.uint8)
        u8.copy_(torch.randint(0, 256, u8.shape, dtype=torch.uint8, generator=gen))
        caches[f"model.layers.{i}.self_attn.attn"] = t
    return caches


def block_bytes(t: torch.Tensor, kind: str, seg: int, blk: int) -> torch.Tensor:
    """Bytes of one block of one segment, by tensor indexing (what the layout must match)."""
    u8 = t.view(torch.uint8)
    return (u8[seg, blk] if kind.startswith("flash") else u8[blk]).reshape(-1)


def segments(kind: str) -> range:
    return range(2 if kind.startswith("flash") else 1)


def layout_of(kind: str, caches: dict[str, torch.Tensor]) -> KVLayout:
    return KVLayout.from_kv_caches(caches, block_size=BLOCK_SIZE if kind == "flash_hnd" else None)


# ---- geometry detection --------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_from_kv_caches_detects_geometry(kind: str, dtype: torch.dtype) -> None:
    caches = make_caches(kind, dtype)
    layout = layout_of(kind, caches)
    g = layout.geometry
    assert g.kind == kind
    assert (g.num_layers, g.num_blocks) == (NUM_LAYERS, 12)
    assert (g.block_size, g.head_dim) == (BLOCK_SIZE, HEAD_DIM)
    assert g.num_kv_heads == (1 if kind == "mla" else HEADS)
    assert g.dtype == str(dtype).removeprefix("torch.")
    assert g.element_size == dtype.itemsize
    assert g.tensor_shape == shape_of(kind, 12)
    assert layout.layer_names == tuple(caches)
    t0 = next(iter(caches.values()))
    assert g.layer_bytes == t0.numel() * t0.element_size()
    assert g.block_bytes == g.block_bytes_per_layer * NUM_LAYERS
    assert g.segments_per_block == len(segments(kind))
    regs = layout.registration_regions()
    assert [(r.addr, r.length) for r in regs] == [(t.data_ptr(), g.layer_bytes) for t in caches.values()]


def test_flash_nhd_hnd_disambiguation() -> None:
    caches = make_caches("flash_nhd", torch.float32)
    assert KVLayout.from_kv_caches(caches).geometry.kind == "flash_nhd"
    assert KVLayout.from_kv_caches(caches, block_size=BLOCK_SIZE).geometry.kind == "flash_nhd"
    hnd = KVLayout.from_kv_caches(caches, kind="flash_hnd")
    g = hnd.geometry
    assert (g.kind, g.block_size, g.num_kv_heads) == ("flash_hnd", HEADS, BLOCK_SIZE)
    square = {"l0": torch.zeros(2, 5, 4, 4, 8)}  # block_size == kv heads: ambiguous -> NHD
    assert KVLayout.from_kv_caches(square, block_size=4).geometry.kind == "flash_nhd"
    assert KVLayout.from_kv_caches(square, kind="flash_hnd").geometry.kind == "flash_hnd"


def test_numpy_arrays_are_accepted() -> None:
    arrs = {f"l{i}": np.zeros(shape_of("cpu", 6), dtype=np.float16) for i in range(2)}
    layout = KVLayout.from_kv_caches(arrs)
    g = layout.geometry
    assert (g.kind, g.dtype, g.element_size) == ("cpu", "float16", 2)
    (r,) = layout.regions([2], layers=[1])
    view_of(r)[:] = b"\x01" * r.length
    assert arrs["l1"][2].view(np.uint8).min() == 1 and arrs["l1"].view(np.uint8).sum() == r.length
    assert arrs["l0"].view(np.uint8).sum() == 0


# ---- regions against tensor indexing -----------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_read_through_regions_matches_indexing(kind: str, dtype: torch.dtype) -> None:
    caches = make_caches(kind, dtype)
    layout = layout_of(kind, caches)
    tensors = list(caches.values())
    for layers in (None, [2, 0]):
        got = b"".join(bytes(view_of(r)) for r in layout.regions(SCATTERED, layers))
        order = range(NUM_LAYERS) if layers is None else layers
        want = b"".join(
            block_bytes(tensors[li], kind, s, b).numpy().tobytes()
            for li in order
            for s in segments(kind)
            for b in SCATTERED
        )
        assert got == want


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_write_through_regions_changes_exactly_those_blocks(kind: str, dtype: torch.dtype) -> None:
    caches = make_caches(kind, dtype)
    layout = layout_of(kind, caches)
    tensors = list(caches.values())
    expected = [t.view(torch.uint8).clone() for t in tensors]
    regs = layout.regions(SCATTERED, layers=[0, 2])
    payload = torch.randint(0, 256, (sum(r.length for r in regs),), dtype=torch.uint8)
    pos = 0
    for r in regs:
        view_of(r)[:] = payload[pos : pos + r.length].numpy().tobytes()
        pos += r.length
    seg_bytes, pos = layout.geometry.segment_bytes, 0
    for li in (0, 2):
        for s in segments(kind):
            for b in SCATTERED:
                dst = expected[li][s, b] if kind.startswith("flash") else expected[li][b]
                dst.copy_(payload[pos : pos + seg_bytes].view(dst.shape))
                pos += seg_bytes
    for t, e in zip(tensors, expected):
        assert torch.equal(t.view(torch.uint8), e)


@pytest.mark.parametrize("kind", KINDS)
def test_regions_are_coalesced_per_layer_and_segment(kind: str) -> None:
    layout = layout_of(kind, make_caches(kind, torch.float32))
    nseg, seg = len(segments(kind)), layout.geometry.segment_bytes
    regs = layout.regions([3, 4, 5, 9, 10])
    assert len(regs) == NUM_LAYERS * nseg * 2
    assert [r.length for r in regs[:2]] == [3 * seg, 2 * seg]
    assert len(layout.regions([3, 4, 5, 9, 10], layers=[1])) == nseg * 2
    assert len(layout.regions(range(12))) == NUM_LAYERS * nseg
    assert layout.regions([]) == []
    assert layout.block_regions(5, layer=1) == layout.regions([5], layers=[1])
    assert len(layout.block_regions(5)) == NUM_LAYERS * nseg


def test_coalesce_block_ids() -> None:
    assert coalesce_block_ids([]) == []
    assert coalesce_block_ids([7]) == [(7, 1)]
    assert coalesce_block_ids([3, 4, 5, 9, 10]) == [(3, 3), (9, 2)]
    assert coalesce_block_ids([5, 4, 3]) == [(5, 1), (4, 1), (3, 1)]
    assert coalesce_block_ids([0, 1, 1, 2]) == [(0, 2), (1, 2)]


# ---- explicit geometry and strides -------------------------------------------------


def test_from_geometry_padded_blocks_do_not_coalesce() -> None:
    g = KVGeometry("mla", 1, 4, 2, 1, 4, "float32", 4)  # 32 bytes per block
    buf = (ctypes.c_char * (4 * 48))()
    layout = KVLayout.from_geometry(g, [ctypes.addressof(buf)], block_stride=48)
    base = ctypes.addressof(buf)
    assert [(r.addr - base, r.length) for r in layout.regions([1, 2])] == [(48, 32), (96, 32)]
    assert layout.registration_regions()[0].length == 3 * 48 + 32


def test_from_geometry_interleaved_kv_and_overlap_check() -> None:
    g = KVGeometry("flash_nhd", 2, 4, 2, 1, 4, "float32", 4)  # 32 bytes per segment
    dense = KVLayout.from_geometry(g, [1 << 20, 2 << 20], ["a", "b"])
    assert (dense.block_stride, dense.segment_stride) == (32, 128)
    inter = KVLayout.from_geometry(g, [1 << 20, 2 << 20], block_stride=64, segment_stride=32)
    assert [(r.addr - (1 << 20), r.length) for r in inter.regions([1, 2], layers=[0])] == [
        (64, 32), (128, 32), (96, 32), (160, 32)
    ]
    with pytest.raises(LayoutError, match="overlap"):
        KVLayout.from_geometry(g, [1 << 20, 2 << 20], segment_stride=64)
    with pytest.raises(LayoutError, match="2 layers but 1 names"):
        KVLayout.from_geometry(g, [1 << 20, 2 << 20], ["a"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_blocks": 0}, "num_blocks must be a positive int, got 0"),
        ({"head_dim": -1}, "head_dim must be a positive int"),
        ({"kind": "paged"}, "kind must be one of"),
        ({"dtype": ""}, "dtype must be"),
        ({"kind": "mla", "num_kv_heads": 2}, "num_kv_heads must be 1"),
    ],
)
def test_geometry_validation(kwargs: dict, match: str) -> None:
    args = dict(kind="cpu", num_layers=2, num_blocks=4, block_size=32, num_kv_heads=2, head_dim=64,
                dtype="bfloat16", element_size=2)
    with pytest.raises(LayoutError, match=match):
        KVGeometry(**(args | kwargs))


# ---- pairing -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_pair_regions_with_different_fragmentation(kind: str) -> None:
    src_caches = make_caches(kind, torch.bfloat16, num_blocks=10, seed=1)
    dst_caches = make_caches(kind, torch.bfloat16, num_blocks=16, seed=2)
    src, dst = layout_of(kind, src_caches), layout_of(kind, dst_caches)
    src_ids, dst_ids = [1, 2, 3, 4, 8, 9], [7, 9, 10, 11, 12, 0]
    pairs = pair_regions(src, src_ids, dst, dst_ids)
    # joint runs: (1->7) (2,3,4->9,10,11) (8->12) (9->0)
    assert len(pairs) == NUM_LAYERS * len(segments(kind)) * 4
    assert all(s.length == d.length for s, d in pairs)
    expected = [t.view(torch.uint8).clone() for t in dst_caches.values()]
    for s, d in pairs:
        ctypes.memmove(d.addr, s.addr, s.length)
    for st, e in zip(src_caches.values(), expected):
        for si, di in zip(src_ids, dst_ids):
            for seg in segments(kind):
                idx = (seg, di) if kind.startswith("flash") else (di,)
                e[idx] = st.view(torch.uint8)[(seg, si) if kind.startswith("flash") else (si,)]
    for t, e in zip(dst_caches.values(), expected):
        assert torch.equal(t.view(torch.uint8), e)
    assert len(pair_regions(src, [1, 2], dst, [3, 4], layers=[1])) == len(segments(kind))


@pytest.mark.parametrize("kind", KINDS)
def test_pair_columns_feed_a_plan_that_moves_the_same_bytes(kind: str) -> None:
    src_caches = make_caches(kind, torch.bfloat16, num_blocks=10, seed=3)
    dst_caches = make_caches(kind, torch.bfloat16, num_blocks=16, seed=4)
    src, dst = layout_of(kind, src_caches), layout_of(kind, dst_caches)
    s, d, n = pair_columns(src, [5, 6, 0], dst, [2, 3, 15], layers=[1])
    assert s.dtype == d.dtype == n.dtype == np.uint64
    plan = TransferPlan.from_arrays("t", s, d, n)
    assert list(zip(plan.src, plan.dst)) == pair_regions(src, [5, 6, 0], dst, [2, 3, 15], layers=[1])
    for a, b, k in plan.columns.tolist():
        ctypes.memmove(b, a, k)
    names = list(src_caches)
    for si, di in ((5, 2), (6, 3), (0, 15)):
        for seg in segments(kind):
            sidx = (seg, si) if kind.startswith("flash") else (si,)
            didx = (seg, di) if kind.startswith("flash") else (di,)
            assert torch.equal(dst_caches[names[1]].view(torch.uint8)[didx], src_caches[names[1]].view(torch.uint8)[sidx])
    first = (0, 2) if kind.startswith("flash") else (2,)
    assert not torch.equal(dst_caches[names[0]].view(torch.uint8)[first], src_caches[names[0]].view(torch.uint8)[first[:-1] + (5,)])
    assert all(len(c) == 0 for c in pair_columns(src, [], dst, []))


@pytest.mark.parametrize("kind", KINDS)
def test_region_array_covers_the_same_bytes_as_regions(kind: str) -> None:
    lay = layout_of(kind, make_caches(kind, torch.float32))
    for ids, layers in ((SCATTERED, None), ([2, 3, 4, 7], [1]), ([], None)):
        got = merge_regions(list(lay.region_array(ids, layers)))
        assert got == merge_regions(lay.regions(ids, layers))
        assert sum(r.length for r in got) == len(ids) * lay.geometry.block_bytes_per_layer * (NUM_LAYERS if layers is None else 1)
    with pytest.raises(LayoutError, match="block id 12 is out of range"):
        lay.region_array([12])


def test_pair_regions_refuses_mismatches() -> None:
    a = layout_of("cpu", make_caches("cpu", torch.float32))
    b = layout_of("cpu", make_caches("cpu", torch.bfloat16))
    with pytest.raises(LayoutError, match="dtype src=float32 dst=bfloat16"):
        pair_regions(a, [1], b, [1])
    with pytest.raises(LayoutError, match="cannot pair 2 source block ids with 1"):
        pair_regions(a, [1, 2], a, [1])
    with pytest.raises(LayoutError, match="block id 12 is out of range.*num_blocks=12"):
        pair_regions(a, [1], a, [12])


# ---- bad input ---------------------------------------------------------------------


def test_non_contiguous_layer_is_named() -> None:
    caches = make_caches("flash_nhd", torch.float32)
    hnd = torch.zeros(2, 12, HEADS, BLOCK_SIZE, HEAD_DIM)
    caches["model.layers.1.self_attn.attn"] = hnd.transpose(2, 3)  # NHD shape, HND memory
    name = r"kv_caches\['model.layers.1.self_attn.attn'\]"
    with pytest.raises(LayoutError, match=name + ": tensor is not contiguous"):
        KVLayout.from_kv_caches(caches)


def test_mismatched_layers_are_named() -> None:
    caches = make_caches("cpu", torch.float32)
    caches["model.layers.2.self_attn.attn"] = torch.zeros(shape_of("cpu", 11))
    with pytest.raises(LayoutError, match=r"'model.layers.2.self_attn.attn'\]: shape \(11,.*differs"):
        KVLayout.from_kv_caches(caches)
    caches["model.layers.2.self_attn.attn"] = torch.zeros(shape_of("cpu", 12), dtype=torch.float16)
    with pytest.raises(LayoutError, match="dtype float16 differs from float32"):
        KVLayout.from_kv_caches(caches)


@pytest.mark.parametrize(
    ("caches", "kwargs", "match"),
    [
        ({"l0": torch.zeros(4, 64)}, {}, r"kv_caches\['l0'\]: cannot describe a tensor of shape \[4, 64\]"),
        ({"l0": torch.zeros(3, 4, 2, 8, 8)}, {}, "cannot describe"),
        ({"l0": torch.zeros(4, 2, 32, 7)}, {}, "even last dim"),
        ({"l0": torch.zeros(4, 2, 32, 8)}, {"block_size": 16}, "has block_size 32, but block_size=16"),
        ({"l0": torch.zeros(4, 2, 32, 8)}, {"kind": "mla"}, "kind 'mla' expects a 3-D tensor"),
        ({"l0": torch.zeros(4, 2, 32, 8)}, {"kind": "paged"}, "unknown layout kind 'paged'"),
        ({"l0": [1, 2, 3]}, {}, "expected a torch tensor or numpy array, got list"),
        ({}, {}, "kv_caches is empty"),
    ],
)
def test_bad_kv_caches(caches: dict, kwargs: dict, match: str) -> None:
    with pytest.raises(LayoutError, match=match):
        KVLayout.from_kv_caches(caches, **kwargs)


def test_bad_block_ids_and_layers() -> None:
    layout = layout_of("mla", make_caches("mla", torch.float32))
    with pytest.raises(LayoutError, match=r"block id 12 is out of range: this layout has num_blocks=12"):
        layout.regions([1, 12])
    with pytest.raises(LayoutError, match="block id -1 is out of range"):
        layout.regions([-1])
    with pytest.raises(LayoutError, match="block ids must be integers"):
        layout.regions([1.5])  # type: ignore[list-item]
    with pytest.raises(LayoutError, match="layer index 3 is out of range: this layout has 3 layers"):
        layout.regions([1], layers=[3])
    assert layout.regions(np.array([1, 2])) == layout.regions([1, 2])


# ---- fingerprints ------------------------------------------------------------------


def fp(**over: object) -> LayoutFingerprint:
    base = dict(model="tiny-llama", kind="cpu", dtype="bfloat16", block_size=32, num_layers=4,
                num_kv_heads=2, head_dim=64, tp_rank=0, tp_size=1)
    return LayoutFingerprint(**(base | over))  # type: ignore[arg-type]


def test_fingerprint_from_layout_ignores_num_blocks() -> None:
    a = layout_of("cpu", make_caches("cpu", torch.bfloat16, num_blocks=6))
    b = layout_of("cpu", make_caches("cpu", torch.bfloat16, num_blocks=9))
    fa, fb = a.fingerprint("m", tp_rank=1, tp_size=2), b.fingerprint("m", tp_rank=1, tp_size=2)
    assert fa == fb and fa.digest() == fb.digest()
    assert (fa.kind, fa.block_size, fa.num_kv_heads, fa.tp_rank) == ("cpu", BLOCK_SIZE, HEADS, 1)
    fa.check_compatible(fb)


def test_fingerprint_digest_is_stable_and_distinguishing() -> None:
    d = fp().digest()
    assert len(d) == 64 and d == fp().digest()
    # Golden value: changing the encoding breaks handshakes between versions.
    assert d == GOLDEN_DIGEST
    others = [fp(model="x"), fp(kind="mla"), fp(dtype="float16"), fp(block_size=16), fp(num_layers=5),
              fp(num_kv_heads=4), fp(head_dim=128), fp(tp_rank=1, tp_size=2), fp(tp_size=2)]
    assert len({d, *(o.digest() for o in others)}) == len(others) + 1
    assert LayoutFingerprint.from_dict(fp().as_dict()) == fp()
    with pytest.raises(ProtocolMismatch, match=r"unexpected \['extra'\]"):
        LayoutFingerprint.from_dict(fp().as_dict() | {"extra": 1})


def test_check_compatible_names_every_difference() -> None:
    with pytest.raises(ProtocolMismatch) as info:
        fp(block_size=32).check_compatible(
            fp(block_size=16, dtype="float16"), local="prefill", remote="decode"
        )
    msg = str(info.value)
    assert msg.startswith("layout mismatch: ")
    assert "block_size prefill=32 decode=16" in msg
    assert "dtype prefill=bfloat16 decode=float16" in msg
    assert "model" not in msg.split(" - ")[0]
    with pytest.raises(ProtocolMismatch, match="tp_rank local=0 remote=1"):
        fp(tp_size=2).check_compatible(fp(tp_rank=1, tp_size=2))


def test_fingerprint_validation() -> None:
    with pytest.raises(LayoutError, match="tp_rank must be in 0..1"):
        fp(tp_rank=2, tp_size=2)
    with pytest.raises(LayoutError, match="kind must be one of"):
        fp(kind="paged")


GOLDEN_DIGEST = "55fb4a3d927095d011c76723e9a8d08663bdeb2796abca5512f094f36a76f90a"
