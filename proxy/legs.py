"""The two legs of a disaggregated request, and the helpers that talk to engines.

``Upstream`` sends the legs with a lean keep-alive HTTP/1.1 client (``pdfabric.proxy.http1``)
and keeps an aiohttp session for health probes and ``/v1/models``.
A leg that fails raises ``LegFailed`` naming the instance and why; the request path then
retries on another prefill engine or sends the request to the decode engine alone.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import aiohttp
import msgspec

from pdfabric.proxy.http1 import Client, Response
from pdfabric.proxy.instances import Instance

__all__ = ["LegFailed", "Upstream", "prefill_body", "decode_body", "new_transfer_id", "Opened", "encode_json",
           "decode_json", "COMPLETIONS", "CHAT", "RESPONSES", "MESSAGES"]

# the generation endpoints the proxy disaggregates (MESSAGES: vLLM's Anthropic Messages API)
COMPLETIONS, CHAT, RESPONSES, MESSAGES = "/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/messages"

_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder()


def encode_json(obj: Any) -> bytes:
    """JSON bytes (msgspec: the hot path; the json module for what msgspec cannot encode)."""
    try:
        return _ENCODER.encode(obj)
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError):  # ValueError: lone surrogates
        return json.dumps(obj).encode()


def decode_json(raw: bytes) -> Any:
    """Parsed JSON; what msgspec refuses goes to the json module, so errors are json.loads's
    (ValueError, UnicodeDecodeError). NaN and Infinity are refused: they are not JSON, and
    msgspec would forward them as null."""
    try:
        return _DECODER.decode(raw)
    except msgspec.DecodeError:
        return json.loads(raw, parse_constant=_not_json)


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


# headers of the client's request passed on to both legs (tracing and request ids), set per
# request by the route (a context variable: the legs' tasks inherit it)
FORWARDED = ("x-request-id", "traceparent", "tracestate", "baggage")
forward_headers: contextvars.ContextVar[bytes] = contextvars.ContextVar("forward_headers", default=b"")


def forwarded(headers: Any) -> bytes:
    """The header lines to pass on from a client's request headers (a multidict)."""
    out = b""
    for name in FORWARDED:
        value = headers.get(name)
        if value is not None and "\r" not in value and "\n" not in value:
            out += name.encode() + b": " + value.encode("latin-1", "replace") + b"\r\n"
    return out


class LegFailed(Exception):
    def __init__(self, instance: Instance, why: str, *, down: bool = False, timed_out: bool = False) -> None:
        super().__init__(f"{instance.name}: {why}")
        self.instance = instance
        self.why = why
        self.down = down  # the engine is unreachable (not just this request failing)
        self.timed_out = timed_out  # silent past the leg timeout (it may still be working)


def new_transfer_id() -> str:
    return "px-" + os.urandom(16).hex()  # 128 random bits, like uuid4().hex without building a UUID


def prefill_body(body: dict[str, Any], path: str, tid: str) -> dict[str, Any]:
    """The prefill leg's request: the client's, answered with one token and without
    streaming, asking the engine's connector to produce the KV for ``tid``."""
    out = {k: v for k, v in body.items() if k not in ("stream_options", "n", "best_of")}
    out.update(stream=False, kv_transfer_params={"pdfabric": "produce", "transfer_id": tid})
    if path == RESPONSES:
        out.update(max_output_tokens=1, store=False)  # its one-token answer is never kept
    else:
        out["max_tokens"] = 1
    if path == CHAT:
        out["max_completion_tokens"] = 1
    thinking = out.get("thinking")
    if path == MESSAGES and isinstance(thinking, dict) and thinking.get("type") == "enabled":
        # a thinking budget only bounds sampling (the prompt renders the same without it),
        # and vLLM refuses a budget that is not under max_tokens, which is 1 here
        del out["thinking"]
    return out


def decode_body(body: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    return {**body, "kv_transfer_params": params}


def _nothing() -> None:
    pass


@dataclass
class Opened:
    """A decode leg whose response headers (and first bytes when streaming) arrived."""

    resp: Response
    first: bytes  # first chunk (stream) or the whole body (non-stream)
    release: Callable[[], None] = _nothing  # gives the leg's load back once the answer is written
    prefill: asyncio.Task[Any] | None = None  # the pair's prefill leg, when still open
    headers: dict[str, str] = field(default_factory=dict)  # x-pdfabric-* for the client


class Upstream:
    def __init__(self, leg_timeout_s: float, connect_timeout_s: float = 5.0) -> None:
        # the leg timeout bounds silence (waiting for the answer, or between stream chunks),
        # not a whole answer: a long generation that keeps streaming is never cut
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s, sock_read=leg_timeout_s)
        self._session: aiohttp.ClientSession | None = None  # probes and /v1/models
        self.http = Client(leg_timeout_s, connect_timeout_s)  # the legs: the hot path

    async def start(self) -> None:
        conn = aiohttp.TCPConnector(limit=0, keepalive_timeout=60, ttl_dns_cache=300)
        # identity: bytes pass through untouched, and content-encoding is not forwarded
        self._session = aiohttp.ClientSession(connector=conn, timeout=self._timeout, auto_decompress=False,
                                              skip_auto_headers=("User-Agent",),
                                              headers={"Accept-Encoding": "identity"})

    async def close(self) -> None:
        self.http.close()
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "Upstream.start() first"
        return self._session

    async def post_json(self, inst: Instance, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """A non-streaming leg (the prefill leg): the engine's JSON answer or ``LegFailed``."""
        try:
            resp = await self.http.post(inst.url, path, encode_json(body), forward_headers.get())
            data = await resp.read()
            if resp.status != 200:
                raise LegFailed(inst, f"HTTP {resp.status}: {data[:300].decode(errors='replace')}")
            answer = decode_json(data)
            if not isinstance(answer, dict):
                raise ValueError(f"expected a JSON object, got {type(answer).__name__}")
            return answer
        except asyncio.TimeoutError:  # first: it is an OSError
            raise LegFailed(inst, "timed out", timed_out=True) from None
        except OSError as e:
            raise LegFailed(inst, f"unreachable: {e}", down=True) from None
        except ValueError as e:  # cut in the middle, not JSON
            raise LegFailed(inst, f"bad answer: {e}") from None

    async def open(self, inst: Instance, path: str, body: dict[str, Any], stream: bool) -> Opened:
        """Start a leg whose answer goes to the client: headers plus its first bytes."""
        try:
            resp = await self.http.post(inst.url, path, encode_json(body), forward_headers.get())
        except asyncio.TimeoutError:  # first: see post_json
            raise LegFailed(inst, "timed out", timed_out=True) from None
        except OSError as e:
            raise LegFailed(inst, f"unreachable: {e}", down=True) from None
        except ValueError as e:  # its headers cut short
            raise LegFailed(inst, f"bad answer: {e}") from None
        try:
            first = await (resp.next_piece() if stream and resp.status == 200 else resp.read())
        except BaseException as e:
            resp.close()
            if isinstance(e, asyncio.TimeoutError):
                raise LegFailed(inst, "timed out", timed_out=True) from None
            if isinstance(e, (ValueError, OSError)):
                raise LegFailed(inst, f"answer cut: {e!r}") from None
            raise
        return Opened(resp, first)
