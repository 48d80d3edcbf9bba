"""Shared helpers of the GrantTable unit tests."""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable, Hashable

import numpy as np

from pdfabric.memory import Region, region_of
from pdfabric.transports import base
from pdfabric.transports._state import GrantTable, MemoryTable

NAME = "unit"
CONN_A: Hashable = ("conn", "A")
CONN_B: Hashable = ("conn", "B")
PEER = "peer-1"


# ------------------------------------------------------------------ helpers


class Receiver:
    """A GrantTable over one registered numpy buffer, plus a way to write into it."""

    def __init__(
        self, size: int = 4096, kill_conn: Callable[[Hashable], None] | None = None, drain_s: float = 0.05
    ) -> None:
        self.buf = np.zeros(size, dtype=np.uint8)
        self.base = region_of(self.buf).addr
        self.mem = MemoryTable(NAME)
        self.mem.add([region_of(self.buf)])
        self.table = GrantTable(NAME, self.mem, kill_conn=kill_conn, drain_s=drain_s)

    def region(self, off: int, length: int) -> Region:
        return Region(self.base + off, length)

    def write(self, tid: str, off: int, data: bytes, conn: Hashable = CONN_A) -> None:
        """One frame: Rule 1 check, bytes into the registered view, accounting."""
        addr = self.base + off
        token = self.table.begin_write(tid, segs((addr, len(data))), PEER, conn)
        n = 0
        try:
            self.mem.view(addr, len(data))[:] = data
            n = len(data)
        finally:
            self.table.end_write(token, conn, n)


def segs(*pairs: tuple[int, int]) -> np.ndarray:
    """Frame segments as the wire hands them to ``begin_write``: an (n, 2) uint64 array."""
    return np.array(pairs, dtype=np.uint64).reshape(-1, 2)


def wait_in_thread(table: GrantTable, tid: str, timeout: float = 5.0) -> tuple[threading.Thread, dict]:
    """Start ``table.wait(tid)`` on a thread; return it once it is blocked in the wait."""
    out: dict = {}

    def run() -> None:
        try:
            out["result"] = table.wait(tid, timeout)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    block_until_waiting(t)
    return t, out


def block_until_waiting(t: threading.Thread, limit_s: float = 2.0) -> None:
    """Return once ``t`` is inside threading's Event/Condition ``wait`` or a ``Latch.wait``
    (or has ended)."""
    deadline = time.monotonic() + limit_s
    waits = {threading.__file__, base.__file__}
    while time.monotonic() < deadline and t.is_alive():
        frame = sys._current_frames().get(t.ident or -1)
        while frame is not None:
            if frame.f_code.co_name == "wait" and frame.f_code.co_filename in waits:
                return
            frame = frame.f_back
        time.sleep(0.001)
    assert not t.is_alive() or time.monotonic() < deadline, "thread never blocked in wait()"


