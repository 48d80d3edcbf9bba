"""One request's KV moved layer by layer the way the connector moves it, with or without
host staging on either side (tests and ``benchmarks/staging_overhead.py``).

Per layer: the receiver grants the layer's blocks (or its staging slot), the producer
gathers the layer into a slot when it stages, the write goes out and is waited for, then
the consumer scatters a staged layer into its KV blocks. Slots are released at the end, as
the connector does at ``Finish``.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

from pdfabric.connector.links import ConsumerLink
from pdfabric.connector.staging import Stager, slot_layout
from pdfabric.layout import KVLayout
from pdfabric.transports.base import Transport

__all__ = ["Side", "move_request", "tcp_pair"]


@dataclass(frozen=True)
class Side:
    """One end of a request: its KV layout and, when it stages, its ``Stager``."""

    layout: KVLayout
    stager: Stager | None = None


@contextmanager
def tcp_pair(streams: int = 1) -> Iterator[tuple[Transport, Transport]]:
    """Two ``tcp`` transports in this process, closed on exit."""
    from pdfabric.transports.tcp import TcpTransport

    a, b = TcpTransport(streams=streams), TcpTransport(streams=streams)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def move_request(
    sender: Transport,
    receiver: Transport,
    link: ConsumerLink,
    producer: Side,
    consumer: Side,
    ids: tuple[Sequence[int], Sequence[int]],
    *,
    prefix: str = "req",
    timeout: float = 30.0,
    stage_on_thread: bool = False,
    max_pieces: int | None = None,
) -> None:
    """Move blocks ``ids[0]`` of the producer into blocks ``ids[1]`` of the consumer, every
    layer, as transfers ``{prefix}#{layer}``.

    ``stage_on_thread``: the producer gathers each layer on another thread (as when a grant
    arrives after the layer was saved). ``max_pieces``: assert each plan has at most this
    many pieces (staged sides collapse to one run per K/V plane)."""
    src_ids, dst_ids = list(ids[0]), list(ids[1])
    n = len(dst_ids)
    p_st, c_st = producer.stager, consumer.stager
    slot = staging = 0
    if c_st is not None:
        slot = c_st.reserve(n)
        staging = c_st.pool.base + slot
    try:
        for layer in range(producer.layout.geometry.num_layers):
            tid = f"{prefix}#{layer}"
            if c_st is not None:
                receiver.grant(tid, slot_layout(consumer.layout, staging, n).region_array(list(range(n)), [layer]))
            else:
                receiver.grant(tid, consumer.layout.region_array(dst_ids, [layer]))
            here, s_ids, off = producer.layout, src_ids, None
            if p_st is not None:
                off, here = _stage(p_st, src_ids, layer, stage_on_thread, timeout)
                s_ids = list(range(len(src_ids)))
            try:
                plan = link.plan(tid, here, s_ids, dst_ids, layer, staging)
                if max_pieces is not None:
                    assert len(plan.columns) <= max_pieces, f"layer {layer}: {len(plan.columns)} pieces"
                sender.wait(sender.write(link.peer_id, plan), timeout)
                receiver.wait_recv(tid, timeout)
            finally:
                if p_st is not None:
                    p_st.release(off)
            if c_st is not None:
                c_st.land(slot, dst_ids, layer)
    finally:
        if c_st is not None:
            c_st.release(slot)


def _stage(stager: Stager, ids: list[int], layer: int, on_thread: bool, timeout: float) -> tuple[int, KVLayout]:
    if not on_thread:
        return stager.stage(ids, layer)
    out: list[tuple[int, KVLayout]] = []
    th = threading.Thread(target=lambda: out.append(stager.stage(ids, layer)), name="pdfabric-test-stage")
    th.start()
    th.join(timeout)
    if not out:
        raise TimeoutError(f"staging layer {layer} on another thread did not finish within {timeout}s")
    return out[0]
