"""One client request through the proxy: choose, send the legs, retry, stream back.

Rules:

1. Nothing is written to the client before the decode leg produced its first bytes, so
   until then a failed prefill leg can be retried elsewhere without the client noticing.
2. A prefill leg that fails (unreachable, HTTP error, timeout) before that point cancels the
   decode leg (closing its connection: the engine aborts it) and the request is tried with
   the next prefill engine; after ``prefill_attempts`` the decode engine serves it alone and
   recomputes the prompt - counted (``decode_alone``) and logged with the reason.
3. A client that hangs up cancels every leg still open.
4. Load counters (in-flight requests and prompt tokens) are taken before a leg starts and
   given back in ``finally``.
5. A decode leg that fails before its answer's first bytes (unreachable, cut, HTTP-level
   failure of the connection) is retried with a new pair on another decode engine, up to
   ``decode_attempts`` in all; a timed-out one is not (504): its engine may still be busy.
   Nothing is sent twice to an engine that answered: only legs that failed are retried.
6. A stream that breaks after bytes reached the client ends with an SSE error event and no
   ``[DONE]`` (counted in ``streams_broken``), never a silent truncation. On ``/v1/messages``
   it is Anthropic's ``event: error`` (its clients skip events they do not know); on
   ``/v1/responses`` the Responses API's ``event: error`` (with ``error`` too).
7. With a cache server, the shared KV cache is asked first (``cache_view.py``): a prompt it
   holds all but a short rest of goes to a decode engine alone (``decode_alone_cached``),
   its exact token count replaces the estimate, and ``x-pdfabric-cached-tokens`` tells the
   client what was found. A lookup that fails changes nothing. Responses and Messages API
   requests are not looked up: the engine renders their input (instructions, system, items)
   itself.
8. With no healthy prefill engine at all, a prompt long enough to disaggregate is served by
   a decode engine alone: counted (``decode_alone_no_prefill``) and logged (once, then at
   most every ``_NO_PREFILL_LOG_S`` seconds with the count since), never silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from pdfabric.proxy.instances import Instance
from pdfabric.proxy.legs import (MESSAGES, RESPONSES, LegFailed, Opened, decode_body, encode_json,
                                 forward_headers, forwarded, new_transfer_id, prefill_body)

if TYPE_CHECKING:
    from pdfabric.proxy.server import Proxy

__all__ = ["serve_request"]

log = logging.getLogger("pdfabric.proxy")

_HOP = {"content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding"}


async def serve_request(proxy: "Proxy", request: web.Request, path: str, chat: bool, body: dict[str, Any],
                        stream: bool, tokens: int, hashes: list[bytes]) -> web.StreamResponse:
    from pdfabric.proxy.server import HTTPProblem

    settings = proxy.settings
    forward_headers.set(forwarded(request.headers))  # set every time: a keep-alive connection's next
    # request may run in the same context
    looked = None  # Rule 7
    if proxy.cache is not None and path not in (RESPONSES, MESSAGES):
        looked = await proxy.cache.look(proxy, body, chat, tokens)
    if looked is not None:
        tokens = looked.prompt_tokens
    alone = looked is not None and looked.alone
    tried: set[str] = set()  # instances (either role) that failed this request
    reason = decode_why = ""  # why the last prefill / decode leg failed
    prefill_tries = decode_failures = 0
    while True:
        more = not alone and prefill_tries < max(1, settings.prefill_attempts)
        prefills = proxy.registry.prefills() if more else []
        choice = proxy.router.choose(prefills, proxy.registry.decodes(), tokens, hashes, frozenset(tried))
        if choice is None:
            if decode_failures:
                raise HTTPProblem(502, f"no decode instance could answer: {decode_why}", "upstream_error")
            raise HTTPProblem(503, "no healthy decode instance", "service_unavailable", "no_instance")
        try:
            if choice.prefill is not None:
                try:
                    opened = await _disaggregated(proxy, choice.prefill, choice.decode, path, body, stream, tokens)
                except LegFailed as e:
                    reason = _prefill_failed(proxy, e)
                    tried.add(e.instance.name)
                    prefill_tries += 1
                    continue
                proxy.router.remember(choice.prefill, hashes)
                opened.headers["x-pdfabric-prefill"] = choice.prefill.name
            else:
                opened = await _leg(proxy, choice.decode, tokens, path, body, stream)
                _decode_alone(proxy, choice.decode.name, tokens, reason, alone, not prefills)
        except _DecodeFailed as e:  # Rule 5: nothing reached the client yet
            decode_failures += 1
            decode_why = f"{e.instance.name} {e.why}"
            tried.add(e.instance.name)
            proxy.stats.counters["decode_failures"] += 1
            e.instance.failures += 1
            e.instance.last_error = e.why
            if e.timed_out:
                raise HTTPProblem(504, f"decode instance {decode_why}", "upstream_error") from None
            if decode_failures >= max(1, settings.decode_attempts):
                raise HTTPProblem(502, f"decode instance {decode_why}", "upstream_error") from None
            log.warning("pdfabric proxy: decode leg on %s failed before answering: %s; retrying elsewhere",
                        e.instance.name, e.why)
            continue
        opened.headers["x-pdfabric-decode"] = choice.decode.name
        if looked is not None:
            opened.headers["x-pdfabric-cached-tokens"] = str(looked.cached_tokens)
        return await _respond(proxy, request, opened, stream, path)


class _DecodeFailed(Exception):
    """A decode leg that failed before any byte of its answer reached the client."""

    def __init__(self, e: LegFailed) -> None:
        super().__init__(str(e))
        self.instance, self.why, self.timed_out = e.instance, e.why, e.timed_out


_NO_PREFILL_LOG_S = 30.0


def _decode_alone(proxy: "Proxy", decode: str, tokens: int, reason: str, cached: bool, no_prefill: bool) -> None:
    """Count a request its decode engine serves alone; log it where it recomputes for want
    of a prefill engine (Rules 2 and 8)."""
    c = proxy.stats.counters
    if reason:
        c["decode_alone_after_failure"] += 1
        log.warning("pdfabric proxy: decode engine %s serves a request alone (recomputes): %s", decode, reason)
    elif not cached and no_prefill and tokens >= proxy.settings.disaggregate_min_tokens:
        _no_prefill(proxy, decode, tokens)
    else:
        c["decode_alone_cached" if cached else "decode_alone"] += 1


def _no_prefill(proxy: "Proxy", decode: str, tokens: int) -> None:
    """Rule 8."""
    c = proxy.stats.counters
    c["decode_alone_no_prefill"] += 1
    now = time.monotonic()
    last = proxy.no_prefill_logged
    if last is None or now - last[0] >= _NO_PREFILL_LOG_S:
        since = c["decode_alone_no_prefill"] - (last[1] if last else 0)
        log.warning("pdfabric proxy: no prefill instance is available (healthy and not draining): decode engine %s "
                    "serves a %d-token prompt alone (recomputes)%s", decode, tokens,
                    f"; {since} such requests since the last report" if last else "")
        proxy.no_prefill_logged = (now, c["decode_alone_no_prefill"])


def _prefill_failed(proxy: "Proxy", e: LegFailed) -> str:
    proxy.stats.counters["prefill_failures"] += 1
    e.instance.failures += 1
    e.instance.last_error = e.why
    if e.down:
        e.instance.healthy = False
    log.warning("pdfabric proxy: prefill leg on %s failed: %s; retrying elsewhere", e.instance.name, e.why)
    return f"prefill {e.instance.name} failed: {e.why}"


async def _leg(proxy: "Proxy", inst: Instance, tokens: int, path: str, body: dict[str, Any], stream: bool) -> Opened:
    inst.in_flight += 1
    inst.in_flight_tokens += tokens

    def unload() -> None:  # Rule 4: the decode leg is in flight until its answer is written
        inst.in_flight -= 1
        inst.in_flight_tokens -= tokens

    t0 = time.perf_counter()
    try:
        opened = await proxy.upstream.open(inst, path, body, stream)
    except LegFailed as e:
        unload()
        if e.down:
            inst.healthy = False
        raise _DecodeFailed(e) from None
    except BaseException:
        unload()
        raise
    opened.release = unload
    proxy.stats.seconds["decode_first_byte"] += time.perf_counter() - t0
    proxy.stats.counters["decode_first_byte_n"] += 1
    inst.served += 1
    return opened


async def _disaggregated(proxy: "Proxy", p: Instance, d: Instance, path: str, body: dict[str, Any], stream: bool,
                         tokens: int) -> Opened:
    tid = new_transfer_id()
    p_body = prefill_body(body, path, tid)
    if proxy.settings.pairing == "sequential":
        answer = await _prefill(proxy, p, path, p_body, tokens)
        params = answer.get("kv_transfer_params")
        if not isinstance(params, dict):
            raise LegFailed(p, "its answer carries no kv_transfer_params (is the pdfabric connector loaded?)")
        opened = await _leg(proxy, d, tokens, path, decode_body(body, params), stream)
        opened.headers["x-pdfabric-transfer-id"] = str(params.get("transfer_id", tid))
        return opened
    assert p.control is not None
    d_params = {"pdfabric": "consume", "transfer_id": tid, "producer": p.control}
    p_task = asyncio.create_task(_prefill(proxy, p, path, p_body, tokens))
    d_task = asyncio.create_task(_leg(proxy, d, tokens, path, decode_body(body, d_params), stream))
    try:
        await _first_done(p_task, d_task)
        if p_task.done() and p_task.exception() is not None and not d_task.done():
            d_task.cancel()  # Rule 2: its connection closes and the engine aborts it
            with contextlib.suppress(BaseException):
                await d_task
            raise p_task.exception()  # type: ignore[misc]
        opened = await d_task
    except BaseException:
        p_task.cancel()
        d_task.cancel()
        if d_task.done() and not d_task.cancelled() and d_task.exception() is None:
            d_task.result().release()  # it opened just as this request was cancelled
            d_task.result().resp.close()
        raise
    p_task.add_done_callback(_late_failure(proxy))
    if not p_task.done():
        opened.prefill = p_task  # Rule 3: still open; cancelled if the client hangs up
    opened.headers["x-pdfabric-transfer-id"] = tid
    return opened


async def _first_done(a: "asyncio.Task[Any]", b: "asyncio.Task[Any]") -> None:
    """Until one of the two tasks is done (``asyncio.wait(FIRST_COMPLETED)``, lighter)."""
    waiter = asyncio.get_running_loop().create_future()

    def wake(_: "asyncio.Task[Any]") -> None:
        if not waiter.done():
            waiter.set_result(None)

    a.add_done_callback(wake)
    b.add_done_callback(wake)
    try:
        await waiter
    finally:
        a.remove_done_callback(wake)
        b.remove_done_callback(wake)


def _late_failure(proxy: "Proxy") -> Any:
    def done(t: "asyncio.Task[Any]") -> None:
        if not t.cancelled() and t.exception() is not None:
            # the decode engine answers anyway (it recomputes when the KV never came): counted
            proxy.stats.counters["prefill_failures_late"] += 1
            log.warning("pdfabric proxy: prefill leg failed after the decode leg answered: %s", t.exception())

    return done


async def _prefill(proxy: "Proxy", p: Instance, path: str, body: dict[str, Any], tokens: int) -> dict[str, Any]:
    p.in_flight += 1
    p.in_flight_tokens += tokens
    t0 = time.perf_counter()
    try:
        return await proxy.upstream.post_json(p, path, body)
    finally:
        p.in_flight -= 1
        p.in_flight_tokens -= tokens
        proxy.stats.seconds["prefill"] += time.perf_counter() - t0
        proxy.stats.counters["prefill_n"] += 1


async def _respond(proxy: "Proxy", request: web.Request, opened: Opened, stream: bool,
                   path: str) -> web.StreamResponse:
    resp = opened.resp
    headers = {k: v for k, v in resp.headers if k.lower() not in _HOP}
    headers.update(opened.headers)
    try:
        if not stream or resp.status != 200:
            return web.Response(body=opened.first, status=resp.status, headers=headers)
        out = web.StreamResponse(status=resp.status, headers=headers)
        await out.prepare(request)
        await out.write(opened.first)
        while True:
            try:
                chunk = await resp.next_piece()
            except (ValueError, OSError, asyncio.TimeoutError) as e:  # the engine, not the client
                await _stream_broken(proxy, out, opened, e, path)
                return out
            if not chunk:
                break
            await out.write(chunk)
        await out.write_eof()
        return out
    except BaseException:
        if opened.prefill is not None:
            opened.prefill.cancel()  # Rule 3: the client hung up (or the stream broke)
        raise
    finally:
        opened.release()
        resp.close()  # the connection goes back to the pool if the answer was read to its end


async def _stream_broken(proxy: "Proxy", out: web.StreamResponse, opened: Opened, e: BaseException,
                         path: str) -> None:
    """Rule 6: the decode engine stopped in the middle of a stream the client is reading. The
    answer cannot be retried (the client has part of it), so it ends with an error event and
    without ``[DONE]``: the client learns the answer is incomplete (the openai client raises)."""
    name = opened.headers.get("x-pdfabric-decode", "?")
    why = "timed out" if isinstance(e, asyncio.TimeoutError) else f"stopped mid-answer: {e!r}"
    proxy.stats.counters["streams_broken"] += 1
    log.warning("pdfabric proxy: the stream from decode instance %s broke: %s", name, why)
    if opened.prefill is not None:
        opened.prefill.cancel()
    message = f"decode instance {name} {why}; the answer is incomplete"
    error = {"message": message, "type": "upstream_error", "code": 502}
    if path == MESSAGES:
        event = b"event: error\ndata: " + encode_json({"type": "error", "error": {"type": "api_error",
                                                                              "message": message}})
    elif path == RESPONSES:
        # the Responses API's error event (typed clients read type/code/message); "error" as
        # well, which the openai python client raises on
        event = b"event: error\ndata: " + encode_json({"type": "error", "code": "upstream_error", "message": message,
                                                       "param": None, "error": error})
    else:
        event = b"data: " + encode_json({"error": error})
    with contextlib.suppress(ConnectionError, RuntimeError):  # the client may be gone as well
        # a blank line first ends an event the engine may have left half written
        await out.write(b"\n\n" + event + b"\n\n")
        await out.write_eof()
