"""Host staging of a KV cache in GPU memory over real ``tcp`` transports (needs a GPU; the
CUDA gather/scatter kernels when cupy is installed, torch index ops otherwise): every
layer's blocks are gathered into a page-locked slot, written, and scattered into the
receiver's GPU blocks; the result is checked against tensor indexing."""

from __future__ import annotations

from typing import Iterator

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"),
]

from pdfabric.connector.links import ConsumerLink
from pdfabric.connector.staging import register_memory
from pdfabric.layout import KVLayout
from pdfabric.testing.staging import Side, move_request, tcp_pair
from pdfabric.transports.base import Transport

NB, LAYERS = 64, 4
SHAPES = {"flash_nhd": (2, NB, 16, 8, 128), "flash_hnd": (2, NB, 8, 16, 128), "mla": (NB, 16, 576)}


def kv(kind: str, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return {f"l{i}": torch.randn(SHAPES[kind], generator=g, device="cuda").to(torch.bfloat16) for i in range(LAYERS)}


def blocks(t: torch.Tensor, ids: list[int], kind: str) -> torch.Tensor:
    bd = 1 if kind.startswith("flash") else 0
    return t[(slice(None),) * bd + (torch.tensor(ids, device=t.device),)]


@pytest.fixture
def pair() -> Iterator[tuple[Transport, Transport]]:
    with tcp_pair(streams=2) as p:
        yield p


@pytest.mark.parametrize("from_control_thread", [False, True])
@pytest.mark.parametrize("kind", SHAPES)
def test_gpu_kv_crosses_tcp_through_staging(pair: tuple[Transport, Transport], kind: str,
                                            from_control_thread: bool) -> None:
    sender, receiver = pair
    src_kv, dst_kv = kv(kind, 1), kv(kind, 2)
    before = {n: t.clone() for n, t in dst_kv.items()}
    p_layout = KVLayout.from_kv_caches(src_kv, kind=kind, block_size=16)  # type: ignore[arg-type]
    c_layout = KVLayout.from_kv_caches(dst_kv, kind=kind, block_size=16)  # type: ignore[arg-type]
    assert p_layout.device.startswith("cuda")
    p_st = register_memory(sender, p_layout, src_kv, "auto", 64 << 20)
    c_st = register_memory(receiver, c_layout, dst_kv, "auto", 64 << 20)
    assert p_st is not None and c_st is not None and c_st.pool.tensor.is_pinned()
    link = ConsumerLink("decode", c_layout, sender.connect(receiver.descriptor()))
    src_ids, dst_ids = [5, 6, 7, 40, 2, 63, 0], [9, 10, 11, 3, 62, 1, 30]
    # from_control_thread: the grant came after the layer was saved, so another thread gathers
    move_request(sender, receiver, link, Side(p_layout, p_st), Side(c_layout, c_st), (src_ids, dst_ids),
                 prefix="g", stage_on_thread=from_control_thread)
    assert c_st.pool.in_use == 0 and p_st.pool.in_use == 0
    others = [i for i in range(NB) if i not in dst_ids]
    for name in src_kv:
        assert torch.equal(blocks(dst_kv[name], dst_ids, kind), blocks(src_kv[name], src_ids, kind)), name
        assert torch.equal(blocks(dst_kv[name], others, kind), blocks(before[name], others, kind)), name
