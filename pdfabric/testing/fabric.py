"""A prefill/decode pair of real vLLM engines joined by pdfabric, for tests and benchmarks.

``FabricPair`` starts both engines (each pinned to its own core), knows their control
endpoints and the shared secret, and offers ``leaks()``: everything that must be back
to idle after any scenario - no open transfers or held requests in either connector, no
pushes in flight, no running or waiting requests and no KV blocks in use in either
engine.
"""

from __future__ import annotations

import os
import random
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdfabric.connector.control import query_status
from pdfabric.protocol.messages import StatusReply
from pdfabric.testing.engines import Engine, EngineSpec, connector_config

__all__ = ["make_prompt", "free_port", "FabricPair", "SECRET_ENV"]

SECRET_ENV = "PDFABRIC_TEST_SECRET"


def make_prompt(n: int, seed: int, vocab: int) -> list[int]:
    """``n`` token ids (vLLM adds no BOS to a token prompt), deterministic per seed."""
    rng = random.Random(seed)
    return [rng.randrange(10, vocab) for _ in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class FabricPair:
    model: Path
    log_dir: Path
    transport: dict[str, Any] = field(default_factory=lambda: {"kind": "tcp"})
    producer_extra: dict[str, Any] = field(default_factory=dict)
    consumer_extra: dict[str, Any] = field(default_factory=dict)
    secret: str = field(default_factory=lambda: os.urandom(16).hex())
    engine_args: list[str] = field(default_factory=list)  # extra vLLM server flags for both engines

    def __post_init__(self) -> None:
        self.p_port, self.p_ctl, self.d_port, self.d_ctl = (free_port() for _ in range(4))
        self.prefill = self._engine("prefill", "kv_producer", self.p_port, self.p_ctl, "0", self.producer_extra)
        self.decode = self._engine("decode", "kv_consumer", self.d_port, self.d_ctl, "1", self.consumer_extra)

    def _engine(self, name: str, role: str, port: int, ctl: int, core: str, extra: dict[str, Any]) -> Engine:
        cfg = {"transport": self.transport, "control_port": ctl, "engine_name": name,
               "secret": {"env": SECRET_ENV}, **extra}
        spec = EngineSpec(name, port, self.model, self.log_dir, connector_config(role, cfg), cores=core,
                          extra_args=list(self.engine_args), env={SECRET_ENV: self.secret})
        return Engine(spec)

    @property
    def producer_addr(self) -> str:
        return f"127.0.0.1:{self.p_ctl}"

    def start(self, timeout: float = 400.0) -> "FabricPair":
        try:
            self.prefill.start()
            self.decode.start()
            self.prefill.wait_ready(timeout)
            self.decode.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def restart(self, which: str, timeout: float = 400.0) -> None:
        engine = self.prefill if which == "prefill" else self.decode
        engine.stop()
        engine.start()
        engine.wait_ready(timeout)

    def stop(self) -> None:
        for e in (self.decode, self.prefill):
            e.stop()

    def status(self, which: str) -> StatusReply:
        port = self.p_ctl if which == "prefill" else self.d_ctl
        return query_status(f"127.0.0.1:{port}", self.secret.encode())

    def leaks(self) -> list[str]:
        """What is still held anywhere; empty when both sides are idle."""
        found: list[str] = []
        for which, engine in (("prefill", self.prefill), ("decode", self.decode)):
            if not engine.alive:
                continue
            st = self.status(which)
            if st.open_transfers:
                found.append(f"{which}: open transfers {st.open_transfers}")
            for key in ("held_requests", "pushes_in_flight", "staging_bytes_in_use"):
                if st.counters.get(key, 0):
                    found.append(f"{which}: {key}={st.counters[key]}")
            m = engine.metrics()
            for key in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
                if m.get(key, 0.0):
                    found.append(f"{which}: {key}={m[key]}")
        return found

    def wait_idle(self, timeout: float = 30.0) -> list[str]:
        """Poll ``leaks()`` until empty or ``timeout``; returns the last finding."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.leaks()
            if not found or time.monotonic() > deadline:
                return found
            time.sleep(0.25)

    def __enter__(self) -> "FabricPair":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
