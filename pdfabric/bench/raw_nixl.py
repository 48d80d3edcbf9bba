"""The raw NIXL baseline of the transfer benchmark: the same block transfers made straight
through ``nixl_agent``, without pdfabric.

Two agents (this process and a child), each registers one pool of twice the transfer size
(host memory, or GPU memory with ``--device cuda``);
descriptor lists of every block of both pools are prepared once; a round is
``make_prepped_xfer("WRITE", ...)`` of the benchmark's scattered block indices, ``transfer``,
then ``check_xfer_state`` polled until DONE (no notification, no receiver involvement) -
what a hand-written NIXL user gets at best. pdfabric's ``nixl`` rows divide by it.
"""

from __future__ import annotations

import base64
import logging
import os
import time
from typing import Any

import numpy as np

__all__ = ["RawNixlSender", "RawNixlReceiver"]


def _agent(name: str) -> Any:
    from nixl._api import nixl_agent, nixl_agent_config

    logging.getLogger("nixl").handlers.clear()  # its INFO lines go to stdout otherwise
    agent = nixl_agent(name, nixl_agent_config(enable_prog_thread=False, backends=[]))
    agent.create_backend("UCX", {"ucx_error_handling_mode": "none"})  # same as pdfabric's default
    return agent


def _block_rows(base: int, nblocks: int, block: int, dev: int) -> np.ndarray:
    addrs = np.uint64(base) + np.arange(nblocks, dtype=np.uint64) * np.uint64(block)
    return np.stack([addrs, np.full(nblocks, block, np.uint64), np.full(nblocks, dev, np.uint64)], axis=1)


def _pool(size: int, device: str, fill: str, seed: int) -> tuple[Any, int, str, int]:
    """(buffer, address, NIXL memory type, device id) of a pool in host or GPU memory."""
    if device == "cpu":
        buf = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8) if fill == "random" else np.zeros(size, np.uint8)
        return buf, int(buf.ctypes.data), "DRAM", 0
    import cupy

    from pdfabric.bench.child import device_buffer

    buf, region = device_buffer(size, fill, seed)
    return buf, region.addr, "VRAM", int(cupy.cuda.runtime.getDevice())


class RawNixlReceiver:
    """Child side: an agent with one registered destination pool."""

    def __init__(self, size: int, device: str = "cpu") -> None:
        self.agent = _agent(f"raw-rcv-{os.getpid()}")
        self.pool, self.addr, mem, dev = _pool(size, device, "zero", 0)
        self.reg = self.agent.register_memory([(self.addr, size, dev, "")], mem)

    def describe(self) -> dict[str, Any]:
        md = base64.b64encode(self.agent.get_agent_metadata()).decode()
        return {"metadata": md, "addr": self.addr}

    def close(self) -> None:
        self.agent.deregister_memory(self.reg)
        self.agent = None


class RawNixlSender:
    """Parent side: ``round()`` moves ``len(src_blocks)`` blocks, returns seconds."""

    def __init__(self, remote: dict[str, Any], pool_bytes: int, block: int, src_blocks: np.ndarray, dst_blocks: np.ndarray,
                 seed: int = 0, device: str = "cpu") -> None:  # fmt: skip
        self.agent = _agent(f"raw-snd-{os.getpid()}")
        self.pool, addr, mem, dev = _pool(pool_bytes, device, "random", seed)
        self.reg = self.agent.register_memory([(addr, pool_bytes, dev, "")], mem)
        self.remote = self.agent.add_remote_agent(base64.b64decode(remote["metadata"]))
        n = pool_bytes // block
        self.local_list = self.agent.prep_xfer_dlist("NIXL_INIT_AGENT", _block_rows(addr, n, block, dev), mem)
        self.remote_list = self.agent.prep_xfer_dlist(self.remote, _block_rows(remote["addr"], n, block, dev), mem)
        self.src = np.asarray(src_blocks, dtype=np.int32)
        self.dst = np.asarray(dst_blocks, dtype=np.int32)

    def round(self) -> float:
        t0 = time.perf_counter()
        x = self.agent.make_prepped_xfer("WRITE", self.local_list, self.src, self.remote_list, self.dst)
        state = self.agent.transfer(x)
        while state == "PROC":
            state = self.agent.check_xfer_state(x)
        dt = time.perf_counter() - t0
        x.release()
        if state != "DONE":
            raise RuntimeError(f"raw NIXL transfer ended in {state}")
        return dt

    def close(self) -> None:
        self.local_list.release()
        self.remote_list.release()
        self.agent.remove_remote_agent(self.remote)
        self.agent.deregister_memory(self.reg)
        self.agent = None
