"""The two legs of a disaggregated request, and the helpers that talk to engines.

``Upstream`` owns one pooled aiohttp session (keep-alive, TCP_NODELAY) for every engine.
A leg that fails raises ``LegFailed`` naming the instance and why; the request path then
retries on another prefill engine or sends the request to the decode engine alone.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import aiohttp

from pdfabric.proxy.instances import Instance

__all__ = ["LegFailed", "Upstream", "prefill_body", "decode_body", "new_transfer_id", "Opened"]


class LegFailed(Exception):
    def __init__(self, instance: Instance, why: str, *, down: bool = False) -> None:
        super().__init__(f"{instance.name}: {why}")
        self.instance = instance
        self.why = why
        self.down = down  # the engine is unreachable (not just this request failing)


def new_transfer_id() -> str:
    return f"px-{uuid.uuid4().hex}"


def prefill_body(body: dict[str, Any], chat: bool, tid: str) -> dict[str, Any]:
    out = {k: v for k, v in body.items() if k not in ("stream_options", "n", "best_of")}
    out.update(stream=False, max_tokens=1, kv_transfer_params={"pdfabric": "produce", "transfer_id": tid})
    if chat:
        out["max_completion_tokens"] = 1
    return out


def decode_body(body: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    return {**body, "kv_transfer_params": params}


def _nothing() -> None:
    pass


@dataclass
class Opened:
    """A decode leg whose response headers (and first bytes when streaming) arrived."""

    resp: aiohttp.ClientResponse
    first: bytes  # first chunk (stream) or the whole body (non-stream)
    release: Callable[[], None] = _nothing  # gives the leg's load back once the answer is written
    prefill: asyncio.Task[Any] | None = None  # the pair's prefill leg, when still open
    headers: dict[str, str] = field(default_factory=dict)  # x-pdfabric-* for the client


class Upstream:
    def __init__(self, leg_timeout_s: float, connect_timeout_s: float = 5.0) -> None:
        # the leg timeout bounds silence (waiting for the answer, or between stream chunks),
        # not a whole answer: a long generation that keeps streaming is never cut
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s, sock_read=leg_timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        conn = aiohttp.TCPConnector(limit=0, keepalive_timeout=60, ttl_dns_cache=300)
        # identity: bytes pass through untouched, and content-encoding is not forwarded
        self._session = aiohttp.ClientSession(connector=conn, timeout=self._timeout, auto_decompress=False,
                                              skip_auto_headers=("User-Agent",),
                                              headers={"Accept-Encoding": "identity"})

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "Upstream.start() first"
        return self._session

    async def post_json(self, inst: Instance, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """A non-streaming leg (the prefill leg): the engine's JSON answer or ``LegFailed``."""
        try:
            async with self.session.post(inst.url + path, json=body) as resp:
                data = await resp.read()
                if resp.status != 200:
                    raise LegFailed(inst, f"HTTP {resp.status}: {data[:300].decode(errors='replace')}")
                return await resp.json(content_type=None)
        except asyncio.TimeoutError:  # first: it is an OSError (and aiohttp's a ClientConnectionError)
            raise LegFailed(inst, "timed out") from None
        except (aiohttp.ClientConnectionError, OSError) as e:
            raise LegFailed(inst, f"unreachable: {e}", down=True) from None
        except (aiohttp.ClientError, ValueError) as e:
            raise LegFailed(inst, f"bad answer: {e}") from None

    async def open(self, inst: Instance, path: str, body: dict[str, Any], stream: bool) -> Opened:
        """Start a leg whose answer goes to the client: headers plus its first bytes."""
        try:
            resp = await self.session.post(inst.url + path, json=body)
        except asyncio.TimeoutError:  # first: see post_json
            raise LegFailed(inst, "timed out") from None
        except (aiohttp.ClientConnectionError, OSError) as e:
            raise LegFailed(inst, f"unreachable: {e}", down=True) from None
        try:
            first = await (resp.content.readany() if stream and resp.status == 200 else resp.read())
        except BaseException as e:
            resp.close()
            if isinstance(e, (aiohttp.ClientError, asyncio.TimeoutError, OSError)):
                raise LegFailed(inst, f"answer cut: {e!r}") from None
            raise
        return Opened(resp, first)
