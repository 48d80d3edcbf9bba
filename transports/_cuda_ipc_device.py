"""CUDA plumbing of the ``cuda_ipc`` transport, through cupy (imported only when used).

- ``unavailable_reason()``: why ``cuda_ipc`` cannot run in this process ("" when it can).
- ``CudaDevice``: finds the allocation (base, size, device) and CUDA IPC handle of
  registered memory; maps a peer's allocations (``open``/``close``); copies rows of
  [src, dst, len] on the transport's own stream, complete when a CUDA event is.
- ``DeviceOps``: what the transport needs from a device, so its protocol can be tested
  with host memory (``tests/integration/test_cuda_ipc_host.py``).

Theory of operation
-------------------
*Mapping.* CUDA maps an IPC handle at most once per process (opening it again fails), so
mapped handles live in one process-wide table with a reference per user (``_Imports``);
the last ``close`` calls ``cudaIpcCloseMemHandle``. Handles are opened with
``cudaIpcMemLazyEnablePeerAccess``: the mapping is usable from this process's device, over
NVLink (or PCIe peer access) when the peer's GPU is another one; GPUs that cannot reach
each other fail at ``open``. What a peer announces is checked against what the handle
really maps (``cuMemGetAddressRange``), so a wrong size cannot make us read past a mapping
(on a driver that cannot size an imported mapping, the announced size is used, with a
warning).

*Copy.* One kernel launch moves every row of a frame: a 2-D grid, ``blockIdx.y`` picks the
row, ``blockIdx.x`` strides over it in 64 KiB chunks of 16-byte vectors (bytes at a time
when a row is not 16-byte aligned). The row table goes to the device with the launch, on
the same stream, from page-locked memory (an asynchronous copy: ~10 us where ``cp.asarray``
from pageable memory took ~22 us on an H200 host). 512-thread CTAs, four an SM, 8 vectors
in flight a thread: 0.91-0.92x of a contiguous device copy on an H200 where 256 threads
and 4 vectors reached 0.89. A launch is one Python call instead of one ``cudaMemcpyAsync`` per block
(~3 us each, more than a 2 MiB block takes to copy). When the kernel cannot be built
(no NVRTC) or the source is not reachable from our device (same process, another GPU),
rows go one ``cudaMemcpyAsync`` each (``cudaMemcpyDefault``). ``wait`` synchronizes the
launch's event with the GIL released.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import threading
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np

from pdfabric.errors import (
    FrameError,
    RegistrationError,
    TransportError,
    TransportUnavailable,
)

from ._cuda_ipc_wire import Allocation

__all__ = ["CudaDevice", "DeviceOps", "Launched", "imports_open", "launch_shape", "unavailable_reason"]

log = logging.getLogger("pdfabric.transports")

_THREADS = 512
_UNROLL = 8
_CHUNK = _THREADS * _UNROLL * 16  # bytes per CTA per step
_MAX_GRID_Y = 65535
_CTAS_PER_SM = 4  # 512-thread CTAs: one full wave (2048 threads an SM)
_DEVICE_MEMORY = 2  # cudaMemoryTypeDevice
_KIND = {0: "host", 1: "pinned host", 2: "device", 3: "managed"}

def _kernel_source() -> str:
    from pdfabric.kernels.cuda import source_text

    return source_text("ipc_copy.cu")



def launch_shape(lengths: list[int], ctas: int, max_rows: int = _MAX_GRID_Y) -> list[tuple[int, int, int]]:
    """(first row, grid x, rows) of each launch of the copy kernel over rows of ``lengths``:
    up to ``max_rows`` rows (grid y) a launch, and about ``ctas`` CTAs (one wave) in all,
    each striding over its row in ``_CHUNK`` steps."""
    longest = max(lengths, default=0)
    out = []
    for first in range(0, len(lengths), max_rows):
        count = min(max_rows, len(lengths) - first)
        out.append((first, max(1, min(-(-longest // _CHUNK), ctas // count)), count))
    return out


@functools.cache
def unavailable_reason() -> str:
    """Why cuda_ipc cannot run in this process, with the fix; "" when it can."""
    try:
        import cupy
    except ImportError as e:
        if e.name == "cupy":
            return "cupy is not installed - pip install 'pdfabric[cuda]'"
        return f"cupy cannot be imported ({e}) - reinstall it: pip install 'pdfabric[cuda]'"
    except Exception as e:  # noqa: BLE001 - cupy raises what its CUDA libraries raise
        return f"cupy cannot be imported ({type(e).__name__}: {e}) - reinstall it: pip install 'pdfabric[cuda]'"
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as e:  # noqa: BLE001 - CUDARuntimeError: no driver, no device
        return f"no CUDA device ({e}) - this needs an NVIDIA GPU and its driver"
    if count < 1:
        return "no CUDA device (CUDA sees 0 GPUs) - this needs an NVIDIA GPU and its driver"
    return ""


class Launched(Protocol):
    def wait(self) -> None:
        """Block until the copy's bytes are in place; TransportError if it failed."""


class DeviceOps(Protocol):
    """What ``CudaIpcTransport`` needs from the memory it moves."""

    index: int | None  # the device this transport's registered memory is on

    def locate(self, addr: int, end: int) -> Allocation:
        """The allocation holding ``addr`` (it may end before ``end``, the end of the region
        being registered), with its IPC handle; RegistrationError for memory that is not
        shareable device memory."""

    def bind(self, device: int) -> None:
        """Pin the transport to ``device``; RegistrationError for a second device."""

    def open(self, alloc: Allocation, same_process: bool) -> int:
        """Map a peer's allocation here; its base address in this process. FrameError when
        it cannot be mapped or is smaller than announced."""

    def close(self, alloc: Allocation, same_process: bool) -> None:
        """Undo one ``open`` (after every copy from it finished)."""

    def launch(self, rows: np.ndarray, src_pid: int, direct: bool) -> Launched:
        """Start copying (n, 3) [src here, dst, len] rows; ``direct``: the sources can be
        read from our device (else copies go through the driver)."""

    def shutdown(self) -> None:
        """Wait for queued copies and release the stream."""


class _Imports:
    """Process-wide table of mapped peer handles: handle -> [base here, size, references]."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entries: dict[bytes, list[int]] = {}
        self.warned = False

    def acquire(self, cupy: Any, handle: bytes, device: int, announced: int) -> tuple[int, int]:
        with self.lock:
            e = self.entries.get(handle)
            if e is None:
                rt = cupy.cuda.runtime
                with _on(cupy, device):
                    try:
                        ptr = int(rt.ipcOpenMemHandle(handle, rt.cudaIpcMemLazyEnablePeerAccess))
                    except Exception as err:  # noqa: BLE001 - CUDARuntimeError
                        raise FrameError(
                            f"cannot map the peer's device memory on GPU {device} ({err}): the handle is not a live "
                            "CUDA IPC handle, or the two GPUs cannot reach each other (no NVLink or PCIe peer access)"
                        ) from None
                    try:
                        base, size = _address_range(ptr)
                    except RegistrationError as err:
                        # a driver that cannot size an imported mapping: the announced size is
                        # all there is (the peer measured its own allocation the same way)
                        if not self.warned:
                            log.warning("cuda_ipc: cannot size a mapped peer allocation (%s); trusting the "
                                        "sizes peers announce", err.message)  # fmt: skip
                            self.warned = True
                        base, size = ptr, announced
                e = self.entries[handle] = [base, size, 0]
            e[2] += 1
            return e[0], e[1]

    def release(self, cupy: Any, handle: bytes) -> None:
        with self.lock:
            e = self.entries.get(handle)
            if e is None:
                return
            e[2] -= 1
            if e[2] > 0:
                return
            del self.entries[handle]
            try:
                cupy.cuda.runtime.ipcCloseMemHandle(e[0])
            except Exception as err:  # noqa: BLE001 - CUDARuntimeError
                log.warning("cuda_ipc: closing a peer's IPC mapping at %#x failed: %s", e[0], err)


_IMPORTS = _Imports()


def imports_open() -> int:
    """Peer allocations this process has mapped right now (tests check release order)."""
    with _IMPORTS.lock:
        return len(_IMPORTS.entries)


@functools.cache
def _libcuda() -> Any:
    lib = ctypes.CDLL("libcuda.so.1")
    fn = lib.cuMemGetAddressRange_v2
    fn.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t), ctypes.c_uint64]
    fn.restype = ctypes.c_int
    return lib


def _address_range(addr: int) -> tuple[int, int]:
    """(base, size) of the allocation holding ``addr``; needs a current context."""
    base, size = ctypes.c_uint64(0), ctypes.c_size_t(0)
    rc = _libcuda().cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), addr)
    if rc != 0:
        raise RegistrationError(f"cuMemGetAddressRange({addr:#x}) failed with CUresult {rc}", transport="cuda_ipc")
    return int(base.value), int(size.value)


@contextlib.contextmanager
def _on(cupy: Any, device: int) -> Iterator[None]:
    """``device`` current on this thread, its primary context initialised (driver calls)."""
    with cupy.cuda.Device(device):
        cupy.cuda.runtime.setDevice(device)
        yield


class _Event:
    __slots__ = ("event", "keep", "label")

    def __init__(self, event: Any, keep: Any, label: str) -> None:
        self.event, self.keep, self.label = event, keep, label

    def wait(self) -> None:
        try:
            self.event.synchronize()  # cudaEventSynchronize, GIL released
        except Exception as e:  # noqa: BLE001 - CUDARuntimeError
            raise TransportError(f"copy on {self.label} failed: {e}", transport="cuda_ipc") from None
        finally:
            self.keep = None


class CudaDevice:
    """``DeviceOps`` on CUDA through cupy."""

    def __init__(self, device: int | None = None, kernel: bool = True) -> None:
        reason = unavailable_reason()
        if reason:
            raise TransportUnavailable(f"transport 'cuda_ipc' is not available: {reason}", transport="cuda_ipc")
        import cupy

        self._cp: Any = cupy
        self.index = device
        self._use_kernel = kernel
        self._kernel: Any = None
        self._stream: Any = None
        self._ctas = 0
        self._lock = threading.Lock()

    def locate(self, addr: int, end: int) -> Allocation:
        rt = self._cp.cuda.runtime
        try:
            attrs = rt.pointerGetAttributes(addr)
            kind, dev = int(attrs.type), int(attrs.device)
        except Exception:  # noqa: BLE001 - older drivers: memory CUDA has never seen
            kind, dev = 0, -1
        if kind != _DEVICE_MEMORY:
            raise RegistrationError(
                f"memory at {addr:#x} is {_KIND.get(kind, 'unknown')} memory; cuda_ipc moves device memory "
                "(CUDA tensors, cupy arrays) - use tcp or shm for host memory", transport="cuda_ipc",
            )  # fmt: skip
        with _on(self._cp, dev):
            base, size = _address_range(addr)
            try:
                handle = bytes(rt.ipcGetMemHandle(base))
            except Exception as e:  # noqa: BLE001 - CUDARuntimeError
                raise RegistrationError(
                    f"device memory at {addr:#x} cannot be exported with cudaIpcGetMemHandle ({e}); memory from "
                    "cudaMallocAsync pools or the virtual memory API (torch's expandable_segments) cannot be "
                    "shared this way - allocate it with cudaMalloc (torch's and cupy's default allocators)",
                    transport="cuda_ipc",
                ) from None
        return Allocation(base, size, dev, handle)

    def bind(self, device: int) -> None:
        if self.index is None:
            self.index = device
        elif device != self.index:
            raise RegistrationError(
                f"memory on GPU {device}, but this transport's memory is on GPU {self.index}; "
                "use one cuda_ipc transport per GPU", transport="cuda_ipc",
            )  # fmt: skip

    def open(self, alloc: Allocation, same_process: bool) -> int:
        if not same_process:
            assert self.index is not None, "open before any registration"
            base, size = _IMPORTS.acquire(self._cp, alloc.handle, self.index, alloc.size)
            if alloc.size > size:
                _IMPORTS.release(self._cp, alloc.handle)
                raise FrameError(f"peer announces an allocation of {alloc.size} bytes; its handle maps {size}")
            return base
        with _on(self._cp, alloc.device):
            base, size = _address_range(alloc.base)
        if alloc.base != base or alloc.size > size:
            raise FrameError(f"announced allocation {alloc.base:#x}+{alloc.size} is not one of this process's")
        return alloc.base

    def close(self, alloc: Allocation, same_process: bool) -> None:
        if not same_process:
            _IMPORTS.release(self._cp, alloc.handle)

    def launch(self, rows: np.ndarray, src_pid: int, direct: bool) -> Launched:
        cp = self._cp
        assert self.index is not None, "launch before any registration"
        label = f"GPU {self.index}"
        with self._lock, _on(cp, self.index):
            try:
                if self._stream is None:
                    self._stream = cp.cuda.Stream(non_blocking=True)
            except Exception as e:  # noqa: BLE001 - CUDARuntimeError
                raise TransportError(f"cannot create a stream on {label}: {e}", transport="cuda_ipc") from None
            stream = self._stream
            try:
                keep = None
                with stream:
                    if direct and self._kernel_ready():
                        keep = self._launch_kernel(rows)
                    else:
                        memcpy, kind, ptr = cp.cuda.runtime.memcpyAsync, cp.cuda.runtime.memcpyDefault, stream.ptr
                        for src, dst, n in rows.tolist():
                            memcpy(dst, src, n, kind, ptr)
                    event = cp.cuda.Event(block=False, disable_timing=True)
                    event.record(stream)
            except Exception as e:  # noqa: BLE001 - CUDARuntimeError, CUDADriverError
                # part of the copy may be queued: let it finish before the grant is failed
                # and its memory handed back
                with contextlib.suppress(Exception):
                    stream.synchronize()
                raise TransportError(f"cannot start the copy on {label}: {e}", transport="cuda_ipc") from None
        return _Event(event, keep, label)

    def _kernel_ready(self) -> bool:
        """Build the copy kernel once (NVRTC); False (and a warning) when it cannot be."""
        if self._kernel is None and self._use_kernel:
            cp = self._cp
            try:
                kernel = cp.RawKernel(_kernel_source(), "pdfabric_ipc_copy")
                kernel.compile()
                sms = int(cp.cuda.runtime.deviceGetAttribute(cp.cuda.runtime.cudaDevAttrMultiProcessorCount, self.index))
            except Exception as e:  # noqa: BLE001 - CompileException, missing NVRTC
                log.warning("cuda_ipc: the copy kernel could not be built (%s); copying one cudaMemcpyAsync per block", e)
                self._use_kernel = False
                return False
            self._kernel, self._ctas = kernel, sms * _CTAS_PER_SM
        return self._use_kernel

    def _launch_kernel(self, rows: np.ndarray) -> Any:
        """Queue the row table's upload and the kernel on the current (our) stream; returns
        what must live until the copy's event completes: the page-locked table and its
        device copy. The upload from page-locked memory is asynchronous (``cp.asarray``
        from pageable memory blocks this thread for the copy)."""
        cp = self._cp
        pinned = cp.cuda.alloc_pinned_memory(rows.size * 8)  # from cupy's page-locked pool
        host = np.frombuffer(pinned, dtype=np.uint64, count=rows.size).reshape(rows.shape)
        host[...] = rows
        table = cp.empty(rows.shape, dtype=cp.uint64)
        table.set(host, stream=cp.cuda.get_current_stream())
        for first, gx, count in launch_shape(rows[:, 2].tolist(), self._ctas):
            self._kernel((gx, count), (_THREADS,), (table, np.uint32(first)))
        return (table, pinned)

    def shutdown(self) -> None:
        with self._lock:
            stream, self._stream = self._stream, None
            if stream is None or self.index is None:
                return
            try:
                with _on(self._cp, self.index):
                    stream.synchronize()
            except Exception as e:  # noqa: BLE001
                log.warning("cuda_ipc: synchronizing the copy stream at close failed: %s", e)
