"""How low can a Python receiver built like ``tcp``'s go? The 4 KiB one-way latency of two
plain-socket designs, in the same run, against the raw half round trip:

- ``raw``: the receiving thread reads, timestamps and echoes the 4 KiB (its round trip
  halved is ``raw_socket_half_rtt``, the baseline of the latency row);
- ``handoff``: a connection thread reads, then wakes a waiting thread that timestamps, and
  the sender learns of completion on a reader thread (the thread structure every pdfabric
  socket transport has: a receive loop per connection, ``wait_recv`` on the caller's
  thread, ACKs on the sender's reader thread), with no other work at all.

    python benchmarks/latency_floor.py --iters 2000 --rounds 3

Only sockets and threads, no pdfabric code: the gap between ``handoff`` and ``raw`` is the
floor the thread hand-offs alone put under any such transport on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import threading
import time

SIZE = 4096 + 16  # a 4 KiB block and a small header


def receiver(port: int, iters: int, handoff: bool, out: int) -> None:
    lst = socket.create_server(("127.0.0.1", port))
    c, _ = lst.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(SIZE)
    stamps: list[int] = []
    if not handoff:
        for _ in range(iters):
            c.recv_into(buf, SIZE, socket.MSG_WAITALL)
            stamps.append(time.perf_counter_ns())
            c.sendall(buf)  # 4 KiB each way, like pdfabric bench transfer's baseline
    else:
        events = [threading.Event() for _ in range(iters)]

        def waiter() -> None:
            for e in events:
                e.wait(10)
                stamps.append(time.perf_counter_ns())

        th = threading.Thread(target=waiter)
        th.start()
        for e in events:
            c.recv_into(buf, SIZE, socket.MSG_WAITALL)
            e.set()
            c.sendall(b"\x01")
        th.join(10)
    os.write(out, (json.dumps(stamps) + "\n").encode())


def one_round(iters: int, handoff: bool) -> tuple[float, float]:
    """Median one-way and half round-trip microseconds of one run (the first tenth is warm-up)."""
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            receiver(port, iters, handoff, w)
        finally:
            os._exit(0)
    os.close(w)
    try:
        s = _dial(port)
        payload, ack, echo = b"x" * SIZE, bytearray(1), bytearray(SIZE)
        starts: list[int] = []
        rtts: list[int] = []
        done = [threading.Event() for _ in range(iters)]

        def reader() -> None:
            for e in done:
                s.recv_into(ack, 1)
                e.set()

        th = threading.Thread(target=reader, daemon=True) if handoff else None
        if th:
            th.start()
        for i in range(iters):
            starts.append(time.perf_counter_ns())
            s.sendall(payload)
            if th:
                done[i].wait(10)
            else:
                s.recv_into(echo, SIZE, socket.MSG_WAITALL)
            rtts.append(time.perf_counter_ns() - starts[-1])
        ends = json.loads(_read_line(r, 30))
        s.close()
    finally:
        os.close(r)
        _reap(pid)
    warm = iters // 10
    return (statistics.median((e - b) / 1e3 for b, e in zip(starts[warm:], ends[warm:])),
            statistics.median(rtts[warm:]) / 2e3)


def _dial(port: int) -> socket.socket:
    deadline = time.monotonic() + 10
    while True:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return s
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _read_line(fd: int, timeout: float) -> str:
    import select

    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            raise TimeoutError(f"the receiver sent no timestamps within {timeout}s")
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            raise RuntimeError("the receiver exited without its timestamps")
        data += chunk
    return data.decode()


def _reap(pid: int) -> None:
    for _ in range(100):
        if os.waitpid(pid, os.WNOHANG)[0]:
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    if args.rounds < 3 or args.iters < 100:
        ap.error("--rounds must be >= 3 and --iters >= 100")
    raw, hand = [], []
    for _ in range(args.rounds):  # interleaved, so both see the same machine
        raw.append(one_round(args.iters, False))
        hand.append(one_round(args.iters, True))
    half = statistics.median(x[1] for x in raw)
    r, h = statistics.median(x[0] for x in raw), statistics.median(x[0] for x in hand)
    print(f"medians of {args.rounds} rounds of {args.iters} transfers of 4 KiB, p50 in us:")
    print(f"  raw half round trip   {half:7.1f}   (the baseline of pdfabric bench transfer's latency row)")
    print(f"  raw one-way           {r:7.1f}   {r / half:.2f}x the half round trip")
    print(f"  handoff one-way       {h:7.1f}   {h / half:.2f}x the half round trip")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"raw_half_rtt_us": half, "raw_one_way_us": r, "handoff_one_way_us": h,
                       "handoff_ratio": h / half, "rounds": {"raw": raw, "handoff": hand}}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
