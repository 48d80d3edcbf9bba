"""cuda_ipc, and nixl on VRAM, with GPU memory: the conformance suite, cross-process copies,
refusals and the release order of CUDA IPC mappings.

Skipped with the reason where cupy or a CUDA device is missing (nixl's cases also without
nixl). Buffers are cupy arrays on the current device: ``DeviceBuffer`` stands in for the
suite's numpy ``Buffer`` (reads copy to the host, writes go to the device), and the suite's
child processes run this module (``python -m test_cuda_ipc``), whose ``GpuChild`` allocates
GPU memory.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pdfabric.errors import GrantRefused, RegistrationError
from pdfabric.memory import Region, region_of
from pdfabric.testing import CHECKS, PeerProcess, conformance, decode_descriptor, encode_descriptor
from pdfabric.testing.peer import Child, main
from pdfabric.transports import PeerId, TransferId, TransferPlan, Transport, create

pytestmark = pytest.mark.gpu

HERE = Path(__file__).resolve().parent
MODULE = Path(__file__).stem
NIXL_MISSING = "nixl is not installed (pip install --no-deps nixl nixl-cu12 nixl-cu13, or the 'nixl' extra)"
KiB, MiB = 1024, 1024 * 1024


def _reason() -> str:
    from pdfabric.transports.cuda_ipc import unavailable_reason

    return unavailable_reason()


@pytest.fixture(autouse=True)
def _needs_cuda() -> None:
    reason = _reason()
    if reason:
        pytest.skip(reason)


def _cp() -> Any:
    import cupy

    return cupy


def _sync() -> None:
    _cp().cuda.runtime.deviceSynchronize()  # the transports copy on streams of their own


class DeviceBytes:
    """What the conformance checks do with ``Buffer.array``, on GPU memory."""

    def __init__(self, dev: Any) -> None:
        self.dev = dev

    def host(self) -> np.ndarray:
        out: np.ndarray = _cp().asnumpy(self.dev)
        return out

    def reshape(self, *shape: int) -> np.ndarray:
        return self.host().reshape(*shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        out: np.ndarray = self.host()[key]
        return out

    def __setitem__(self, key: Any, value: Any) -> None:
        self.dev[key] = value
        _sync()

    def __eq__(self, other: object) -> Any:  # type: ignore[override]
        return self.host() == other

    __hash__ = None  # type: ignore[assignment]

    def __len__(self) -> int:
        return len(self.dev)


class DeviceBuffer:
    """``conformance.Buffer`` with its bytes in GPU memory."""

    def __init__(self, dev: Any) -> None:
        self.dev = dev
        self.array = DeviceBytes(dev)

    @classmethod
    def random(cls, size: int, seed: int) -> DeviceBuffer:
        buf = cls(_cp().asarray(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)))
        _sync()
        return buf

    @classmethod
    def filled(cls, size: int, value: int = conformance.SENTINEL) -> DeviceBuffer:
        buf = cls(_cp().full(size, value, dtype=_cp().uint8))
        _sync()
        return buf

    @property
    def region(self) -> Region:
        return Region(int(self.dev.data.ptr), int(self.dev.nbytes))

    def block(self, i: int, size: int) -> Region:
        return Region(self.region.addr + i * size, size)


class GpuChild(Child):
    """A conformance child whose buffers are GPU memory."""

    def alloc(self, size: int, fill: str = "zero", seed: int = 0, gpu: int = 0) -> dict[str, Any]:
        cp = _cp()
        with cp.cuda.Device(gpu):
            if fill == "random":
                buf = cp.asarray(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8))
            else:
                buf = cp.zeros(size, dtype=cp.uint8)
            cp.cuda.runtime.deviceSynchronize()
        self.buffers.append(buf)
        r = Region(int(buf.data.ptr), size)
        self.t.register([r])
        return {"addr": r.addr, "size": r.length}

    def digest(self, addr: int, size: int) -> dict[str, Any]:
        for buf in self.buffers:
            base = int(buf.data.ptr)
            if base <= addr and addr + size <= base + buf.nbytes:
                host = _cp().asnumpy(buf[addr - base : addr - base + size])
                return {"sha256": hashlib.sha256(host.tobytes()).hexdigest()}
        raise ValueError(f"{size} bytes at {addr:#x} are not in a buffer of this child")

    def imports(self) -> dict[str, Any]:
        from pdfabric.transports._cuda_ipc_device import imports_open

        return {"open": imports_open()}


@functools.cache
def _warm(name: str) -> None:
    """CUDA contexts, cupy's pool, NVRTC and UCX keep process-wide state (fds, threads)
    from their first use on: make it before any check counts what a transport leaks."""
    snd, rcv = create(name), create(name)
    try:
        src, dst = DeviceBuffer.random(1 * MiB, 0), DeviceBuffer.filled(1 * MiB)
        snd.register([src.region])
        rcv.register([dst.region])
        peer = snd.connect(rcv.descriptor())
        rcv.grant("warm", [dst.region])
        snd.wait(snd.write(peer, TransferPlan(TransferId("warm"), (src.region,), (dst.region,))), 60)
        rcv.wait_recv("warm", 60)
    finally:
        snd.close()
        rcv.close()


@pytest.fixture
def on_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conformance, "Buffer", DeviceBuffer)
    monkeypatch.setattr(conformance, "PeerProcess", functools.partial(PeerProcess, module=MODULE))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))


@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("name", ["cuda_ipc", "nixl"])
def test_conformance_on_gpu_memory(name: str, check: str, on_gpu: None) -> None:
    if name == "nixl" and importlib.util.find_spec("nixl") is None:
        pytest.skip(NIXL_MISSING)
    _warm(name)

    def make_pair() -> tuple[Transport, Transport]:
        return create(name), create(name)

    if check == "peer_death":
        CHECKS[check](make_pair, name, {})
    else:
        CHECKS[check](make_pair)


# ------------------------------------------------------------------ cuda_ipc across processes


@pytest.fixture
def child(on_gpu: None) -> Iterator[PeerProcess]:
    with PeerProcess("cuda_ipc", {}, module=MODULE, timeout=120) as c:
        yield c


def _blocks(base: int, ids: list[int], size: int) -> tuple[Region, ...]:
    return tuple(Region(base + i * size, size) for i in ids)


def _digest(buf: DeviceBuffer, r: Region) -> str:
    off = r.addr - buf.region.addr
    return hashlib.sha256(_cp().asnumpy(buf.dev[off : off + r.length]).tobytes()).hexdigest()


@pytest.mark.parametrize("block", [64 * KiB, 2 * MiB])
def test_blocks_land_in_another_process_and_its_mappings_go_with_our_close(child: PeerProcess, block: int) -> None:
    snd = create("cuda_ipc")
    try:
        n = (64 * MiB) // block
        src = DeviceBuffer.random(n * block, 5)
        snd.register([src.region])
        dst = child.request("alloc", size=2 * n * block)["addr"]
        peer = snd.connect(decode_descriptor(child.request("descriptor")["descriptor"]))
        slots = np.random.default_rng(6).permutation(2 * n)[:n].tolist()
        d = _blocks(dst, slots, block)
        child.request("grant", tid="x", regions=[[r.addr, r.length] for r in d])
        snd.wait(snd.write(peer, TransferPlan(TransferId("x"), _blocks(src.region.addr, list(range(n)), block), d), b"hi"), 60)
        got = child.request("wait_recv", tid="x")
        assert got == {"nbytes": n * block, "notify": "hi"}
        for i in (0, n // 2, n - 1):
            assert child.request("digest", addr=d[i].addr, size=block)["sha256"] == _digest(src, src.block(i, block)), i
        assert child.request("imports")["open"] == 1  # one allocation of ours, mapped once
        snd.close()
        assert child.request("imports")["open"] == 0, "the receiver still maps our memory after close() returned"
    finally:
        snd.close()


def test_child_sender_writes_into_our_memory(child: PeerProcess) -> None:
    rcv = create("cuda_ipc")
    try:
        block, n = 256 * KiB, 64
        dst = DeviceBuffer.filled(2 * n * block)
        rcv.register([dst.region])
        src = child.request("alloc", size=n * block, fill="random", seed=9)["addr"]
        peer = child.request("connect", descriptor=encode_descriptor(rcv.descriptor()))["peer"]
        slots = np.random.default_rng(7).permutation(2 * n)[:n].tolist()
        d = _blocks(dst.region.addr, slots, block)
        rcv.grant("y", d)
        child.request("write", peer=peer, tid="y", src=[[src + i * block, block] for i in range(n)],
                      dst=[[r.addr, r.length] for r in d])  # fmt: skip
        assert rcv.wait_recv("y", 30).nbytes == n * block
        want = np.random.default_rng(9).integers(0, 256, n * block, dtype=np.uint8).reshape(n, block)
        host = dst.array.host().reshape(2 * n, block)
        for i, j in enumerate(slots):
            assert np.array_equal(host[j], want[i]), f"block {i} -> slot {j}"
        untouched = np.ones(2 * n, dtype=bool)
        untouched[slots] = False
        assert (host[untouched] == conformance.SENTINEL).all()
    finally:
        rcv.close()


def test_write_past_the_grant_is_refused_before_a_byte_moves(child: PeerProcess) -> None:
    snd = create("cuda_ipc")
    try:
        block = 1 * MiB
        src = DeviceBuffer.random(8 * block, 1)
        snd.register([src.region])
        dst = child.request("alloc", size=8 * block)["addr"]
        zero = child.request("digest", addr=dst, size=8 * block)["sha256"]
        peer = snd.connect(decode_descriptor(child.request("descriptor")["descriptor"]))
        child.request("grant", tid="z", regions=[[dst, 4 * block]])
        plan = TransferPlan(TransferId("z"), (src.region,), (Region(dst, 8 * block),))
        with pytest.raises(GrantRefused, match="outside the grant"):
            snd.wait(snd.write(peer, plan), 30)
        assert child.request("digest", addr=dst, size=8 * block)["sha256"] == zero
    finally:
        snd.close()


def test_host_memory_is_refused_at_registration() -> None:
    t = create("cuda_ipc")
    try:
        with pytest.raises(RegistrationError, match="host memory; cuda_ipc moves device memory"):
            t.register([region_of(np.zeros(4096, dtype=np.uint8))])
    finally:
        t.close()


def test_across_two_gpus(on_gpu: None) -> None:
    """Sender on GPU 0, receiver on GPU 1: mapped with peer access (NVLink when present)."""
    if _cp().cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two GPUs")
    snd = create("cuda_ipc")
    with PeerProcess("cuda_ipc", {}, module=MODULE, timeout=120) as c:
        try:
            size = 64 * MiB
            src = DeviceBuffer.random(size, 3)
            snd.register([src.region])
            dst = c.request("alloc", size=size, gpu=1)["addr"]
            peer: PeerId = snd.connect(decode_descriptor(c.request("descriptor")["descriptor"]))
            c.request("grant", tid="p2p", regions=[[dst, size]])
            snd.wait(snd.write(peer, TransferPlan(TransferId("p2p"), (src.region,), (Region(dst, size),))), 60)
            assert c.request("wait_recv", tid="p2p")["nbytes"] == size
            assert c.request("digest", addr=dst, size=size)["sha256"] == _digest(src, src.region)
        finally:
            snd.close()


if __name__ == "__main__":  # a conformance child: python -m test_cuda_ipc --transport cuda_ipc
    sys.exit(main(GpuChild))
