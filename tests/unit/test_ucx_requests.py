"""How the ucx transport's UCX thread takes completed requests off its lists."""

from __future__ import annotations

from dataclasses import dataclass

from pdfabric.transports._ucx_peer import split_completed


@dataclass
class Req:
    completed: bool


def _items(flags: str) -> list[tuple[Req, int]]:
    return [(Req(c == "x"), i) for i, c in enumerate(flags)]


def test_a_step_takes_only_the_leading_run_of_completed_requests() -> None:
    items = _items("xx.x.")
    done, still = split_completed(items, full=False)
    assert [i for _, i in done] == [0, 1]
    assert [i for _, i in still] == [2, 3, 4]  # 3 waits for the full scan or for 2


def test_nothing_completed_at_the_head_keeps_the_same_list() -> None:
    items = _items(".xx")
    done, still = split_completed(items, full=False)
    assert done == [] and still is items


def test_a_full_scan_takes_every_completed_request_in_order() -> None:
    items = _items(".x.xx")
    done, still = split_completed(items, full=True)
    assert [i for _, i in done] == [1, 3, 4]
    assert [i for _, i in still] == [0, 2]
    assert split_completed([], full=True) == ([], [])
