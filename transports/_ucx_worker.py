"""Plumbing of the ``ucx`` transport: loading ucxx, the thread that owns a UCX worker,
process watching, and the boundary where ucxx's exceptions become ours.

*Loading.* Importing ``ucxx`` edits this process's environment (``UCX_MEMTYPE_CACHE``,
``UCX_RNDV_THRESH``, ``UCX_RNDV_FRAG_MEM_TYPE``, ...), and UCX prints its log - warnings
included - on *stdout*, which corrupts stdout protocols (child peers, JSON output). The
import here points UCX's log at stderr for the load (UCX reads that setting once, when
the library loads) and then puts every ``UCX_*`` variable back as it was, so that other
UCX users in the process (NIXL) see the environment they were started with. UCX options
of a transport go to its UCX context directly (``make_worker``), never through the
environment.

*One thread owns the worker* (``WorkerLoop``): the worker is made without ucxx's progress
thread, so every ucxx call of a transport runs on ``pdfabric-ucx``. Other threads
``submit`` work (fire and forget) or ``call`` it (wait for the result). Between commands the
thread runs ``step()``; when that found nothing to do it arms the worker (UCX's wakeup
feature) and sleeps in ``select()`` on the worker's event descriptor and an eventfd (local
commands), at most ``cap()`` seconds. An idle transport therefore costs nothing but the
liveness checks ``cap()`` asks for.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable
from typing import Any

from pdfabric.errors import TransportUnavailable

from ._owner import OwnerThread
from ._procs import PidWatch, namespace, proc_start, why

__all__ = [
    "UCX_ERRORS",
    "Array",
    "PidWatch",
    "WorkerLoop",
    "api",
    "PEER_CMA_OPTIONS",
    "PEER_NO_CACHE_OPTIONS",
    "make_worker",
    "memory_events_work",
    "peer_options",
    "namespace",
    "proc_start",
    "why",
]

log = logging.getLogger("pdfabric.transports")


def _import_ucxx() -> tuple[Any, Any]:
    before = {k: v for k, v in os.environ.items() if k.startswith("UCX_")}
    os.environ.setdefault("UCX_LOG_FILE", "stderr")
    try:
        import ucxx._lib.libucxx as ucx_api  # an ImportError here: the registry's install hint
        from ucxx._lib.arr import Array as ucx_array
    finally:
        for k in [k for k in os.environ if k.startswith("UCX_") and k not in before]:
            del os.environ[k]
        os.environ.update(before)
    return ucx_api, ucx_array


api, Array = _import_ucxx()

#: what ucxx raises: its UCX status errors, plus RuntimeError/ValueError/IndexError for
#: objects it refuses (a closed endpoint, a malformed address)
UCX_ERRORS: tuple[type[BaseException], ...] = (api.UCXError, RuntimeError, ValueError, IndexError)


#: UCX options of peer error handling where the process's UCX has a registration cache:
#: the cross-memory-copy lane on one host (see ``peer_options``) ...
PEER_CMA_OPTIONS = {"CMA_MEMORY_INVALIDATE": "y", "RNDV_THRESH": "16384"}
#: ... and where it has none: TCP only and no zero-copy sends, so that no request of ours
#: holds registered memory - neither a send nor a rendezvous receive a peer writes into
PEER_NO_CACHE_OPTIONS = {"TLS": "tcp", "ZCOPY_THRESH": "inf"}
_UCM_EVENT_VM_UNMAPPED = 1 << 17


def memory_events_work() -> bool:
    """Whether ucxx's UCX can hook this process's memory-unmap events right now, which is
    what its registration cache needs (the same call UCX's cache makes, undone at once).

    It cannot when another copy of UCX in the process - NIXL's wheel bundles its own -
    installed its memory hooks after ours: UCX then makes contexts without a registration
    cache ("rcache failed to install UCM event handler" in its diagnostics)."""
    try:
        import libucx  # ucxx's UCX libraries (libucx-cu12), already loaded by ucxx

        path = os.path.join(os.path.dirname(libucx.__file__), "lib", "libucm.so.0")
        ucm = ctypes.CDLL(path, mode=os.RTLD_NOLOAD)
        callback = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)(lambda *_: None)
        ucm.ucm_set_event_handler.restype = ctypes.c_int
        if ucm.ucm_set_event_handler(_UCM_EVENT_VM_UNMAPPED, 0, callback, None) != 0:
            return False
        ucm.ucm_unset_event_handler(_UCM_EVENT_VM_UNMAPPED, callback, None)
        return True
    except (ImportError, OSError, AttributeError):
        return False


def peer_options() -> tuple[dict[str, str], bool]:
    """UCX context options for peer error handling, and whether they take the
    cross-memory-copy lane on one host; a ``UCX_<name>`` variable set by the user wins.

    UCX 1.21 has a NULL dereference that kills the process when a context has no
    registration cache: failing the requests of an endpoint whose peer died, it invalidates
    their registered memory through the cache without checking that there is one
    (``ucp_ep_reqs_purge`` / ``ucp_proto_rndv_rts_abort`` -> ``ucp_request_memh_invalidate``
    -> ``ucs_rcache_region_invalidate``). A context has none where UCM cannot hook memory
    events (``memory_events_work``) or ``UCX_RCACHE_ENABLE`` switches it off. There, no
    request may hold registered memory: zero-copy sends are off, and only TCP is offered to
    peers, so that none can take a rendezvous into our memory either (a receive of a
    rendezvous from a peer on the cross-memory lane holds it too, and crashed the same way
    when that peer died). A ``tls`` option of the transport still wins.

    With a cache: with peer error handling UCX takes a rendezvous lane only from a memory
    domain that can invalidate registrations, and its cross-memory-attach domain says so
    only with ``CMA_MEMORY_INVALIDATE=y`` (without it one host moves bytes over TCP).
    ``RNDV_THRESH`` keeps small messages eager (UCX's automatic threshold sent even 4 KiB by
    rendezvous then)."""
    off = os.environ.get("UCX_RCACHE_ENABLE", "").lower() in ("n", "no", "off", "0", "false")
    cache = not off and memory_events_work()
    opts = PEER_CMA_OPTIONS if cache else PEER_NO_CACHE_OPTIONS
    return {k: v for k, v in opts.items() if f"UCX_{k}" not in os.environ}, cache


def make_worker(tls: str | None, net_devices: str | None, rndv_scheme: str,
                extra: dict[str, str] | None = None) -> tuple[Any, Any, bool]:  # fmt: skip
    """A UCX context (tag matching + wakeup), its worker in blocking-progress mode, and
    whether the ``extra`` options are in it (they are dropped again if this UCX refuses
    them); TransportUnavailable when UCX cannot start with these settings."""
    config = {"RNDV_SCHEME": rndv_scheme}
    if tls:
        config["TLS"] = tls
    if net_devices:
        config["NET_DEVICES"] = net_devices
    try:
        applied = bool(extra)
        try:
            ctx = api.UCXContext({**(extra or {}), **config}, feature_flags=(api.Feature.TAG, api.Feature.WAKEUP))
        except UCX_ERRORS as e:
            if not extra:
                raise
            log.info("ucx: UCX refused %s (%s); starting without them", extra, why(e))
            applied = False
            ctx = api.UCXContext(config, feature_flags=(api.Feature.TAG, api.Feature.WAKEUP))
        worker = api.UCXWorker(ctx)
        worker.init_blocking_progress_mode()
    except UCX_ERRORS as e:
        raise TransportUnavailable(
            f"UCX could not start a worker with {config or 'its defaults'}: {why(e)}; "
            "check the tls / net_devices options (`ucx_info -d` lists what this machine has)",
            transport="ucx",
        ) from e
    return ctx, worker, applied


class WorkerLoop(OwnerThread):
    """The one thread that calls into a worker; see the module docstring."""

    transport, library = "ucx", "UCX"

    def __init__(self, name: str, worker: Any, step: Callable[[], bool], cap: Callable[[], float]) -> None:
        super().__init__(name)
        self._worker, self._step, self._cap = worker, step, cap
        self._fds = (self._efd, worker.epoll_file_descriptor)

    def _stopped(self) -> None:
        self._worker = None  # the transport drops the worker next

    def _run(self) -> None:
        while True:
            busy = self._drain()
            if self.stopping:
                break
            try:
                busy |= self._step()
            except Exception:  # one bad message must not stop the data path
                log.exception("ucx: unexpected error on the UCX thread")
            if busy:
                continue
            try:
                armed = self._worker.arm()  # False: events are pending, progress again
            except UCX_ERRORS:
                armed = True
            if armed:
                self._ready(self._fds, self._cap())
        self._drain()  # commands queued meanwhile see ``stopping`` and fail fast
