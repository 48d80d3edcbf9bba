"""Helpers for the proxy tests: the proxy and fake engines run on a background thread's event
loop; the test talks to them over loopback HTTP from the main thread (httpx, the openai
client, raw sockets) and reads what the fakes recorded."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import uvloop
from pdfabric.proxy.instances import Instance, Registry
from pdfabric.proxy.server import Proxy, ProxySettings

from pdfabric.testing.fake_engine import FakeEngine, Received

T = TypeVar("T")

LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 4  # ~45 estimated tokens


class BackgroundLoop:
    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="proxy-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 15.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        async def cancel_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.sleep(0)

        try:
            self.run(cancel_rest(), timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(pred: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def sse_events(text: str) -> list[Any]:
    """The ``data:`` payloads of an SSE body, JSON-decoded (``[DONE]`` kept as a string)."""
    out: list[Any] = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def assert_openai_error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    return err  # type: ignore[no-any-return]


@dataclass
class Stack:
    """A proxy in front of ``prefills`` and ``decodes`` fake engines."""

    bg: BackgroundLoop
    proxy: Proxy
    port: int
    prefills: list[FakeEngine]
    decodes: list[FakeEngine]
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=self.url, timeout=10.0)

    @classmethod
    def start(cls, bg: BackgroundLoop, prefills: int = 2, decodes: int = 1, engine: dict[str, Any] | None = None,
              **settings: Any) -> Stack:
        engine = engine or {}
        settings.setdefault("port", 0)
        p = [FakeEngine(f"p{i}", "prefill", **engine) for i in range(prefills)]
        d = [FakeEngine(f"d{i}", "decode", **engine) for i in range(decodes)]

        async def up() -> tuple[Proxy, int]:
            for e in p + d:
                await e.start()
            reg = Registry([Instance(e.name, "prefill", e.url, e.control) for e in p]
                           + [Instance(e.name, "decode", e.url) for e in d])
            proxy = Proxy(ProxySettings(**settings), reg)
            return proxy, await proxy.start()

        proxy, port = bg.run(up())
        return cls(bg, proxy, port, p, d)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def engines(self) -> list[FakeEngine]:
        return self.prefills + self.decodes

    def stop(self) -> None:
        self.client.close()

        async def down() -> None:
            for e in self.engines:  # first: a proxy leg still open then ends at once
                await e.stop()
            await self.proxy.stop()

        self.bg.run(down(), timeout=30)

    def stop_engine(self, e: FakeEngine) -> None:
        """Close the fake's port (connections refused from now on)."""
        self.bg.run(e.stop())

    # -- requests ------------------------------------------------------------------
    def complete(self, prompt: Any = "hello", **fields: Any) -> httpx.Response:
        return self.client.post("/v1/completions", json={"model": "fake-model", "prompt": prompt, **fields})

    def chat(self, content: str = "hello", **fields: Any) -> httpx.Response:
        msgs = [{"role": "user", "content": content}]
        return self.client.post("/v1/chat/completions", json={"model": "fake-model", "messages": msgs, **fields})

    def metrics(self) -> dict[str, float]:
        text = self.client.get("/metrics").text
        out: dict[str, float] = {}
        for line in text.splitlines():
            m = re.fullmatch(r"([a-z_]+(?:\{[^}]*\})?) (\S+)", line)
            if m:
                out[m.group(1)] = float(m.group(2))
        return out

    def instance(self, name: str) -> dict[str, Any]:
        for i in self.client.get("/admin/instances").json()["instances"]:
            if i["name"] == name:
                return i  # type: ignore[no-any-return]
        raise KeyError(name)

    def settle(self) -> None:
        """Wait until the prefill leg of every decode leg not cancelled reached its engine:
        with concurrent pairing the client can have its answer first."""

        def paired() -> bool:
            p = {r.kv["transfer_id"] for e in self.prefills for r in e.requests if r.kv}
            return all(r.kv["transfer_id"] in p for e in self.decodes for r in e.requests if r.kv and not r.cancelled)

        wait_until(paired, what="prefill legs to arrive")

    def served_pairs(self) -> list[tuple[str, str]]:
        """(prefill, decode) of every disaggregated decode leg that finished, by transfer id."""
        self.settle()
        by_tid = {r.kv["transfer_id"]: e.name for e in self.prefills for r in e.requests if r.kv}
        pairs: list[tuple[float, str, str]] = []
        for e in self.decodes:
            for r in e.requests:
                if r.finished and r.kv:
                    pairs.append((r.at, by_tid[r.kv["transfer_id"]], e.name))
        return [(p, d) for _, p, d in sorted(pairs)]


def only(reqs: list[Received]) -> Received:
    assert len(reqs) == 1, [(r.path, r.body) for r in reqs]
    return reqs[0]
