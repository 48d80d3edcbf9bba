"""The nixl transport's control messages and its plan -> block-index mapping (pure; no NIXL)."""

from __future__ import annotations

import numpy as np
import pytest

from pdfabric.errors import FrameError, RegistrationError
from pdfabric.transports import _nixl_dlists as d
from pdfabric.transports import _nixl_wire as w

# ------------------------------------------------------------------ messages


@pytest.mark.parametrize(
    "msg",
    [
        w.Hello(1, "a" * 32, "b" * 32, b"\x00md", 1234, "host/boot", "pid:[1]", 99, "pdfabric-nixl-x", "net:[2]"),
        w.HelloOk("c" * 32),
        w.HelloNo(w.Code.STALE, "restarted"),
        w.Ask(7, "req-1/3", 2, w.pack_segments(np.array([[4096, 512]], dtype=np.uint64))),
        w.AskOk(7, 3, b"metadata", [(4096, 8192, 0, 0)]),
        w.AskNo(7, w.Code.REFUSED, "outside the grant"),
        w.Done(7, "req-1/3", 512, b"12345678", b"user notify"),
        w.Nack(7, w.Code.ABORTED, "revoked"),
        w.Cancel(7, "req-1/3", "could not post"),
        w.Ping(),
        w.Pong(),
        w.Bye("closing"),
    ],
)
def test_every_message_round_trips(msg: w.Message) -> None:
    data = w.encode(msg)
    assert data.startswith(w.MAGIC)
    assert w.decode(data) == msg


def test_foreign_and_malformed_notifications_are_frame_errors() -> None:
    with pytest.raises(FrameError, match="foreign notification"):
        w.decode(b"hello from someone else")
    with pytest.raises(FrameError, match="malformed notification"):
        w.decode(w.MAGIC + b"\xc1\x00")
    with pytest.raises(FrameError, match="malformed notification"):
        w.decode(w.MAGIC + w.encode(w.Ping())[len(w.MAGIC) :][:-1] + b"\x93")


def test_peer_info_round_trips_and_refuses_foreign_extra() -> None:
    info = w.PeerInfo(1, "pdfabric-x", b"md", 2, [(1, 2, 0, 0), (3, 4, 1, 5)], "pid:[1]", 42, "bell", "net:[1]")
    assert w.decode_info(w.encode_info(info)) == info
    with pytest.raises(FrameError, match="no pdfabric NIXL agent information"):
        w.decode_info(b"")
    with pytest.raises(FrameError, match="does not decode"):
        w.decode_info(w.MAGIC + b"\x01")


def test_segments_pack_and_refuse_truncation() -> None:
    segs = np.array([[1 << 40, 4096], [(1 << 64) - 4096, 4096]], dtype=np.uint64)
    packed = w.pack_segments(segs)
    assert (w.unpack_segments(packed) == segs).all()
    assert w.digest(packed) == w.digest(bytes(packed)) and len(w.digest(packed)) == 8
    assert w.digest(packed) != w.digest(packed[:16])
    with pytest.raises(FrameError, match="not a whole number"):
        w.unpack_segments(packed[:-1])


# ------------------------------------------------------------------ block indices

KiB, MiB = 1024, 1024 * 1024


def _regs(rows: list[tuple[int, int]], kind: int = 0) -> d.RegSet:
    return d.RegSet.from_rows([(a, n, kind, 0) for a, n in rows], len(rows))


def _pieces(rows: list[tuple[int, int, int]]) -> np.ndarray:
    return np.array(rows, dtype=np.uint64).reshape(-1, 3)


def test_indices_name_exactly_the_granules_of_each_piece() -> None:
    local = _regs([(1 << 30, 4 * MiB), (1 << 32, 2 * MiB)])
    remote = _regs([(1 << 34, 8 * MiB)])
    pieces = _pieces([(1 << 30, (1 << 34) + 64 * KiB, 128 * KiB), ((1 << 32) + 192 * KiB, (1 << 34) + 4 * MiB, 64 * KiB)])
    m = d.map_pieces(pieces, local, remote)
    g = d.granule(m, local, remote)
    assert g == 64 * KiB
    for regs, reg, col in ((local, m.src_reg, 0), (remote, m.dst_reg, 1)):
        built = d.dlist_rows(regs, 0, g)
        assert built is not None
        rows, base = built
        idx = d.block_indices(base, regs, reg, m.pieces[:, col], m.pieces[:, 2], g)
        assert idx.dtype == np.int32
        expect = [a + k * g for a, n in zip(m.pieces[:, col].tolist(), m.pieces[:, 2].tolist(), strict=True) for k in range(n // g)]
        assert rows[idx, 0].tolist() == expect
        assert (rows[idx, 1] == g).all()


def test_granule_is_a_power_of_two_capped() -> None:
    regs = _regs([(1 << 30, 64 * MiB)])
    m = d.map_pieces(_pieces([(1 << 30, 1 << 30, 32 * MiB)]), regs, regs)
    assert d.granule(m, regs, regs) == d.MAX_GRANULE
    m = d.map_pieces(_pieces([((1 << 30) + 3 * 4096, (1 << 30) + 8192, 3 * 4096)]), regs, regs)
    assert d.granule(m, regs, regs) == 4096
    m = d.map_pieces(_pieces([((1 << 30) + 1, 1 << 30, 10)]), regs, regs)
    assert d.granule(m, regs, regs) == 1


def test_piece_across_two_registrations_is_split() -> None:
    local = _regs([(1 << 30, 1 * MiB), ((1 << 30) + 1 * MiB, 1 * MiB)])  # adjacent buffers
    remote = _regs([(1 << 34, 4 * MiB)])
    m = d.map_pieces(_pieces([((1 << 30) + 512 * KiB, 1 << 34, 1 * MiB)]), local, remote)
    assert m.pieces.tolist() == [[(1 << 30) + 512 * KiB, 1 << 34, 512 * KiB], [(1 << 30) + 1 * MiB, (1 << 34) + 512 * KiB, 512 * KiB]]
    assert m.src_reg.tolist() == [0, 1] and m.dst_reg.tolist() == [0, 0]


def test_newest_registration_holds_an_overlapping_piece() -> None:
    regs = _regs([(1 << 30, 4 * MiB), ((1 << 30) + 1 * MiB, 1 * MiB)])
    m = d.map_pieces(_pieces([((1 << 30) + 1 * MiB, (1 << 30) + 1 * MiB, 64 * KiB)]), regs, regs)
    assert m.src_reg.tolist() == [1]


def test_unregistered_and_mixed_memory_are_named() -> None:
    regs = _regs([(1 << 30, 1 * MiB)])
    with pytest.raises(RegistrationError, match=r"destination 4096 bytes at 0x400000000 are not inside the peer's"):
        d.map_pieces(_pieces([(1 << 30, 1 << 34, 4096)]), regs, regs)
    with pytest.raises(RegistrationError, match="source .* this transport's"):
        d.map_pieces(_pieces([((1 << 30) + 1 * MiB - 8, 1 << 30, 16)]), regs, regs)
    mixed = d.RegSet.from_rows([(1 << 30, 1 * MiB, 0, 0), (1 << 32, 1 * MiB, 1, 0)], 2)
    with pytest.raises(RegistrationError, match="must not mix host"):
        d.map_pieces(_pieces([(1 << 30, 1 << 30, 4096), (1 << 32, (1 << 30) + 4096, 4096)]), mixed, mixed)


def test_lists_over_the_entry_budget_are_not_built() -> None:
    regs = _regs([(1 << 30, (d.MAX_ENTRIES + 1) * 4096)])
    assert d.dlist_rows(regs, 0, 4096) is None
    assert d.dlist_rows(regs, 0, 8192) is not None
    built = d.dlist_rows(regs, 1, 4096)  # no VRAM registered: an empty list
    assert built is not None and built[0].shape == (0, 3) and built[1].tolist() == [0]


@pytest.mark.parametrize("seed", range(20))
def test_locate_by_binary_search_agrees_with_a_pass_per_registration(seed: int) -> None:
    """Disjoint registrations (some touching, in any order) are searched by start; the
    answer must be the one the pass over every registration gives, for pieces inside,
    across a boundary, outside, and starting or ending exactly on a boundary."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 40))
    lens = rng.integers(1, 64, n) * 4096
    gaps = rng.integers(0, 3, n) * 4096  # 0: touches the previous one
    starts = (1 << 30) + np.cumsum(gaps + np.concatenate([[0], lens[:-1]]))
    perm = rng.permutation(n)  # registration order is not address order
    regs = d.RegSet.from_rows([(int(starts[i]), int(lens[i]), 0, 0) for i in perm], n)
    assert regs._by_start is not None
    edges = np.concatenate([starts, starts + lens])
    addrs = np.concatenate([rng.integers(starts[0] - 8192, edges.max() + 8192, 300), edges, edges - 4096]).astype(np.uint64)
    plen = np.concatenate([rng.integers(1, 70, len(addrs) - 8) * 1024, [4096, 1, 8192, 1 << 20, 3, 4096, 64, 1]])
    plen = plen[: len(addrs)].astype(np.uint64)
    fast = regs.locate(addrs, plen)
    assert fast.tolist() == regs._locate_each(addrs, plen).tolist()
    assert (fast >= 0).any() and (fast < 0).any()


def test_overlapping_registrations_are_located_one_pass_each() -> None:
    regs = _regs([(1 << 30, 4 * MiB), ((1 << 30) + 1 * MiB, 1 * MiB), ((1 << 30) + 8 * MiB, 1 * MiB)])
    assert regs._by_start is None
    got = regs.locate(np.array([(1 << 30) + 1 * MiB, 1 << 30, (1 << 30) + 8 * MiB], dtype=np.uint64),
                      np.array([4096, 4096, 2 * MiB], dtype=np.uint64))
    assert got.tolist() == [1, 0, -1]
