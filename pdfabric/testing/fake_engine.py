"""A fake vLLM OpenAI server, for proxy tests and the proxy benchmark (no model, no GPU).

Serves ``/v1/completions`` and ``/v1/chat/completions`` (JSON shaped like vLLM's, or SSE:
one ``data: {...}`` chunk per output token, then ``data: [DONE]``), ``/v1/responses`` (a
response object, or SSE events: ``response.created``, one ``response.output_text.delta`` per
token, ``response.completed``; like vLLM it reads ``max_output_tokens``, not ``max_tokens``),
``/v1/messages`` (Anthropic's message, or its SSE events; ``max_tokens`` required), ``/health``,
``/v1/models`` and ``POST /tokenize`` (vLLM's shape; a fake tokenization, ``fake_token_ids``:
one token per 4 characters; recorded in ``tokenized``). It records every completion request
it receives (``requests``: path, body with ``kv_transfer_params``, arrival time, and whether
the client hung up before the answer was complete: ``cancelled``). Asked to produce (``{"pdfabric": "produce", "transfer_id":
T}``), a prefill-capable fake answers like pdfabric's connector: ``{"pdfabric": "consume",
"transfer_id": T, "producer": <control>, "num_tokens": N}``.

Faults (``engine.faults``, settable while it runs; for a child process ``POST
/fake/faults`` with the same field names): ``fail_status`` (answer with that HTTP status),
``hang`` (never answer until the client hangs up), ``cut_after`` (close the connection
after that many stream chunks; 0: before any answer), ``unhealthy`` (``/health`` 503),
``first_token_delay_s`` (wait before the first token, or
before failing), ``tokenize_delay_s`` and ``tokenize_status`` (wait before answering
``/tokenize``, answer it with that HTTP status: 404 is an engine without it). ``GET /fake/requests`` lists what a
child process received.

In-process: ``port = await FakeEngine("p0", "prefill").start()`` on the running loop, then
``await engine.stop()``. As a child process::

    python -m pdfabric.testing.fake_engine --port 8100 --role prefill --delay-ms 5 --tokens 16

prints ``fake engine NAME (ROLE) on http://HOST:PORT`` once it listens; SIGTERM stops it.
``--no-record`` keeps no request list (for benchmarks that send millions of requests).
``--journal FILE`` appends one JSON line per completion request as it ends (``engine``,
``role``, the client's ``user`` field, ``transfer_id``, ``outcome``: finished, cancelled or
cut), written with one ``O_APPEND`` write each, so the lines survive the engine being killed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web

__all__ = ["FakeEngine", "Faults", "Received", "fake_token_ids", "main"]

Role = Literal["prefill", "decode", "both"]


@dataclass
class Received:
    """One completion request as the fake saw it."""

    path: str
    body: dict[str, Any]
    at: float  # time.monotonic() on arrival
    cancelled: bool = False  # the client hung up before the answer was complete
    finished: bool = False  # the answer was written completely
    cut: bool = False  # the fake closed the connection itself (fault cut_after)
    headers: dict[str, str] = dataclasses.field(default_factory=dict)  # lower-cased names

    @property
    def kv(self) -> Any:
        return self.body.get("kv_transfer_params")


@dataclass
class Faults:
    fail_status: int | None = None
    hang: bool = False
    cut_after: int | None = None
    unhealthy: bool = False
    first_token_delay_s: float = 0.0
    tokenize_delay_s: float = 0.0
    tokenize_status: int | None = None


class FakeEngine:
    def __init__(self, name: str = "fake", role: Role = "both", *, host: str = "127.0.0.1", port: int = 0,
                 tokens: int = 8, delay_ms: float = 0.0, model: str = "fake-model", control: str | None = None,
                 record: bool = True, journal: str | None = None) -> None:
        self.name, self.role, self.host, self.port = name, role, host, port
        self._journal = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if journal else None
        self.record = record  # False: ``requests`` stays empty (long benchmarks: no growing list)
        self.tokens, self.delay_s, self.model = tokens, delay_ms / 1000.0, model
        self._control = control
        self.faults = Faults()
        self.requests: list[Received] = []
        self.tokenized: list[Received] = []  # POST /tokenize requests
        self.health_checks = 0
        self._runner: web.AppRunner | None = None
        self._n = 0

    # -- lifecycle -----------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def control(self) -> str:
        """The "connector control address" it reports as producer (default: its own host:port)."""
        return self._control or f"{self.host}:{self.port}"

    async def start(self) -> int:
        app = web.Application()
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/responses", self._chat)  # chat-like input; told apart by path
        app.router.add_post("/v1/messages", self._chat)
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_post("/fake/faults", self._set_faults)
        app.router.add_get("/fake/requests", self._list_requests)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port, reuse_address=True).start()
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._journal is not None:
            os.close(self._journal)
            self._journal = None

    def _log(self, rec: Received) -> None:
        if self._journal is None:
            return
        kv = rec.kv if isinstance(rec.kv, dict) else {}
        outcome = "finished" if rec.finished else "cut" if rec.cut else "cancelled"
        line = {"engine": self.name, "role": self.role, "user": rec.body.get("user"),
                "transfer_id": kv.get("transfer_id"), "outcome": outcome, "at": time.time()}
        os.write(self._journal, json.dumps(line).encode() + b"\n")

    # -- what it saw ---------------------------------------------------------------
    def seen(self, path: str | None = None) -> list[Received]:
        return [r for r in list(self.requests) if path is None or r.path == path]

    @property
    def cancelled(self) -> list[Received]:
        return [r for r in list(self.requests) if r.cancelled]

    # -- endpoints -----------------------------------------------------------------
    async def _health(self, _: web.Request) -> web.Response:
        self.health_checks += 1
        return web.json_response({}, status=503 if self.faults.unhealthy else 200)

    async def _models(self, _: web.Request) -> web.Response:
        card = {"id": self.model, "object": "model", "created": int(time.time()), "owned_by": "vllm",
                "root": self.model, "parent": None, "max_model_len": 4096, "permission": []}
        return web.json_response({"object": "list", "data": [card]})

    async def _tokenize(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
        except ValueError:
            return _error(400, "body is not JSON")
        if not isinstance(body, dict) or not isinstance(body.get("prompt", body.get("messages")), (str, list)):
            return _error(400, "expected {model, prompt: str} or {model, messages: [...]}")
        if self.record:
            self.tokenized.append(Received(request.path, body, time.monotonic(), finished=True))
        if self.faults.tokenize_delay_s:
            await asyncio.sleep(self.faults.tokenize_delay_s)
        if self.faults.tokenize_status is not None:
            return _error(self.faults.tokenize_status, f"fake engine {self.name}: injected /tokenize failure")
        tokens = fake_token_ids(_prompt_text(body, "messages" in body))
        return web.json_response({"count": len(tokens), "max_model_len": 4096, "tokens": tokens,
                                  "token_strs": None})

    async def _set_faults(self, request: web.Request) -> web.Response:
        try:
            self.faults = dataclasses.replace(self.faults, **await request.json())
        except (TypeError, ValueError) as e:
            return _error(400, f"expected an object of {[f.name for f in dataclasses.fields(Faults)]}: {e}")
        return web.json_response(dataclasses.asdict(self.faults))

    async def _list_requests(self, _: web.Request) -> web.Response:
        return web.json_response([dataclasses.asdict(r) for r in self.requests])

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=True)

    async def _complete(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            body = json.loads(await request.read())
        except ValueError:
            return _error(400, "body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "body is not a JSON object")
        rec = Received(request.path, body, time.monotonic(), headers={k.lower(): v for k, v in request.headers.items()})
        if self.record:
            self.requests.append(rec)
        try:
            return await self._answer(request, rec, chat)
        except (asyncio.CancelledError, ConnectionError):
            rec.cancelled = not rec.cut  # the client (the proxy's leg) hung up
            raise
        finally:
            self._log(rec)

    async def _answer(self, request: web.Request, rec: Received, chat: bool) -> web.StreamResponse:
        f, body = self.faults, rec.body
        if f.hang:
            await asyncio.get_running_loop().create_future()  # until cancelled
        if f.first_token_delay_s:
            await asyncio.sleep(f.first_token_delay_s)
        if f.fail_status is not None:
            rec.finished = True
            return _error(f.fail_status, f"fake engine {self.name}: injected failure")
        responses = rec.path == "/v1/responses"
        if responses:
            limit = body.get("max_output_tokens")
        else:
            limit = (body.get("max_completion_tokens") if chat else None) or body.get("max_tokens")
        n = max(1, min(limit if isinstance(limit, int) else self.tokens, self.tokens))
        self._n += 1
        kind = {"/v1/responses": "resp", "/v1/messages": "msg"}.get(rec.path, "chatcmpl" if chat else "cmpl")
        rid = f"{kind}-{self.name}-{self._n}"
        usage = {"prompt_tokens": _prompt_tokens(body, chat), "completion_tokens": n}
        usage["total_tokens"] = usage["prompt_tokens"] + n
        kv = self._kv_answer(body, usage["prompt_tokens"])
        head = {"id": rid, "created": int(time.time()), "model": body.get("model", self.model)}
        headers = {"X-Fake-Engine": self.name}
        if f.cut_after == 0:
            return _cut(request, rec, web.Response())
        if responses:
            return await self._respond(request, rec, head, n, usage, kv, headers)
        if kind == "msg":
            return await self._message(request, rec, head, n, usage, kv, headers)
        if body.get("stream"):
            return await self._stream(request, rec, chat, head, n, usage, headers)
        await asyncio.sleep(self.delay_s * n)
        text = "".join(_token(i) for i in range(n))
        if chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text, "tool_calls": []},
                                      "logprobs": None, "finish_reason": "length", "stop_reason": None}
            out = {**head, "object": "chat.completion", "choices": [choice], "usage": usage, "prompt_logprobs": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length", "stop_reason": None,
                      "prompt_logprobs": None}
            out = {**head, "object": "text_completion", "choices": [choice], "usage": usage}
        rec.finished = True
        return web.json_response({**out, "kv_transfer_params": kv}, headers=headers)

    async def _stream(self, request: web.Request, rec: Received, chat: bool, head: dict[str, Any], n: int,
                      usage: dict[str, Any], headers: dict[str, str]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        obj = "chat.completion.chunk" if chat else "text_completion"
        for i in range(n):
            await asyncio.sleep(self.delay_s)
            if self.faults.cut_after is not None and i >= self.faults.cut_after:
                return _cut(request, rec, resp)
            fin = "length" if i == n - 1 else None
            if chat:
                delta = {"role": "assistant", "content": _token(i)} if i == 0 else {"content": _token(i)}
                choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": fin}
            else:
                choice = {"index": 0, "text": _token(i), "logprobs": None, "finish_reason": fin, "stop_reason": None}
            await resp.write(_sse({**head, "object": obj, "choices": [choice]}))
        opts = rec.body.get("stream_options")
        if isinstance(opts, dict) and opts.get("include_usage"):
            await resp.write(_sse({**head, "object": obj, "choices": [], "usage": usage}))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        rec.finished = True
        return resp

    async def _respond(self, request: web.Request, rec: Received, head: dict[str, Any], n: int,
                       usage: dict[str, Any], kv: dict[str, Any] | None, headers: dict[str, str]) -> web.StreamResponse:
        """A Responses API answer (vLLM's shape, trimmed): JSON, or SSE events."""
        text = "".join(_token(i) for i in range(n))

        def response(status: str, out: str) -> dict[str, Any]:
            item = {"type": "message", "id": f"msg-{head['id']}", "role": "assistant", "status": status,
                    "content": [{"type": "output_text", "text": out, "annotations": []}]}
            return {"id": head["id"], "object": "response", "created_at": head["created"], "model": head["model"],
                    "status": status, "output": [item] if out else [], "parallel_tool_calls": True, "tools": [],
                    "tool_choice": "auto", "usage": {"input_tokens": usage["prompt_tokens"], "output_tokens": n,
                                                     "total_tokens": usage["total_tokens"]}, "kv_transfer_params": kv}

        if not rec.body.get("stream"):
            await asyncio.sleep(self.delay_s * n)
            rec.finished = True
            return web.json_response(response("completed", text), headers=headers)
        resp = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        await resp.write(_event("response.created", {"response": response("in_progress", "")}, 0))
        for i in range(n):
            await asyncio.sleep(self.delay_s)
            if self.faults.cut_after is not None and i >= self.faults.cut_after:
                return _cut(request, rec, resp)
            delta = {"item_id": f"msg-{head['id']}", "output_index": 0, "content_index": 0, "delta": _token(i),
                     "logprobs": []}
            await resp.write(_event("response.output_text.delta", delta, i + 1))
        await resp.write(_event("response.completed", {"response": response("completed", text)}, n + 1))
        await resp.write_eof()
        rec.finished = True
        return resp

    async def _message(self, request: web.Request, rec: Received, head: dict[str, Any], n: int,
                       usage: dict[str, Any], kv: dict[str, Any] | None, headers: dict[str, str]) -> web.StreamResponse:
        """An Anthropic Messages API answer (vLLM's shape, trimmed): JSON, or SSE events."""
        text = "".join(_token(i) for i in range(n))
        msg = {"id": head["id"], "type": "message", "role": "assistant", "model": head["model"],
               "content": [{"type": "text", "text": text}], "stop_reason": "max_tokens", "stop_sequence": None,
               "usage": {"input_tokens": usage["prompt_tokens"], "output_tokens": n}, "kv_transfer_params": kv}
        if not rec.body.get("stream"):
            await asyncio.sleep(self.delay_s * n)
            rec.finished = True
            return web.json_response(msg, headers=headers)
        resp = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        start = {**msg, "content": [], "stop_reason": None, "usage": {**msg["usage"], "output_tokens": 0}}
        await resp.write(_anthropic("message_start", {"message": start}))
        await resp.write(_anthropic("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}))
        for i in range(n):
            await asyncio.sleep(self.delay_s)
            if self.faults.cut_after is not None and i >= self.faults.cut_after:
                return _cut(request, rec, resp)
            delta = {"index": 0, "delta": {"type": "text_delta", "text": _token(i)}}
            await resp.write(_anthropic("content_block_delta", delta))
        await resp.write(_anthropic("content_block_stop", {"index": 0}))
        await resp.write(_anthropic("message_delta", {"delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                                                      "usage": {"output_tokens": n}}))
        await resp.write(_anthropic("message_stop", {}))
        await resp.write_eof()
        rec.finished = True
        return resp

    def _kv_answer(self, body: dict[str, Any], prompt_tokens: int) -> dict[str, Any] | None:
        kv = body.get("kv_transfer_params")
        if self.role == "decode" or not isinstance(kv, dict) or kv.get("pdfabric") != "produce":
            return None
        return {"pdfabric": "consume", "transfer_id": kv.get("transfer_id"), "producer": self.control,
                "num_tokens": prompt_tokens}


def _token(i: int) -> str:
    return f" tok{i}"


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _anthropic(kind: str, fields: dict[str, Any]) -> bytes:
    """One Anthropic Messages stream event."""
    return f"event: {kind}\n".encode() + _sse({"type": kind, **fields})


def _event(kind: str, fields: dict[str, Any], seq: int) -> bytes:
    """One Responses API stream event."""
    data = {"type": kind, "sequence_number": seq, **fields}
    return f"event: {kind}\n".encode() + _sse(data)


def _cut(request: web.Request, rec: Received, resp: web.StreamResponse) -> web.StreamResponse:
    rec.cut = True
    if request.transport is not None:
        request.transport.abort()
    return resp


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"object": "error", "message": message, "type": "BadRequestError" if status < 500
                              else "InternalServerError", "param": None, "code": status}, status=status)


def fake_token_ids(text: str) -> list[int]:
    """The fake's tokenization: one token per 4 characters (the last takes the rest; at least
    one), each a hash of its characters - deterministic, like a real tokenizer's."""
    n = max(1, len(text) // 4)
    out = []
    for i in range(n):
        piece = text[4 * i: 4 * i + 4] if i < n - 1 else text[4 * i:]
        digest = hashlib.blake2b(piece.encode("utf-8", "surrogatepass"), digest_size=4).digest()
        out.append(int.from_bytes(digest, "little") % 50_000)
    return out


def _prompt_text(body: dict[str, Any], chat: bool) -> str:
    if "input" in body:  # Responses API
        items = body["input"] if isinstance(body["input"], list) else [body["input"]]
        return "".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in items)
    if chat:
        msgs = body.get("messages")
        return "".join(str(m.get("content", "")) for m in msgs if isinstance(m, dict)) if isinstance(msgs, list) else ""
    prompt = body.get("prompt")
    return prompt[0] if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str) else str(prompt)


def _prompt_tokens(body: dict[str, Any], chat: bool) -> int:
    prompt = body.get("prompt")
    if not chat and isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return max(1, len(prompt))
    return max(1, len(_prompt_text(body, chat)) // 4)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pdfabric.testing.fake_engine", description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    ap.add_argument("--role", choices=["prefill", "decode", "both"], default="both")
    ap.add_argument("--name", default=None)
    ap.add_argument("--delay-ms", type=float, default=0.0, help="time per output token")
    ap.add_argument("--first-token-ms", type=float, default=0.0, help="extra wait before the first token")
    ap.add_argument("--tokens", type=int, default=8, help="output tokens (at most; max_tokens caps it)")
    ap.add_argument("--model", default="fake-model")
    ap.add_argument("--control", default=None, help="producer address to report (default: host:port)")
    ap.add_argument("--no-record", action="store_true", help="keep no list of requests (GET /fake/requests: [])")
    ap.add_argument("--journal", metavar="FILE", help="append one JSON line per request as it ends")
    args = ap.parse_args(argv)
    import uvloop

    return uvloop.run(_serve(args))


async def _serve(args: argparse.Namespace) -> int:
    eng = FakeEngine(args.name or f"fake-{args.role}", args.role, host=args.host, port=args.port,
                     tokens=args.tokens, delay_ms=args.delay_ms, model=args.model, control=args.control,
                     record=not args.no_record, journal=args.journal)
    eng.faults.first_token_delay_s = args.first_token_ms / 1000.0
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    port = await eng.start()
    print(f"fake engine {eng.name} ({eng.role}) on http://{args.host}:{port}", flush=True)
    await stop.wait()
    await eng.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
