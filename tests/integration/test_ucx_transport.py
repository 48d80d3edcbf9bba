"""The ucx transport beyond the conformance suite: bad and stale descriptors, unreachable and
restarted peers, plans the receiver refuses, forged segments (dropped unread), writes after
either side closed, the environment ucxx is loaded into, and idle CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import numpy as np
import pytest

from pdfabric.errors import (
    ConnectError,
    FrameError,
    GrantRefused,
    PeerGone,
    StalePeer,
    TransferAborted,
    TransportClosed,
)
from pdfabric.memory import Region, region_of
from pdfabric.testing import PeerProcess, decode_descriptor
from pdfabric.transports import PeerId, TransferId, TransferPlan, Transport, create

UCX_MISSING = "ucxx is not installed (pip install ucxx-cu12, or the 'ucx' extra)"
pytestmark = pytest.mark.skipif(importlib.util.find_spec("ucxx") is None, reason=UCX_MISSING)

KiB = 1024
SENTINEL = 0xA5


@pytest.fixture
def pair() -> Iterator[tuple[Transport, Transport, np.ndarray, np.ndarray]]:
    snd, rcv = create("ucx"), create("ucx")
    src = np.random.default_rng(0).integers(0, 256, 256 * KiB, dtype=np.uint8)
    dst = np.full(256 * KiB, SENTINEL, dtype=np.uint8)
    snd.register([region_of(src)])
    rcv.register([region_of(dst)])
    try:
        yield snd, rcv, src, dst
    finally:
        snd.close()
        rcv.close()


def _blocks(buf: np.ndarray, ids: range | list[int], size: int = 64 * KiB) -> tuple[Region, ...]:
    base = region_of(buf).addr
    return tuple(Region(base + i * size, size) for i in ids)


def _wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def _child_descriptor(child: PeerProcess) -> Any:
    return decode_descriptor(child.request("descriptor")["descriptor"])


# ------------------------------------------------------------------ descriptors


def test_descriptor_carries_the_worker_address_as_bytes(pair) -> None:  # type: ignore[no-untyped-def]
    from pdfabric.transports import _ucx_wire as w

    _, rcv, _, _ = pair
    d = rcv.descriptor()
    info = w.decode_info(d.extra)
    assert d.transport == "ucx" and d.endpoint == f"ucx:worker-{d.incarnation[:8]}" and d.pid == os.getpid()
    assert info.version == w.UCX_WIRE_VERSION and isinstance(info.address, bytes) and len(info.address) > 16


def test_descriptor_of_another_transport_or_without_worker_info_is_refused(pair) -> None:  # type: ignore[no-untyped-def]
    from pdfabric.transports import _ucx_wire as w

    snd, rcv, _, _ = pair
    d = rcv.descriptor()
    with pytest.raises(ConnectError, match="descriptor is for transport 'tcp'"):
        snd.connect(msgspec.structs.replace(d, transport="tcp"))
    with pytest.raises(ConnectError, match="not a ucx descriptor: descriptor carries no pdfabric UCX worker information"):
        snd.connect(msgspec.structs.replace(d, extra=b""))
    newer = msgspec.structs.replace(w.decode_info(d.extra), version=w.UCX_WIRE_VERSION + 1)
    with pytest.raises(ConnectError, match=f"peer speaks ucx wire version {w.UCX_WIRE_VERSION + 1}"):
        snd.connect(msgspec.structs.replace(d, extra=w.encode_info(newer)))
    with pytest.raises(ConnectError, match="cannot connect to itself"):
        rcv.connect(d)


def test_descriptor_of_a_transport_closed_in_this_process_is_stale(pair) -> None:  # type: ignore[no-untyped-def]
    snd, _, _, _ = pair
    gone = create("ucx")
    d = gone.descriptor()
    gone.close()
    with pytest.raises(StalePeer, match="the transport this descriptor names was closed"):
        snd.connect(d, timeout=1)


# ------------------------------------------------------------------ other processes


def test_restarted_peer_its_old_descriptor_is_refused_its_new_one_works() -> None:
    snd = create("ucx")
    try:
        with PeerProcess("ucx") as first:
            old = _child_descriptor(first)
        with PeerProcess("ucx") as second:
            t0 = time.monotonic()
            with pytest.raises(StalePeer, match=f"peer process {old.pid} has exited since this descriptor was made"):
                snd.connect(old, timeout=2)
            assert time.monotonic() - t0 < 1, "a stale descriptor should be refused without waiting"
            peer = snd.connect(_child_descriptor(second))
            src = np.arange(64 * KiB, dtype=np.uint8)
            snd.register([region_of(src)])
            dst = second.request("alloc", size=64 * KiB)["addr"]
            second.request("grant", tid="t", regions=[[dst, 64 * KiB]])
            snd.wait(snd.write(peer, TransferPlan(TransferId("t"), (region_of(src),), (Region(dst, 64 * KiB),)), b"n"), 10)
            assert second.request("wait_recv", tid="t")["nbytes"] == 64 * KiB
    finally:
        snd.close()


def test_hello_for_another_incarnation_of_a_live_peer_is_refused() -> None:
    snd = create("ucx")
    try:
        with PeerProcess("ucx") as child:
            forged = msgspec.structs.replace(_child_descriptor(child), incarnation="0" * 32)
            with pytest.raises(StalePeer, match="peer refused the handshake: hello for incarnation 00000000"):
                snd.connect(forged, timeout=5)
    finally:
        snd.close()


def test_unreachable_peer_fails_the_handshake_at_its_timeout() -> None:
    snd = create("ucx")
    try:
        with PeerProcess("ucx") as child:
            d = _child_descriptor(child)
            child.signal(signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                with pytest.raises(ConnectError, match="did not answer the handshake within 0.5s"):
                    snd.connect(d, timeout=0.5)
                assert time.monotonic() - t0 < 3
            finally:
                child.signal(signal.SIGCONT)
    finally:
        snd.close()


# ------------------------------------------------------------------ plans


def test_write_to_a_peer_never_connected(pair) -> None:  # type: ignore[no-untyped-def]
    snd, _, src, dst = pair
    plan = TransferPlan(TransferId("x"), _blocks(src, [0]), _blocks(dst, [0]))
    with pytest.raises(ConnectError, match="not connected to peer nobody; call connect"):
        snd.write(PeerId("nobody"), plan)


def test_plan_outside_the_grant_is_refused_naming_the_bytes(pair) -> None:  # type: ignore[no-untyped-def]
    snd, rcv, src, dst = pair
    peer = snd.connect(rcv.descriptor())
    rcv.grant("g", _blocks(dst, [0, 1]))
    plan = TransferPlan(TransferId("g"), _blocks(src, [0, 1, 2]), _blocks(dst, [0, 1, 3]))
    outside = region_of(dst).addr + 3 * 64 * KiB
    with pytest.raises(GrantRefused, match=f"write of 65536 bytes at {outside:#x} is outside the grant") as e:
        snd.wait(snd.write(peer, plan), 5)
    assert e.value.transfer_id == "g" and e.value.transport == "ucx"
    with pytest.raises(GrantRefused):
        rcv.wait_recv("g", 5)
    assert any(r.transfer_id == "g" and "outside the grant" in r.reason for r in rcv.rejections)
    assert (dst == SENTINEL).all(), "a refused write moved bytes"


def test_plan_smaller_than_its_grant_is_refused_before_bytes_move(pair) -> None:  # type: ignore[no-untyped-def]
    snd, rcv, src, dst = pair
    peer = snd.connect(rcv.descriptor())
    rcv.grant("short", _blocks(dst, [0, 1]))
    with pytest.raises(FrameError, match="write of 65536 bytes; 131072 were granted"):
        snd.wait(snd.write(peer, TransferPlan(TransferId("short"), _blocks(src, [0]), _blocks(dst, [0]))), 5)
    with pytest.raises(FrameError):
        rcv.wait_recv("short", 5)
    assert (dst == SENTINEL).all()


def _forge(snd: Transport, rcv: Transport, seq: int, tid: str, asked: list[Region], sent: list[np.ndarray]) -> None:
    """From ``snd``'s UCX thread: an Ask for ``asked`` and ``sent`` as its segments, as a
    faulty or hostile sender would (no write handle behind them)."""
    from pdfabric.transports import _ucx_wire as w
    from pdfabric.transports._ucx_worker import Array, api

    def post() -> None:
        p = snd._peers[rcv.descriptor().incarnation]  # type: ignore[attr-defined]
        segs = np.array([[r.addr, r.length] for r in asked], dtype=np.uint64).reshape(-1, 2)
        if asked:
            snd._send(p, w.Ask(seq, tid, w.pack_segments(segs), b""))  # type: ignore[attr-defined]
        for i, buf in enumerate(sent):
            snd._orphans.append(p.ep.tag_send(Array(buf), api.UCXXTag(w.data_tag(p.key_out, seq, i))))  # type: ignore[attr-defined]

    snd._io.call(post)  # type: ignore[attr-defined]


def test_segment_that_does_not_fit_its_ask_is_dropped_and_reported(pair) -> None:  # type: ignore[no-untyped-def]
    snd, rcv, _, dst = pair
    snd.connect(rcv.descriptor())
    rcv.grant("g", _blocks(dst, [0]))
    half = np.ones(32 * KiB, dtype=np.uint8)
    _forge(snd, rcv, 999, "g", list(_blocks(dst, [0])), [half])
    with pytest.raises(GrantRefused, match="segment 0 of write 999 of 32768 bytes does not fit the Ask"):
        rcv.wait_recv("g", 5)
    assert any(r.transfer_id == "g" and "does not fit" in r.reason for r in rcv.rejections)
    assert (dst == SENTINEL).all(), "a segment that did not fit moved bytes"


def test_scattered_small_segments_travel_packed_and_land_where_granted(pair) -> None:  # type: ignore[no-untyped-def]
    """Runs of small segments go as packed messages (_ucx_wire.message_groups), gathered on
    the sender and scattered on the receiver: every byte lands in its granted place."""
    snd, rcv, src, dst = pair
    peer = snd.connect(rcv.descriptor())
    rng = np.random.default_rng(5)
    sizes = [4 * KiB, 2 * KiB, 8 * KiB]  # 14 KiB a round: 18 rounds fill 252 of the 256 KiB
    src_at, dst_at = rng.permutation(18), rng.permutation(18)
    srcs, dsts = [], []
    for k in range(18):
        off = 0
        for n in sizes:
            srcs.append(Region(region_of(src).addr + int(src_at[k]) * 14 * KiB + off, n))
            dsts.append(Region(region_of(dst).addr + int(dst_at[k]) * 14 * KiB + off, n))
            off += n
    rcv.grant("packed", dsts)
    snd.wait(snd.write(peer, TransferPlan(TransferId("packed"), tuple(srcs), tuple(dsts))), 10)
    rcv.wait_recv("packed", 10)
    base_s, base_d = region_of(src).addr, region_of(dst).addr
    for s_, d_ in zip(srcs, dsts):
        a, b = s_.addr - base_s, d_.addr - base_d
        assert (dst[b : b + d_.length] == src[a : a + s_.length]).all()
    assert (dst[18 * 14 * KiB :] == SENTINEL).all()


def test_a_packed_message_lands_scattered_and_one_of_the_wrong_size_is_refused(pair) -> None:  # type: ignore[no-untyped-def]
    snd, rcv, _, dst = pair
    snd.connect(rcv.descriptor())
    asked = list(_blocks(dst, [0, 2, 1], size=16 * KiB))  # three small segments: one packed message
    rcv.grant("ok", asked)
    body = np.concatenate([np.full(16 * KiB, v, dtype=np.uint8) for v in (1, 2, 3)])
    _forge(snd, rcv, 500, "ok", asked, [body])
    rcv.wait_recv("ok", 5)
    assert (dst[:16 * KiB] == 1).all() and (dst[32 * KiB : 48 * KiB] == 2).all() and (dst[16 * KiB : 32 * KiB] == 3).all()
    bad = list(_blocks(dst, [4, 5, 6], size=16 * KiB))
    rcv.grant("bad", bad)
    _forge(snd, rcv, 501, "bad", bad, [body[: 40 * KiB]])
    with pytest.raises(GrantRefused, match="segment 0 of write 501 of 40960 bytes does not fit the Ask"):
        rcv.wait_recv("bad", 5)
    assert (dst[64 * KiB : 112 * KiB] == SENTINEL).all(), "a packed message of the wrong size moved bytes"


def test_segments_without_an_ask_or_after_a_revoke_never_land(pair) -> None:  # type: ignore[no-untyped-def]
    snd, rcv, _, dst = pair
    peer = snd.connect(rcv.descriptor())
    block = np.ones(64 * KiB, dtype=np.uint8)
    rcv.grant("g", _blocks(dst, [0]))
    _forge(snd, rcv, 7, "g", [], [block])  # segments of a write never Asked: left unread
    _forge(snd, rcv, 8, "g", list(_blocks(dst, [0])), [])  # Asked; its segment comes later
    _wait_for(lambda: 8 in rcv._peers[snd.descriptor().incarnation].approvals)  # type: ignore[attr-defined]
    t0 = time.monotonic()
    rcv.revoke("g")
    assert time.monotonic() - t0 < 2, "revoke waited for segments that were not landing"
    _forge(snd, rcv, 8, "g", [], [block])  # too late: dropped unread
    time.sleep(0.3)
    with pytest.raises(TransferAborted):
        rcv.wait_recv("g", 1)
    assert (dst == SENTINEL).all(), "bytes landed without a live approval"
    src = np.full(64 * KiB, 3, dtype=np.uint8)  # the pair still works
    snd.register([region_of(src)])
    rcv.grant("after", _blocks(dst, [1]))
    snd.wait(snd.write(peer, TransferPlan(TransferId("after"), (region_of(src),), _blocks(dst, [1]))), 5)
    rcv.wait_recv("after", 5)
    assert (dst[64 * KiB : 128 * KiB] == 3).all() and (dst[: 64 * KiB] == SENTINEL).all()


# ------------------------------------------------------------------ after close


def test_write_after_the_peer_closed_is_peer_gone(pair) -> None:  # type: ignore[no-untyped-def]
    snd, rcv, src, dst = pair
    peer = snd.connect(rcv.descriptor())
    rcv.close()
    plan = TransferPlan(TransferId("late"), _blocks(src, [0]), _blocks(dst, [0]))
    _wait_for(lambda: snd._by_id[peer].gone is not None)  # type: ignore[attr-defined]  # its Bye came
    with pytest.raises(PeerGone, match="peer closed: transport closed"):
        snd.wait(snd.write(peer, plan), 5)


def test_transfer_after_close_is_refused(pair) -> None:  # type: ignore[no-untyped-def]
    snd, rcv, src, dst = pair
    peer = snd.connect(rcv.descriptor())
    snd.close()
    plan = TransferPlan(TransferId("x"), _blocks(src, [0]), _blocks(dst, [0]))
    with pytest.raises(TransportClosed):
        snd.write(peer, plan)
    with pytest.raises(TransportClosed):
        snd.connect(rcv.descriptor())
    with pytest.raises(TransportClosed):
        snd.register([region_of(src)])
    assert snd.alive_threads() == []  # type: ignore[attr-defined]


# ------------------------------------------------------------------ environment


def test_missing_ucxx_package_names_the_install_command() -> None:
    code = (
        "import sys; sys.modules['ucxx'] = None\n"
        "from pdfabric.errors import TransportUnavailable\n"
        "from pdfabric.transports import create, available\n"
        "try:\n    create('ucx')\nexcept TransportUnavailable as e:\n    print(e.message); print(available()['ucx'])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2
    for line in lines:
        assert "transport 'ucx' is not available" in line and "pip install ucxx-cu12" in line and "pdfabric[ucx]" in line


ENV_SCRIPT = """
import json, os
before = {k: v for k, v in os.environ.items() if k.startswith("UCX_")}
from pdfabric.transports import create
a, b = create("ucx"), create("ucx")
a.connect(b.descriptor())
a.close(); b.close()
after = {k: v for k, v in os.environ.items() if k.startswith("UCX_")}
print(json.dumps([before, after]))
"""


def test_loading_ucxx_leaves_the_environment_and_stdout_alone() -> None:
    """ucxx edits UCX_* variables on import and UCX logs to stdout: neither may leak (child
    peers speak JSON on stdout; NIXL in the same process reads the same variables)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("UCX_")} | {"UCX_TLS": "^ib"}
    r = subprocess.run([sys.executable, "-c", ENV_SCRIPT], capture_output=True, text=True, timeout=60, env=env, check=False)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1, f"something else wrote to stdout: {r.stdout!r}"
    before, after = json.loads(lines[0])
    assert before == after == {"UCX_TLS": "^ib"}


IDLE_SCRIPT = """
import time, numpy as np
from pdfabric.memory import Region, region_of
from pdfabric.transports import create
rcv, snd = create("ucx"), create("ucx")
a, b = np.zeros(64 << 20, np.uint8), np.zeros(1 << 20, np.uint8)
rcv.register([region_of(a)]); snd.register([region_of(b)])
snd.connect(rcv.descriptor())
rcv.grant("open", [Region(region_of(a).addr, 4096)])  # a decode worker waiting for KV
time.sleep(0.5)
c0, t0 = time.process_time(), time.monotonic()
time.sleep(5.0)
print(100 * (time.process_time() - c0) / (time.monotonic() - t0))
rcv.close(); snd.close()
"""


def test_idle_connected_transports_use_under_2_percent_of_a_core() -> None:
    """Two registered, connected transports (one with an open grant) left idle for 5 s:
    the whole process stays well under 2% of a core (no polling progress thread)."""
    r = subprocess.run([sys.executable, "-c", IDLE_SCRIPT], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    pct = float(r.stdout.strip().splitlines()[-1])
    assert pct < 2.0, f"idle ucx transports used {pct:.2f}% of a core"


# ------------------------------------------------------------------ same-host path

PATH_SCRIPT = """
import sys
import numpy as np
from pdfabric.memory import region_of
from pdfabric.testing import CHECKS
from pdfabric.transports import TransferId, TransferPlan, create

for step in sys.argv[1]:
    if step == "u":  # a ucx pair made (and closed) before: ucxx's UCX hooked memory first
        a, b = create("ucx"), create("ucx")
        a.connect(b.descriptor()); a.close(); b.close()
    elif step == "n":  # a NIXL agent: NIXL's own UCX hooks memory after it
        create("nixl").close()
print("MARK", file=sys.stderr, flush=True)
rcv, snd = create("ucx"), create("ucx")
src = np.random.default_rng(5).integers(0, 256, 2 << 20, dtype=np.uint8)
dst = np.zeros(2 << 20, np.uint8)
rcv.register([region_of(dst)]); snd.register([region_of(src)])
peer = snd.connect(rcv.descriptor())
rcv.grant("t", [region_of(dst)])
snd.wait(snd.write(peer, TransferPlan(TransferId("t"), (region_of(src),), (region_of(dst),))), 10)
rcv.wait_recv("t", 10)
assert np.array_equal(src, dst), "bytes differ"
print(snd.cross_memory_copy, flush=True)
rcv.close(); snd.close()
CHECKS["peer_death"](lambda: (create("ucx"), create("ucx")), "ucx", {})
print("survived", flush=True)
"""


def _same_host_path(steps: str, **env: str) -> tuple[bool, list[str]]:
    """Run PATH_SCRIPT: whether the last pair took the cross-memory copy, and the rows of
    UCX's protocol table (``UCX_PROTO_INFO``) printed for it; asserts that the sender
    survived the receiver being killed mid-transfer."""
    r = subprocess.run([sys.executable, "-c", PATH_SCRIPT, steps], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "UCX_PROTO_INFO": "y", **env}, check=False)  # fmt: skip
    assert r.returncode == 0, f"exit {r.returncode} (-11: the sender segfaulted): {r.stderr[-3000:]}"
    out = r.stdout.split()
    assert out[-1] == "survived" and out[-2] in ("True", "False"), r.stdout
    rows = [line for line in r.stderr.split("MARK", 1)[1].splitlines() if "..inf" in line]
    assert rows, "UCX printed no protocol table"
    return out[-2] == "True", rows


def test_peer_mode_moves_same_host_segments_with_one_cross_memory_copy() -> None:
    """Peer error handling (the default) takes UCX's rendezvous over cross-memory attach on
    one host, and a receiver killed mid-rendezvous still only fails the sender's write."""
    fast, rows = _same_host_path("")
    assert fast
    assert any("rendezvous" in r and "cma/memory" in r for r in rows), "\n".join(rows)


def test_without_a_registration_cache_peer_mode_keeps_tcp_and_survives() -> None:
    """UCX 1.21 dereferences a missing registration cache when it fails the requests to a
    dead peer that hold registered memory: without a cache, peer mode stays on TCP with no
    zero-copy sends (and the sender alive)."""
    fast, rows = _same_host_path("", UCX_RCACHE_ENABLE="n")
    assert not fast
    assert not any("cma" in r or "zero-copy" in r for r in rows), "\n".join(rows)


@pytest.mark.skipif(importlib.util.find_spec("nixl") is None, reason="nixl is not installed (the nixl extra)")
def test_nixl_hooking_memory_after_ucxx_turns_the_fast_path_off_safely() -> None:
    """NIXL's wheel bundles another UCX; once it hooked memory after ucxx's, new ucxx
    contexts get no registration cache: the transport sees that and stays on TCP."""
    fast, rows = _same_host_path("un")
    assert not fast
    assert not any("cma" in r or "zero-copy" in r for r in rows), "\n".join(rows)
