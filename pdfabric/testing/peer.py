"""A transport endpoint in a child process, driven by JSON lines (tests and benchmarks).

Run as ``python -m pdfabric.testing.peer --transport tcp --options '{"streams": 2}'``.
Each stdin line is a request ``{"op": ..., ...}``; each stdout line the reply
``{"ok": true, ...}`` or ``{"ok": false, "error": "GrantRefused", "message": ...}``.
``PeerProcess`` is the parent side: it starts, drives and always stops the child (by pid,
SIGKILL after a grace period), and every read of a reply has a timeout.
"""

from __future__ import annotations

import base64
import json
import os
import selectors
import signal
import subprocess
import sys
from typing import Any

import msgspec
import numpy as np

__all__ = ["PeerProcess", "Child", "serve", "main", "encode_descriptor", "decode_descriptor", "PeerRequestError"]


def encode_descriptor(desc: Any) -> str:
    return base64.b64encode(msgspec.msgpack.encode(desc)).decode()


def decode_descriptor(text: str) -> Any:
    from pdfabric.transports.base import PeerDescriptor

    return msgspec.msgpack.decode(base64.b64decode(text), type=PeerDescriptor)


class PeerRequestError(Exception):
    """The child answered a request with an error (``kind`` is the exception class name)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


class PeerProcess:
    """Parent-side handle of a child transport endpoint."""

    def __init__(
        self,
        transport: str,
        options: dict[str, Any] | None = None,
        *,
        timeout: float = 30.0,
        module: str = "pdfabric.testing.peer",
    ) -> None:
        self.timeout = timeout
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "--transport", transport, "--options", json.dumps(options or {})],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        self._sel = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        self._sel.register(self.proc.stdout, selectors.EVENT_READ)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def request(self, op: str, timeout: float | None = None, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        limit = self.timeout if timeout is None else timeout
        if not self._sel.select(limit):
            raise TimeoutError(f"peer pid {self.pid} did not answer {op!r} within {limit}s")
        line = self.proc.stdout.readline()
        if not line:
            raise EOFError(f"peer pid {self.pid} exited (code {self.proc.poll()}) during {op!r}")
        reply: dict[str, Any] = json.loads(line)
        if not reply.pop("ok"):
            raise PeerRequestError(reply["error"], reply["message"])
        return reply

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(10)

    def close(self) -> None:
        """Stop the child: ask politely, then SIGKILL. Always waits for it."""
        if self.proc.poll() is None:
            try:
                self.signal(signal.SIGCONT)
                self.request("exit", timeout=5)
            except (OSError, TimeoutError, EOFError, PeerRequestError, ValueError):
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        self._sel.close()

    def __enter__(self) -> "PeerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- child side ------------------------------------------------------------------------------


class Child:
    def __init__(self, transport: str, options: dict[str, Any]) -> None:
        from pdfabric.transports import create

        self.t = create(transport, **options)
        self.buffers: list[np.ndarray] = []
        self.handles: dict[str, Any] = {}

    def alloc(self, size: int, fill: str = "zero", seed: int = 0) -> dict[str, Any]:
        from pdfabric.memory import region_of

        if fill == "random":
            buf = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
        else:
            buf = np.zeros(size, dtype=np.uint8)
        self.buffers.append(buf)
        r = region_of(buf)
        self.t.register([r])
        return {"addr": r.addr, "size": r.length}

    def free_all(self) -> dict[str, Any]:
        """Drop every buffer allocated so far (they stay registered; never reused by us)."""
        self.buffers.clear()
        return {}

    def descriptor(self) -> dict[str, Any]:
        return {"descriptor": encode_descriptor(self.t.descriptor())}

    def connect(self, descriptor: str) -> dict[str, Any]:
        return {"peer": self.t.connect(decode_descriptor(descriptor))}

    def grant(self, tid: str, regions: list[list[int]]) -> dict[str, Any]:
        from pdfabric.memory import Region

        self.t.grant(tid, [Region(a, n) for a, n in regions])
        return {}

    def write(self, peer: str, tid: str, src: list[list[int]], dst: list[list[int]], wait: bool = True, timeout: float = 30.0) -> dict[str, Any]:
        from pdfabric.memory import Region
        from pdfabric.transports import PeerId, TransferId, TransferPlan

        plan = TransferPlan(TransferId(tid), tuple(Region(a, n) for a, n in src), tuple(Region(a, n) for a, n in dst))
        h = self.t.write(PeerId(peer), plan, notify=tid.encode())
        if wait:
            self.t.wait(h, timeout)
        else:
            self.handles[tid] = h
        return {}

    def wait_recv(self, tid: str, timeout: float = 30.0) -> dict[str, Any]:
        r = self.t.wait_recv(tid, timeout)
        return {"nbytes": r.nbytes, "notify": r.notify.decode(errors="replace")}

    def digest(self, addr: int, size: int) -> dict[str, Any]:
        import hashlib

        from pdfabric.memory import Region, view_of

        return {"sha256": hashlib.sha256(view_of(Region(addr, size))).hexdigest()}


def serve(child: Child) -> None:
    """Answer JSON-line requests on stdin until ``exit`` or EOF."""
    for line in sys.stdin:
        req = json.loads(line)
        op = req.pop("op")
        if op == "exit":
            print(json.dumps({"ok": True}), flush=True)
            return
        try:
            out = getattr(child, op)(**req)
            print(json.dumps({"ok": True, **out}), flush=True)
        except Exception as e:  # reported to the parent, which asserts on the type
            print(json.dumps({"ok": False, "error": type(e).__name__, "message": str(e)}), flush=True)


def main(child_class: type[Child] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--transport", required=True)
    p.add_argument("--options", default="{}")
    args = p.parse_args()
    child = (child_class or Child)(args.transport, json.loads(args.options))
    try:
        serve(child)
    finally:
        child.t.close()


if __name__ == "__main__":
    main()
