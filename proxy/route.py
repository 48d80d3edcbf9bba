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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from pdfabric.proxy.instances import Instance
from pdfabric.proxy.legs import LegFailed, Opened, decode_body, new_transfer_id, prefill_body

if TYPE_CHECKING:
    from pdfabric.proxy.server import Proxy

__all__ = ["serve_request"]

log = logging.getLogger("pdfabric.proxy")

_HOP = {"content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding"}


async def serve_request(proxy: "Proxy", request: web.Request, path: str, chat: bool, body: dict[str, Any],
                        stream: bool, tokens: int, hashes: list[bytes]) -> web.StreamResponse:
    from pdfabric.proxy.server import HTTPProblem

    tried: set[str] = set()
    reason = ""
    for _ in range(max(1, proxy.settings.prefill_attempts)):
        choice = proxy.router.choose(proxy.registry.prefills(), proxy.registry.decodes(), tokens, hashes, frozenset(tried))
        if choice is None:
            raise HTTPProblem(503, "no healthy decode instance", "service_unavailable", "no_instance")
        if choice.prefill is None:
            break
        try:
            opened = await _disaggregated(proxy, choice.prefill, choice.decode, path, chat, body, stream, tokens)
        except LegFailed as e:
            reason = _prefill_failed(proxy, e)
            tried.add(e.instance.name)
            continue
        proxy.router.remember(choice.prefill, hashes)
        opened.headers["x-pdfabric-prefill"] = choice.prefill.name
        opened.headers["x-pdfabric-decode"] = choice.decode.name
        return await _respond(proxy, request, opened, stream)
    else:
        choice = proxy.router.choose([], proxy.registry.decodes(), tokens, hashes)
        if choice is None:
            raise HTTPProblem(503, "no healthy decode instance", "service_unavailable", "no_instance")
    if reason:
        proxy.stats.counters["decode_alone_after_failure"] += 1
        log.warning("pdfabric proxy: decode engine %s serves a request alone (recomputes): %s", choice.decode.name, reason)
    else:
        proxy.stats.counters["decode_alone"] += 1
    opened = await _leg(proxy, choice.decode, tokens, path, body, stream)
    opened.headers["x-pdfabric-decode"] = choice.decode.name
    return await _respond(proxy, request, opened, stream)


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
        from pdfabric.proxy.server import HTTPProblem

        unload()
        if e.down:
            inst.healthy = False
        raise HTTPProblem(502, f"decode instance {e.why}", "upstream_error") from None
    except BaseException:
        unload()
        raise
    opened.release = unload
    proxy.stats.seconds["decode_first_byte"] += time.perf_counter() - t0
    proxy.stats.counters["decode_first_byte_n"] += 1
    inst.served += 1
    return opened


async def _disaggregated(proxy: "Proxy", p: Instance, d: Instance, path: str, chat: bool,
                         body: dict[str, Any], stream: bool, tokens: int) -> Opened:
    tid = new_transfer_id()
    p_body = prefill_body(body, chat, tid)
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
    p_task.add_done_callback(_quiet)
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


def _quiet(t: "asyncio.Task[Any]") -> None:
    if not t.cancelled() and t.exception() is not None:
        log.warning("pdfabric proxy: prefill leg failed after the decode leg answered: %s", t.exception())


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


async def _respond(proxy: "Proxy", request: web.Request, opened: Opened, stream: bool) -> web.StreamResponse:
    resp = opened.resp
    headers = {k: v for k, v in resp.headers if k.lower() not in _HOP}
    headers.update(opened.headers)
    try:
        if not stream or resp.status != 200:
            return web.Response(body=opened.first, status=resp.status, headers=headers)
        out = web.StreamResponse(status=resp.status, headers=headers)
        await out.prepare(request)
        await out.write(opened.first)
        while chunk := await resp.next_piece():
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
