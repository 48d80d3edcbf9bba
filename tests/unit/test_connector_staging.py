"""Host staging (``pdfabric.connector.staging``): the pool, the slot layouts, and whole
layer transfers over real ``tcp`` transports in every stage/no-stage combination,
checked against tensor indexing."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Iterator

import pytest

from pdfabric.connector.links import ConsumerLink
from pdfabric.connector.staging import StagingFull, StagingPool, Stager, register_memory, slot_layout, staging_needed
from pdfabric.errors import ConfigError
from pdfabric.layout import KVLayout
from pdfabric.testing.staging import Side, move_request, tcp_pair
from pdfabric.transports._state import merge_regions
from pdfabric.transports.base import Transport
from pdfabric.transports.tcp import TcpTransport

torch = pytest.importorskip("torch")

NB = 10
LAYERS = 3
# vLLM layouts, small, block size 4: kind -> (shape, block dim)
KINDS = {
    "flash_nhd": ((2, NB, 4, 2, 8), 1),
    "flash_hnd": ((2, NB, 2, 4, 8), 1),
    "cpu": ((NB, 2, 4, 16), 0),
    "mla": ((NB, 4, 24), 0),
}


def kv(kind: str, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"l{i}": torch.randn(KINDS[kind][0], generator=g).to(torch.bfloat16) for i in range(LAYERS)}


def blocks(t: torch.Tensor, ids: list[int], block_dim: int) -> torch.Tensor:
    return t[(slice(None),) * block_dim + (torch.tensor(ids),)]


# -- pool ---------------------------------------------------------------------------------
def test_pool_first_fit_aligned_and_merges_on_free() -> None:
    pool = StagingPool(64 << 10, pinned=False)
    a, b, c = pool.alloc(1), pool.alloc(5000), pool.alloc(4096)
    assert (a, b, c) == (0, 4096, 12288) and pool.in_use == 16384
    assert pool.region().addr == pool.base and pool.region().length == 64 << 10
    pool.free(b)
    assert pool.alloc(8192) == 4096  # the hole is reused
    pool.free(a)
    pool.free(4096)
    pool.free(c)
    assert pool.in_use == 0
    assert pool.alloc(64 << 10) == 0  # everything merged back into one run
    assert pool.alloc(1) is None


def test_pool_refuses_bad_size_and_unknown_free() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        StagingPool(0, pinned=False)
    pool = StagingPool(8192, pinned=False)
    with pytest.raises(KeyError):
        pool.free(4096)


def test_stager_full_raises_counts_and_leaves_nothing_held() -> None:
    caches = kv("flash_nhd", 0)
    layout = KVLayout.from_kv_caches(caches, block_size=4)
    st = Stager(layout, list(caches.values()), 4096)
    need = st.layer_bytes(20) * LAYERS
    with pytest.raises(StagingFull, match=f"4096 bytes, 0 in use\\) has no room for {need} bytes; raise staging_bytes"):
        st.reserve(20)
    off = st.reserve(5)  # 3840 bytes: the whole (aligned) pool
    with pytest.raises(StagingFull):
        st.stage([0, 1, 2, 3, 4], 0)
    assert st.full == 2 and st.pool.in_use == 4096
    st.release(off)
    assert st.pool.in_use == 0


# -- when to stage ------------------------------------------------------------------------
def _transport(device_memory: bool) -> SimpleNamespace:
    return SimpleNamespace(name="tcp", capabilities=SimpleNamespace(device_memory=device_memory))


@pytest.mark.parametrize(
    "mode,device,reach,want",
    [("auto", "cpu", False, False), ("auto", "cuda:0", False, True), ("auto", "cuda:0", True, False),
     ("always", "cpu", False, True), ("always", "cuda:0", True, True), ("never", "cpu", False, False),
     ("never", "cuda:0", True, False)],
)
def test_staging_needed(mode: str, device: str, reach: bool, want: bool) -> None:
    assert staging_needed(mode, device, _transport(reach)) is want  # type: ignore[arg-type]


def test_never_with_unreachable_kv_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="staging.*KV cache is on cuda:1 and the tcp transport moves host memory only"):
        staging_needed("never", "cuda:1", _transport(False))


# -- whole transfers ----------------------------------------------------------------------
@pytest.fixture
def pair() -> Iterator[tuple[Transport, Transport]]:
    with tcp_pair() as p:
        yield p


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p_stages,c_stages", [(True, True), (True, False), (False, True)])
def test_layer_transfers_land_in_the_granted_blocks(pair: tuple[Transport, Transport], kind: str,
                                                     p_stages: bool, c_stages: bool) -> None:
    sender, receiver = pair
    block_dim = KINDS[kind][1]
    src_kv, dst_kv = kv(kind, 1), kv(kind, 2)
    before = {n: t.clone() for n, t in dst_kv.items()}
    p_layout = KVLayout.from_kv_caches(src_kv, kind=kind, block_size=4)  # type: ignore[arg-type]
    c_layout = KVLayout.from_kv_caches(dst_kv, kind=kind, block_size=4)  # type: ignore[arg-type]
    p_st = Stager(p_layout, list(src_kv.values()), 1 << 20) if p_stages else None
    c_st = Stager(c_layout, list(dst_kv.values()), 1 << 20) if c_stages else None
    sender.register([p_st.pool.region()] if p_st else p_layout.registration_regions())
    receiver.register([c_st.pool.region()] if c_st else c_layout.registration_regions())
    link = ConsumerLink("decode", c_layout, sender.connect(receiver.descriptor()))
    src_ids, dst_ids = [7, 2, 3, 4, 0], [1, 2, 3, 9, 5]  # runs and jumps on both sides
    move_request(sender, receiver, link, Side(p_layout, p_st), Side(c_layout, c_st), (src_ids, dst_ids),
                 prefix="t", timeout=10, max_pieces=2 if p_st and c_st else 10)  # staged: one run per K/V plane
    assert (c_st is None or c_st.pool.in_use == 0) and (p_st is None or p_st.pool.in_use == 0)
    for name in src_kv:
        got, want = dst_kv[name], src_kv[name]
        assert torch.equal(blocks(got, dst_ids, block_dim), blocks(want, src_ids, block_dim)), name
        others = [i for i in range(NB) if i not in dst_ids]
        assert torch.equal(blocks(got, others, block_dim), blocks(before[name], others, block_dim)), name


def test_slot_layout_is_the_kernels_staging_order() -> None:
    """A consumer slot holds what gather_blocks writes for the same ids, layer by layer."""
    from pdfabric.kernels import gather_blocks

    caches = kv("flash_hnd", 3)
    layout = KVLayout.from_kv_caches(caches, kind="flash_hnd", block_size=4)
    st = Stager(layout, list(caches.values()), 1 << 20)
    ids = [4, 1, 8]
    off = st.reserve(len(ids))
    slot = slot_layout(layout, st.pool.base + off, len(ids))
    flat = gather_blocks(list(caches.values()), ids).view(torch.uint8)
    pos = 0
    for r in slot.region_array(list(range(len(ids)))):
        assert r.addr - st.pool.base - off == pos
        pos += r.length
    assert pos == flat.numel()
    st.release(off)


def test_refused_start_closes_the_transport() -> None:
    caches = kv("cpu", 4)
    host = KVLayout.from_kv_caches(caches, block_size=4)
    on_gpu = KVLayout.from_geometry(host.geometry, list(host.layer_addrs), list(host.layer_names), device="cuda:0")
    t = TcpTransport()
    with pytest.raises(ConfigError, match="kv_connector_extra_config: staging: the KV cache is on cuda:0"):
        register_memory(t, on_gpu, caches, "never", 1 << 20)
    assert t.alive_threads() == []
    with pytest.raises(Exception, match="closed"):
        t.register(host.registration_regions())


def test_register_memory_registers_the_pool_or_the_kv() -> None:
    caches = kv("cpu", 5)
    layout = KVLayout.from_kv_caches(caches, block_size=4)
    for mode, staged in (("auto", False), ("always", True)):
        t = TcpTransport()
        try:
            st = register_memory(t, layout, caches, mode, 1 << 20)  # type: ignore[arg-type]
            assert (st is not None) is staged
            want = [st.pool.region()] if st else layout.registration_regions()
            key = lambda r: (r.addr, r.length)  # noqa: E731
            assert sorted(t._mem.regions(), key=key) == sorted(merge_regions(want), key=key)
        finally:
            t.close()


def test_the_shared_cache_is_off_for_a_gpu_kv_cache(caplog: pytest.LogCaptureFixture) -> None:
    """The cache copies KV through host pointers: on a GPU it must stay off (not crash)."""
    from pdfabric.connector.settings import resolve_settings
    from pdfabric.connector.worker import FabricWorker

    s = resolve_settings({"cache": {"tiers": [{"kind": "memory", "size": "4MiB"}], "chunk_tokens": 4}},
                         needs_control_port=False)
    w = FabricWorker(s, engine="decode-0", model="m", producer=False, consumer=True, block_size=4)
    host = KVLayout.from_kv_caches(kv("cpu", 6), block_size=4)
    on_gpu = KVLayout.from_geometry(host.geometry, list(host.layer_addrs), device="cuda:0")
    with caplog.at_level("ERROR", logger="pdfabric.connector"):
        assert w._open_cache(on_gpu) is None
    assert "shared cache is off for decode-0: its KV is on cuda:0" in caplog.text
    mover = w._open_cache(host)  # host KV: the cache opens
    assert mover is not None
    mover.close()
