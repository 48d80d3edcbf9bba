"""A bare NIXL agent that speaks the nixl transport's control messages by hand, to drive
a receiver's checks the real sender never trips (forged Done, a writer that dies after
its approval). In-process, or as a child: ``python nixl_rogue.py ask|begin TID`` reads a
descriptor (base64 msgpack) and segments on stdin, says Hello, Asks (or takes up the
receiver's offer), prints "approved" and waits to be killed."""

from __future__ import annotations

import base64
import json
import logging
import os
import sys
import time
import uuid
from typing import Any

import msgspec
import numpy as np

from pdfabric.transports import _nixl_wire as w
from pdfabric.transports._nixl_agent import as_text, proc_start
from pdfabric.transports.base import PeerDescriptor


class Rogue:
    def __init__(self, name: str | None = None) -> None:
        from nixl._api import nixl_agent, nixl_agent_config

        logging.getLogger("nixl").handlers.clear()
        self.name = name or f"rogue-{uuid.uuid4().hex[:8]}"
        self.agent: Any = nixl_agent(self.name, nixl_agent_config(enable_prog_thread=False, backends=[]))
        self.agent.create_backend("UCX", {"ucx_error_handling_mode": "none"})
        self.peer = ""
        self.desc: PeerDescriptor | None = None
        self.epoch = -1
        self.backlog: list[Any] = []

    def meet(self, desc: PeerDescriptor) -> w.PeerInfo:
        info = w.decode_info(desc.extra)
        self.peer, self.desc, self.epoch = as_text(self.agent.add_remote_agent(info.metadata)), desc, info.epoch
        return info

    def hello(self) -> None:
        import nixl._bindings as nb

        from pdfabric.transports.registry import local_host_id

        assert self.desc is not None
        md = self.agent.get_partial_agent_metadata(nb.nixlRegDList(nb.DRAM_SEG), True)
        pidns = os.readlink("/proc/self/ns/pid")
        self.send(w.Hello(w.NIXL_WIRE_VERSION, self.desc.incarnation, uuid.uuid4().hex, md, os.getpid(),
                          local_host_id(), pidns, proc_start(os.getpid()) or 0, "", "", self.epoch))  # fmt: skip
        self.expect(w.HelloOk)

    def send(self, msg: Any) -> None:
        self.agent.send_notif(self.peer, w.encode(msg))

    def expect(self, cls: type, timeout: float = 5.0) -> Any:
        """The first message of type ``cls`` (older ones of other types are dropped; those
        after it are kept for the next call)."""
        deadline = time.monotonic() + timeout
        while True:
            while self.backlog:
                m = self.backlog.pop(0)
                if isinstance(m, cls):
                    return m
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no {cls.__name__} within {timeout}s")
            for msgs in self.agent.get_new_notifs().values():
                self.backlog.extend(w.decode(raw) for raw in msgs)
            if not self.backlog:
                time.sleep(0.001)

    def close(self) -> None:
        if self.peer:
            self.agent.remove_remote_agent(self.peer)
        self.agent = None


def _child(mode: str, tid: str) -> None:
    """Say hello, then either Ask to write ``segs`` for ``tid`` (mode ``ask``) or take up
    the receiver's offer of ``tid`` (mode ``begin``: Begin, as a writer does whose WRITE is
    still in flight); report "approved", then hang."""
    req = json.loads(sys.stdin.readline())
    desc = msgspec.msgpack.decode(base64.b64decode(req["descriptor"]), type=PeerDescriptor)
    r = Rogue()
    info = r.meet(desc)
    r.hello()
    if mode == "begin":
        offer = r.expect(w.Offer)
        assert offer.tid == tid, offer
        r.send(w.Begin(offer.seq))
    else:
        segs = w.pack_segments(np.array(req["segs"], dtype=np.uint64))
        r.send(w.Ask(1, tid, info.epoch, segs))
        r.expect(w.AskOk)
    print("approved", flush=True)
    while True:  # keep answering pings until killed
        r.agent.get_new_notifs()
        time.sleep(0.01)


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
