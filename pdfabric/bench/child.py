"""The receiving process of the transfer benchmark: a conformance peer plus baselines.

Extra requests beyond ``pdfabric.testing.peer``: timed receive loops, a raw TCP socket
receiver, a shared-memory segment for the single-copy baseline, and a raw NIXL agent.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from multiprocessing import shared_memory
from typing import Any

import numpy as np

from pdfabric.memory import Region
from pdfabric.testing.peer import Child, main

__all__ = ["BenchChild", "device_buffer"]

RAW_HDR = struct.Struct("!QB")  # payload length, echo flag


def device_buffer(size: int, fill: str = "zero", seed: int = 0) -> tuple[Any, Region]:
    """``size`` bytes of GPU memory (a cupy array on the current device) and its region.

    ``fill``: "zero", "ones", or "random" - a hash of the word index made on the GPU
    (bandwidth runs need bytes that are not all equal, not a host RNG's GiBs to upload)."""
    import cupy as cp

    words = -(-size // 8)
    if fill == "random":
        a = cp.arange(seed * words, (seed + 1) * words, dtype=cp.uint64)
        a *= cp.uint64(0x9E3779B97F4A7C15)
        a ^= a >> cp.uint64(29)
    elif fill == "ones":
        a = cp.full(words, 0x0101010101010101, dtype=cp.uint64)
    else:
        a = cp.zeros(words, dtype=cp.uint64)
    buf = a.view(cp.uint8)[:size]
    cp.cuda.get_current_stream().synchronize()  # filled before any other stream or process reads it
    return buf, Region(int(buf.data.ptr), size)


class BenchChild(Child):
    def __init__(self, transport: str, options: dict[str, Any]) -> None:
        super().__init__(transport, options)
        self._raw: socket.socket | None = None
        self._raw_thread: threading.Thread | None = None
        self._shm: shared_memory.SharedMemory | None = None
        self._raw_nixl: Any = None

    def alloc(self, size: int, fill: str = "zero", seed: int = 0, device: str = "cpu") -> dict[str, Any]:
        """``device="cuda"``: the buffer is GPU memory (``--device cuda`` runs)."""
        if device == "cpu":
            return super().alloc(size, fill, seed)
        buf, r = device_buffer(size, fill, seed)
        self.buffers.append(buf)
        self.t.register([r])
        return {"addr": r.addr, "size": r.length}

    def grant_many(self, tids: list[str], regions: list[list[int]]) -> dict[str, Any]:
        rs = [Region(a, n) for a, n in regions]
        for tid in tids:
            self.t.grant(tid, rs)
        return {}

    def recv_times(self, tids: list[str], timeout: float = 30.0) -> dict[str, Any]:
        """Wait for each transfer in order; the perf_counter_ns at which each completed."""
        out = []
        for tid in tids:
            self.t.wait_recv(tid, timeout)
            out.append(time.perf_counter_ns())
        return {"times": out}

    def raw_listen(self, size: int) -> dict[str, Any]:
        """A plain-socket receiver: recv_into one contiguous buffer, ack or echo."""
        lst = socket.socket()
        lst.bind(("127.0.0.1", 0))
        lst.listen(1)
        buf = bytearray(size)
        self._raw = lst

        def serve() -> None:
            try:
                conn, _ = lst.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            mv = memoryview(buf)
            hdr = bytearray(RAW_HDR.size)
            with conn:
                while conn.recv_into(hdr, RAW_HDR.size, socket.MSG_WAITALL) == RAW_HDR.size:
                    n, echo = RAW_HDR.unpack(hdr)
                    got = 0
                    while got < n:
                        k = conn.recv_into(mv[got:n], n - got, socket.MSG_WAITALL)
                        if not k:
                            return
                        got += k
                    conn.sendall(mv[:n] if echo else b"\x01")

        self._raw_thread = threading.Thread(target=serve, daemon=True)
        self._raw_thread.start()
        return {"port": lst.getsockname()[1]}

    def shm_create(self, size: int) -> dict[str, Any]:
        self._shm = shared_memory.SharedMemory(create=True, size=size)
        np.ndarray(size, dtype=np.uint8, buffer=self._shm.buf)[:] = 0  # fault the pages in
        return {"name": self._shm.name}

    def shm_sum(self, size: int) -> dict[str, Any]:
        assert self._shm is not None
        return {"first": int(self._shm.buf[0]), "last": int(self._shm.buf[size - 1])}

    def raw_nixl_listen(self, size: int, device: str = "cpu") -> dict[str, Any]:
        """A plain NIXL agent with one registered destination pool of ``size`` bytes."""
        from pdfabric.bench.raw_nixl import RawNixlReceiver

        self._raw_nixl = RawNixlReceiver(size, device)
        return self._raw_nixl.describe()

    def close_extras(self) -> dict[str, Any]:
        if self._raw is not None:
            self._raw.close()
        if self._raw_thread is not None:
            self._raw_thread.join(5)
        if self._shm is not None:
            self._shm.close()
            self._shm.unlink()
            self._shm = None
        if self._raw_nixl is not None:
            self._raw_nixl.close()
            self._raw_nixl = None
        return {}


if __name__ == "__main__":
    main(BenchChild)
