"""``_ucx_wire.message_groups``: how a ucx write's segments travel - one per message, or
runs of small ones packed - which both sides derive from the Ask's segment lengths."""

from __future__ import annotations

import random

import pytest

from pdfabric.transports._ucx_wire import STAGE_BELOW, STAGE_BYTES, STAGE_LIMIT, message_groups

KiB, MiB = 1024, 1024 * 1024


def test_small_segments_pack_up_to_a_message_and_large_ones_go_alone() -> None:
    assert message_groups([]) == []
    assert message_groups([4 * KiB]) == [(0, 1)]
    assert message_groups([32 * KiB] * 40) == [(0, 32), (32, 40)]  # 32 x 32 KiB = 1 MiB
    assert message_groups([STAGE_BELOW - 1, STAGE_BELOW, 1, 2]) == [(0, 1), (1, 2), (2, 4)]
    assert message_groups([2 * MiB, 16 * KiB, 16 * KiB, 2 * MiB]) == [(0, 1), (1, 3), (3, 4)]


def test_past_the_limit_of_a_write_small_segments_go_alone() -> None:
    n = STAGE_LIMIT // (32 * KiB)
    groups = message_groups([32 * KiB] * (n + 3))
    assert groups[-4:] == [(n - 32, n), (n, n + 1), (n + 1, n + 2), (n + 2, n + 3)]


@pytest.mark.parametrize("seed", range(5))
def test_groups_partition_the_segments_in_order_within_every_bound(seed: int) -> None:
    rng = random.Random(seed)
    sizes = [1, 100, 4 * KiB, 32 * KiB, STAGE_BELOW - 1, STAGE_BELOW, MiB, 3 * MiB]
    for _ in range(300):
        lens = [rng.choice(sizes) for _ in range(rng.randint(0, 3000))]
        groups = message_groups(lens)
        assert [i for a, b in groups for i in range(a, b)] == list(range(len(lens)))
        packed = [lens[a:b] for a, b in groups if b - a > 1]
        assert all(max(p) < STAGE_BELOW and sum(p) <= STAGE_BYTES for p in packed)
        assert sum(map(sum, packed)) <= STAGE_LIMIT
