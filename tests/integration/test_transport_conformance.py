"""Every transport passes every conformance check (real sockets / processes on this host)."""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import pytest

from pdfabric.testing import CHECKS
from pdfabric.transports import Transport, create
from pdfabric.transports.loopback import LoopbackHub

TRANSPORTS: dict[str, dict[str, Any]] = {
    "loopback": {},
    "tcp": {"streams": 2},
    "tcp-1stream": {"streams": 1},
    "shm": {},
    "nixl": {},
    "nixl-peer": {"ucx_error_handling": "peer"},  # UCX error handling of the multi-host configs
    "ucx": {},  # UCX peer error handling (the default): TCP/RDMA paths
    "ucx-cma": {"ucx_error_handling": "none"},  # the same-host fast path: shared memory, cross-memory copy
}
NIXL_MISSING = "nixl is not installed (pip install --no-deps nixl nixl-cu12 nixl-cu13, or the 'nixl' extra)"
UCX_MISSING = "ucxx is not installed (pip install ucxx-cu12, or the 'ucx' extra)"


@functools.cache
def _ucx_started() -> None:
    """UCX keeps process-wide state from its first context on (its async thread's epoll and
    event fds, memory hooks: 11 fds here) for the life of the process. Start it once before
    any check counts file descriptors, so ``close`` measures what one transport leaks."""
    create("nixl").close()


@functools.cache
def _ucxx_started() -> None:
    """The same for ucxx's own UCX: its first endpoints start process-wide state."""
    a, b = create("ucx"), create("ucx")
    a.connect(b.descriptor())
    a.close()
    b.close()


def _needs(name: str) -> None:
    if name == "nixl":
        if importlib.util.find_spec("nixl") is None:
            pytest.skip(NIXL_MISSING)
        _ucx_started()
    if name == "ucx":
        if importlib.util.find_spec("ucxx") is None:
            pytest.skip(UCX_MISSING)
        _ucxx_started()


def _factory(variant: str):
    name = variant.split("-")[0]
    options = dict(TRANSPORTS[variant])

    def make_pair() -> tuple[Transport, Transport]:
        if name == "loopback":
            hub = LoopbackHub()
            return create(name, hub=hub, **options), create(name, hub=hub, **options)
        return create(name, **options), create(name, **options)

    return name, options, make_pair


@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("variant", list(TRANSPORTS))
def test_conformance(variant: str, check: str) -> None:
    name, options, make_pair = _factory(variant)
    _needs(name)
    if check == "peer_death":
        CHECKS[check](make_pair, name, options)
    else:
        CHECKS[check](make_pair)


@pytest.mark.parametrize("kind", ["tcp", "shm", "loopback", "nixl", "ucx"])
def test_topology_transport_options_build_that_transport(kind: str) -> None:
    """Every option a topology accepts for a transport is one its constructor takes."""
    _needs(kind)
    from pdfabric.config import load_topology
    from pdfabric.transports import create_from_config

    from pathlib import Path
    import tempfile

    text = Path("configs/cpu-1p1d-tcp.yaml").read_text().replace("kind: tcp", f"kind: {kind}")
    if kind != "tcp":
        text = "\n".join(l for l in text.splitlines() if not l.strip().startswith(("streams:", "connect_timeout_s:", "transfer_timeout_s:")) or kind == "shm")
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "t.yaml"
        f.write_text(text)
        topo = load_topology(f)
    cfg = topo.transport_for("prefill-0", "decode-0")
    assert cfg.kind == kind
    t = create_from_config(cfg)
    try:
        assert t.name == kind
    finally:
        t.close()
