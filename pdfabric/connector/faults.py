"""Fault injection of the connector's worker (``kv_connector_extra_config: faults``), used by
tests that need a transfer to be dropped, late or wrong: a late write and a scrambled
landing. The settings and which transfers they hit live in ``settings.Faults``."""

from __future__ import annotations

import threading

import numpy as np

from pdfabric.errors import TransportError
from pdfabric.layout import KVLayout
from pdfabric.memory import view_of
from pdfabric.transports.base import Status, TransferHandle, TransferPlan, Transport

__all__ = ["late_write", "scramble"]


def late_write(transport: Transport, peer_id: str, plan: TransferPlan, notify: bytes, delay_s: float,
               timers: list[threading.Timer]) -> TransferHandle:
    """The write leaves ``delay_s`` late, from a timer thread (appended to ``timers`` so the
    owner can cancel it at close); the returned handle tracks it."""
    proxy = TransferHandle(plan.transfer_id, peer_id, plan.nbytes, transport.name)

    def later() -> None:
        try:
            h = transport.write(peer_id, plan, notify)
            h.wait(transport.transfer_timeout_s)
            proxy.resolve(Status.DONE)
        except Exception as e:
            proxy.resolve(Status.FAILED, e if isinstance(e, TransportError) else TransportError(str(e)))

    timer = threading.Timer(delay_s, later)
    timer.daemon = True
    timer.start()
    timers.append(timer)
    return proxy


def scramble(layout: KVLayout, blocks: list[int], key: str) -> None:
    """Scramble every KV element of ``blocks`` (canary tests: a wrong landing must show).

    Elements are moved, never invented: random bytes would include NaN patterns that poison
    attention long after these blocks are freed and reused."""
    width = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[layout.geometry.element_size]
    rng = np.random.default_rng(abs(hash(key)) % 2**32)
    for region in layout.regions(blocks):
        elems = np.frombuffer(view_of(region), dtype=width)
        elems[:] = rng.permutation(elems)
