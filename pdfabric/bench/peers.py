"""Peer rows of the transfer benchmark: other projects' transfer engines, driven on the same
block plans as pdfabric's transports, each round interleaved with the raw-socket baseline.
A peer that cannot load gets no row; the reason goes to the document's ``skipped_peers``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from pdfabric.bench.transfer import Row, TransferBench, _row

PEERS = {"mooncake": "Mooncake's transfer engine over TCP (pip install mooncake-transfer-engine-non-cuda; "
                     "its engine also loads libibverbs.so.1, Debian package libibverbs1)"}

_MOONCAKE_CHILD = """
import json, sys, numpy as np
from mooncake.engine import TransferEngine
te, keep = TransferEngine(), []
assert te.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0, "mooncake initialize failed"
print(json.dumps({"port": te.get_rpc_port()}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    if req["op"] != "alloc":
        break
    keep.append(np.zeros(req["size"], np.uint8))
    assert te.register_memory(keep[-1].ctypes.data, req["size"]) == 0, "mooncake register_memory failed"
    print(json.dumps({"addr": keep[-1].ctypes.data}), flush=True)
"""


def _mooncake_unavailable() -> str:
    try:
        from mooncake.engine import TransferEngine  # noqa: F401
    except ImportError as e:
        return f"mooncake's transfer engine does not load here: {e} - {PEERS['mooncake']}"
    return ""


class MooncakeTcp:
    """Mooncake's transfer engine over TCP (P2P handshake, no metadata server): this process
    writes a block plan into a child's registered buffer with ``batch_transfer_sync_write``."""

    def __init__(self, pool: np.ndarray) -> None:
        import subprocess
        import sys

        from mooncake.engine import TransferEngine

        self.proc = subprocess.Popen([sys.executable, "-c", _MOONCAKE_CHILD], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
        self.te, self.pool = TransferEngine(), pool
        try:
            self.target = f"127.0.0.1:{self._reply()['port']}"
            if self.te.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") != 0:
                raise RuntimeError("mooncake initialize failed in the benchmark process")
            if self.te.register_memory(pool.ctypes.data, pool.nbytes) != 0:
                raise RuntimeError("mooncake register_memory failed in the benchmark process")
        except BaseException:
            self.close()
            raise

    def _reply(self, timeout: float = 60.0) -> dict[str, Any]:
        import select

        assert self.proc.stdout is not None
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            raise TimeoutError(f"mooncake child pid {self.proc.pid} did not answer within {timeout}s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"mooncake child pid {self.proc.pid} exited (code {self.proc.poll()})")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def alloc(self, size: int) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": "alloc", "size": size}) + "\n")
        self.proc.stdin.flush()
        return int(self._reply()["addr"])

    def round(self, src: list[int], dst: list[int], lengths: list[int]) -> float:
        t0 = time.perf_counter()
        rc = self.te.batch_transfer_sync_write(self.target, src, dst, lengths)
        dt = time.perf_counter() - t0
        if rc != 0:
            raise RuntimeError(f"mooncake batch_transfer_sync_write returned {rc}")
        return dt

    def close(self) -> None:
        import contextlib
        import subprocess

        with contextlib.suppress(Exception):  # best effort; the engine goes with the process
            self.te.unregister_memory(self.pool.ctypes.data)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()  # EOF: the child leaves its loop
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def peer_rows(bench: TransferBench, name: str, sizes: Sequence[int], blocks: Sequence[int], workload: str,
               rows: list[Row]) -> str:  # fmt: skip
    """Rows for peer ``name`` (blocks workload, CPU memory), each round interleaved with the
    raw socket like the network transports; returns why there are none ("" when added)."""
    if name not in PEERS:
        return f"unknown peer {name!r}; expected one of {', '.join(PEERS)}"
    if workload != "blocks" or bench.device != "cpu":
        return "peer rows are measured for --workload blocks on --device cpu only"
    why = _mooncake_unavailable()
    if why:
        return why
    for size in sizes:
        pool = bench.rng.integers(0, 256, 2 * size, dtype=np.uint8)
        peer = MooncakeTcp(pool)
        try:
            dst_base = peer.alloc(2 * size)
            for block in [b for b in blocks if b <= size]:
                src, dst = bench.plan_blocks(size, block, pool.ctypes.data, dst_base)
                s_addrs, d_addrs, lens = [r.addr for r in src], [a for a, _ in dst], [n for _, n in dst]
                nbytes = sum(lens)
                ours, theirs = [], []
                with bench.baseline("raw_socket", nbytes) as base:
                    for i in range(bench.rounds + 1):
                        dt, b = peer.round(s_addrs, d_addrs, lens), base.round()
                        if i:  # round 0 warms both up
                            ours.append(dt)
                            theirs.append(b)
                            bench.progress()
                rows.append(_row(name, block, nbytes, ours, "raw_socket", theirs, "blocks"))
        finally:
            peer.close()
    return ""
