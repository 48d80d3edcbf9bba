"""The routing proxy: an OpenAI-compatible front that pairs each request with a prefill
and a decode engine (aiohttp on uvloop).

Endpoints: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/responses`` and the Anthropic
``/v1/messages`` (streaming passed through chunk by chunk, or not), ``/v1/models``,
``/v1/messages/count_tokens``, ``/tokenize`` and ``/detokenize`` (answered by one engine), ``/health`` (200 once a decode engine is healthy, else 503),
``/live`` (200 while the proxy serves HTTP), ``/metrics`` and the admin API
``/admin/instances`` (GET list, POST add), ``/admin/instances/{name}/drain`` and
``/undrain`` (POST), ``/admin/instances/{name}`` (DELETE); with ``state_file`` the admin
changes survive a restart (``instances.save_state``).

One request: choose (prefill, decode) with the policy; send both legs at once with a shared
transfer id (``concurrent``) or the prefill leg first (``sequential``); if the prefill leg
fails before the decode leg produced anything, cancel the decode leg and retry with another
prefill engine, then with the decode engine alone (it recomputes; counted and logged). A
client that hangs up cancels both legs, which makes the engines abort the request.

With a cache server (``cache_address``), a request whose prompt the shared KV cache holds
all but a short rest of goes to a decode engine alone (``pdfabric.proxy.cache_view``).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from aiohttp import web

from pdfabric.proxy.instances import Instance, Registry, UnknownInstance, host_port_problem, save_state, url_problem
from pdfabric.proxy.legs import CHAT, COMPLETIONS, FORWARDED, MESSAGES, RESPONSES, Upstream, decode_json
from pdfabric.proxy.policy import Router, chunk_hashes, estimate_tokens

if TYPE_CHECKING:
    from pdfabric.proxy.cache_view import CacheView

__all__ = ["ProxySettings", "Proxy", "HTTPProblem"]

log = logging.getLogger("pdfabric.proxy")


@dataclass(frozen=True)
class ProxySettings:
    host: str = "127.0.0.1"
    port: int = 8000
    policy: Literal["round_robin", "least_loaded", "prefix_aware"] = "round_robin"
    pairing: Literal["concurrent", "sequential"] = "concurrent"
    disaggregate_min_tokens: int = 0
    leg_timeout_s: float = 600.0
    max_body: int = 8 * 1024 * 1024
    api_keys: tuple[str, ...] = ()
    health_interval_s: float = 2.0
    prefill_attempts: int = 2
    decode_attempts: int = 2  # decode legs tried per request (route.py Rule 5)
    model: str | None = None  # served model name for /v1/models (None: ask an engine)
    # the shared KV cache (cache_view.py): its server's engine port, host:port (None: no lookups),
    # its HTTP port (None: port + 1), the rest a decode engine computes alone, the lookup deadline
    cache_address: str | None = None
    cache_http_port: int | None = None
    cache_local_tokens: int = 256
    cache_timeout_s: float = 0.2
    state_file: str | None = None  # where admin changes are kept (instances.save_state); None: nowhere
    state_basis: str = ""  # instances.basis_of the instances it was started with


class HTTPProblem(Exception):
    """An error answered to the client as an OpenAI-style JSON body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code

    def response(self, anthropic: bool = False) -> web.Response:
        """OpenAI's error shape; Anthropic's (``{"type": "error", "error": ...}``) on its API."""
        if anthropic:
            kinds = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                     413: "request_too_large", 429: "rate_limit_error", 504: "timeout_error", 529: "overloaded_error"}
            kind = kinds.get(self.status, "invalid_request_error" if self.status < 500 else "api_error")
            return web.json_response({"type": "error", "error": {"type": kind, "message": self.message}},
                                     status=self.status)
        body = {"error": {"message": self.message, "type": self.kind, "code": self.code or self.status}}
        return web.json_response(body, status=self.status)


@dataclass
class _Stats:
    counters: Counter[str] = field(default_factory=Counter)
    seconds: Counter[str] = field(default_factory=Counter)


class Proxy:
    def __init__(self, settings: ProxySettings, registry: Registry) -> None:
        self.settings = settings
        self.registry = registry
        self.router = Router(settings.policy, settings.disaggregate_min_tokens)
        self.upstream = Upstream(settings.leg_timeout_s)
        self.stats = _Stats()
        self.no_prefill_logged: tuple[float, int] | None = None  # route.py Rule 8: (when, count then)
        self.cache = _cache_view(settings)  # None: no lookups, no cost (cache_view.py Rule 1)
        self._health_task: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None

    # -- lifecycle ---------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.settings.max_body, middlewares=[self._errors])
        r = app.router
        r.add_post("/v1/completions", self._completions)
        r.add_post("/v1/chat/completions", self._chat)
        r.add_post("/v1/responses", self._responses)
        r.add_post("/v1/messages", self._messages)
        for path in _ONE_ENGINE:
            r.add_post(path, self._one_engine)
        r.add_get("/v1/models", self._models)
        r.add_get("/health", self._health)
        r.add_get("/live", self._live)
        r.add_get("/metrics", self._metrics)
        r.add_get("/admin/instances", self._admin_list)
        r.add_post("/admin/instances", self._admin_add)
        r.add_post("/admin/instances/{name}/drain", self._admin_drain)
        r.add_post("/admin/instances/{name}/undrain", self._admin_undrain)
        r.add_delete("/admin/instances/{name}", self._admin_remove)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, _: web.Application) -> None:
        await self.upstream.start()
        self._health_task = asyncio.create_task(self._health_loop())

    async def _on_cleanup(self, _: web.Application) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
        if self.cache is not None:
            await self.cache.close()
        await self.upstream.close()

    async def start(self) -> int:
        """Serve in the running loop; returns the bound port (0 in settings picks one)."""
        self._runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.host, self.settings.port, reuse_address=True)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        return int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- middleware and small endpoints -------------------------------------------------
    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            if request.path.startswith(("/v1/", "/admin/")) or request.path in _ONE_ENGINE:
                self._check_key(request)
            if request.path.startswith("/admin/") and request.method != "GET" and not self.settings.api_keys:
                _check_keyless_admin(request)
            return await handler(request)
        except HTTPProblem as p:
            self.stats.counters[f"errors_{p.status}"] += 1
            return p.response(_anthropic(request))
        except web.HTTPRequestEntityTooLarge:
            self.stats.counters["errors_413"] += 1
            return HTTPProblem(413, f"request body is larger than {self.settings.max_body} bytes").response(
                _anthropic(request))
        except web.HTTPException as e:
            self.stats.counters[f"errors_{e.status}"] += 1
            return HTTPProblem(e.status, e.reason or "error").response(_anthropic(request))

    def _check_key(self, request: web.Request) -> None:
        keys = self.settings.api_keys
        if not keys:
            return
        got = request.headers.get("Authorization", "")
        # Bearer (OpenAI clients) or x-api-key (Anthropic clients)
        token = got[7:] if got.startswith("Bearer ") else request.headers.get("x-api-key", "")
        if not any(hmac.compare_digest(token, k) for k in keys):
            raise HTTPProblem(401, "missing or wrong API key (Authorization: Bearer ..., or x-api-key)", "authentication_error")

    async def _health(self, _: web.Request) -> web.Response:
        ok = bool(self.registry.decodes())
        return web.json_response({"status": "ok" if ok else "no healthy decode instance"}, status=200 if ok else 503)

    async def _live(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _one_engine(self, request: web.Request) -> web.Response:
        """Requests that compute nothing worth disaggregating (token counts, tokenization):
        answered by one engine, a decode engine first, the next one tried if it fails to answer."""
        raw = await request.read()
        engines = sorted(self.registry.decodes(), key=lambda i: i.in_flight) + self.registry.prefills()
        why = "no healthy instance"
        headers = {"content-type": "application/json",
                   **{k: v for k in FORWARDED if (v := request.headers.get(k)) is not None}}
        answer: web.Response | None = None
        for inst in dict.fromkeys(engines):  # a "both" instance is listed twice
            try:
                async with self.upstream.session.post(inst.url + request.path, data=raw, headers=headers) as resp:
                    body = await resp.read()
                    ctype = resp.headers.get("content-type", "application/json")
                    answer = web.Response(body=body, status=resp.status, headers={"content-type": ctype})
                    if resp.status < 500:
                        return answer
                    why = f"{inst.name}: HTTP {resp.status}"  # that engine's trouble: the next one
            except Exception as e:  # unreachable or cut: the next engine
                why = f"{inst.name}: {e!r}"
        if answer is not None:
            return answer  # every engine failed: the last one's own answer
        raise HTTPProblem(503, f"no instance could answer {request.path} ({why})", "service_unavailable")

    async def _models(self, _: web.Request) -> web.Response:
        name = self.settings.model
        if name is None:
            for inst in self.registry.decodes():
                try:
                    async with self.upstream.session.get(inst.url + "/v1/models") as resp:
                        return web.json_response(await resp.json(), status=resp.status)
                except Exception:
                    continue
            raise HTTPProblem(503, "no healthy instance to list models", "service_unavailable")
        data = {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "pdfabric"}]}
        return web.json_response(data)

    async def _metrics(self, _: web.Request) -> web.Response:
        from pdfabric.proxy.metrics import render

        return web.Response(text=render(self), content_type="text/plain")

    # -- admin -------------------------------------------------------------------------
    async def _admin_list(self, _: web.Request) -> web.Response:
        return web.json_response({"instances": [i.as_dict() for i in self.registry.all()]})

    async def _admin_add(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        inst = _new_instance(body)
        try:
            self.registry.add(inst)
        except ValueError as e:
            raise HTTPProblem(409, str(e)) from None
        self._changed()
        await self._probe(inst)  # its health as the answer says it, not assumed
        return web.json_response(inst.as_dict(), status=201)

    def _instance(self, request: web.Request) -> Instance:
        name = request.match_info["name"]
        try:
            return self.registry.get(name)
        except UnknownInstance:
            known = [i.name for i in self.registry.all()]
            raise HTTPProblem(404, f"no instance named {name!r}; instances are {known}", code="unknown_instance") from None

    async def _admin_drain(self, request: web.Request) -> web.Response:
        inst = self._instance(request)
        inst.draining = True
        self._changed()
        return web.json_response(inst.as_dict())

    async def _admin_undrain(self, request: web.Request) -> web.Response:
        inst = self._instance(request)
        inst.draining = False
        self._changed()
        return web.json_response(inst.as_dict())

    async def _admin_remove(self, request: web.Request) -> web.Response:
        inst = self._instance(request)
        self.registry.remove(inst.name)
        self._changed()
        return web.json_response(inst.as_dict())

    def _changed(self) -> None:
        """Keep an admin change in the state file, so a restarted proxy starts from it."""
        if self.settings.state_file is None:
            return
        try:
            save_state(Path(self.settings.state_file), self.registry, self.settings.state_basis)
        except OSError as e:
            log.error("pdfabric proxy: cannot write the state file %s (%s); a restarted proxy would "
                      "start from its topology", self.settings.state_file, e)

    # -- health ------------------------------------------------------------------------
    async def _health_loop(self) -> None:
        while True:
            probes = [self._probe(i) for i in self.registry.all()]
            if self.cache is not None and self.cache.keying is None:
                probes.append(self.cache.refresh(self))
            await asyncio.gather(*probes, return_exceptions=True)
            await asyncio.sleep(self.settings.health_interval_s)

    async def _probe(self, inst: Instance) -> None:
        try:
            async with self.upstream.session.get(inst.url + "/health", timeout=_PROBE_TIMEOUT) as resp:
                ok = resp.status == 200
                if not ok:
                    inst.last_error = f"health check: {inst.url}/health answered HTTP {resp.status}"
        except Exception as e:
            ok = False
            try:
                inst.last_error = f"health check: {_unreachable(inst.url, e)}"
            except Exception:  # the words must not keep a dead engine "up"
                inst.last_error = f"health check: {inst.url}/health: {type(e).__name__}"
        if ok != inst.healthy:
            log.warning("pdfabric proxy: instance %s is %s", inst.name, "up" if ok else f"down ({inst.last_error})")
        inst.healthy = ok

    # -- the request path --------------------------------------------------------------
    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, COMPLETIONS)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, CHAT)

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, RESPONSES)

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, MESSAGES)

    async def _serve(self, request: web.Request, path: str) -> web.StreamResponse:
        body = await _json_body(request)
        chat = path == CHAT
        _validate(body, path)
        if path == RESPONSES:
            # no engine keeps the answer: nothing could fetch it through the proxy
            # (previous_response_id is refused, and which engine stored it is not known)
            body["store"] = False
        stream = bool(body.get("stream", False))
        prompt = _prompt_of(body, path)
        tokens = estimate_tokens(prompt)
        # the prefix hashes serve prefix_aware only (the hashing costs per prompt kilobyte)
        hashes = chunk_hashes(prompt) if self.settings.policy == "prefix_aware" else []
        self.stats.counters["requests"] += 1
        from pdfabric.proxy.route import serve_request

        return await serve_request(self, request, path, chat, body, stream, tokens, hashes)


_PROBE_TIMEOUT = None  # set below (aiohttp import kept local to the module top)


def _cache_view(s: ProxySettings) -> CacheView | None:
    if s.cache_address is None:
        return None
    from pdfabric.proxy.cache_view import CacheView  # zmq only when the cache is asked

    host, _, port = s.cache_address.rpartition(":")
    http = s.cache_http_port if s.cache_http_port is not None else int(port) + 1
    return CacheView(s.cache_address, f"http://{host}:{http}", local_tokens=s.cache_local_tokens,
                     timeout_s=s.cache_timeout_s)


async def _json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = decode_json(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise HTTPProblem(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise HTTPProblem(400, f"expected a JSON object, got {type(body).__name__}")
    return body


# answered by one engine as they are (nothing to disaggregate)
_ONE_ENGINE = ("/v1/messages/count_tokens", "/tokenize", "/detokenize")


def _anthropic(request: web.Request) -> bool:
    return request.path.startswith(MESSAGES)


def _validate(body: dict[str, Any], path: str) -> None:
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise HTTPProblem(400, "'model' is required and must be a string", code="missing_model")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise HTTPProblem(400, f"'stream' must be a boolean, got {json.dumps(body['stream'])}")
    for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        v = body.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise HTTPProblem(400, f"'{key}' must be a positive integer, got {json.dumps(v)}")
    if path in (CHAT, MESSAGES) and not isinstance(body.get("messages"), list):
        raise HTTPProblem(400, "'messages' is required and must be a list")
    if path == MESSAGES and body.get("max_tokens") is None:
        raise HTTPProblem(400, "'max_tokens' is required (Messages API)")
    if path == COMPLETIONS and not isinstance(body.get("prompt"), (str, list)):
        raise HTTPProblem(400, "'prompt' is required: a string, a list of strings or of token ids")
    if path == RESPONSES:
        _validate_responses(body)
    if "kv_transfer_params" in body:
        raise HTTPProblem(400, "'kv_transfer_params' is set by the proxy, not by clients")


def _validate_responses(body: dict[str, Any]) -> None:
    if not isinstance(body.get("input"), (str, list)):
        raise HTTPProblem(400, "'input' is required: a string or a list of input items")
    # a stored response lives in the one engine that answered it, and the next request of a
    # pair may go to any engine: refused rather than answered from the wrong engine's state
    if body.get("previous_response_id") is not None:
        raise HTTPProblem(400, "'previous_response_id' is not supported through the pdfabric proxy (a stored "
                          "response lives in one engine); send the earlier turns in 'input'",
                          code="unsupported_parameter")
    if body.get("conversation") is not None:
        raise HTTPProblem(400, "'conversation' is not supported through the pdfabric proxy (a conversation's "
                          "state lives in one engine); send the earlier turns in 'input'",
                          code="unsupported_parameter")
    if body.get("background"):
        raise HTTPProblem(400, "'background' is not supported through the pdfabric proxy (its response is "
                          "polled from the one engine that stores it)", code="unsupported_parameter")


def _prompt_of(body: dict[str, Any], path: str) -> Any:
    if path == COMPLETIONS:
        return body.get("prompt")
    if path in (CHAT, MESSAGES):
        items, parts = body.get("messages", []), []
        if path == MESSAGES and body.get("system") is not None:
            system = body["system"]
            parts.append(system if isinstance(system, str) else json.dumps(system))
    else:
        items = body["input"] if isinstance(body["input"], list) else [body["input"]]
        parts = [body["instructions"]] if isinstance(body.get("instructions"), str) else []
    for m in items:
        c = m.get("content") if isinstance(m, dict) else m
        # not plain text (content parts, tool calls, a function call's output): the whole
        # item, so its text counts (the JSON around it makes the estimate a little high)
        parts.append(c if isinstance(c, str) else json.dumps(m))
    return "\n".join(parts)


_ADMIN_KEYS = {"name", "role", "url", "control"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def _new_instance(body: dict[str, Any]) -> Instance:
    """An instance from ``POST /admin/instances``; HTTPProblem 400 naming the field that is wrong."""
    expected = "expected {name, role: prefill|decode|both, url: http://host:port, control: host:port}"
    unknown = sorted(set(body) - _ADMIN_KEYS)
    if unknown:
        raise HTTPProblem(400, f"unknown field(s) {unknown}; {expected}")
    name, role, url, control = body.get("name"), body.get("role"), body.get("url"), body.get("control")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise HTTPProblem(400, f"name: expected letters, digits, '_', '.' or '-' (at most 63), got {name!r}")
    if role not in ("prefill", "decode", "both"):
        raise HTTPProblem(400, f"role: expected prefill, decode or both, got {role!r}")
    url = url.rstrip("/") if isinstance(url, str) else url
    if (problem := url_problem(url)) is not None:
        raise HTTPProblem(400, f"url: {problem}")
    if role != "decode" and control is None:
        raise HTTPProblem(400, f"control: a {role} instance needs its connector's control endpoint (host:port)")
    if control is not None and (problem := host_port_problem(control)) is not None:
        raise HTTPProblem(400, f"control: {problem}")
    return Instance(name, role, url, control, healthy=False, last_error="not checked yet")


def _check_keyless_admin(request: web.Request) -> None:
    """Without API keys nothing says who may change the routing: only a program on this host
    may, over loopback, and not a web page a browser on this host is showing (its requests
    carry Origin or Sec-Fetch-* headers; a page could otherwise add its own engine or drain
    every one). A forwarder on this host (a reverse proxy, ssh -L) counts as local."""
    why = ""
    if not _loopback(request.remote):
        why = f"it came from {request.remote}, not over loopback (127.0.0.1 or ::1)"
    elif "Origin" in request.headers or any(h.lower().startswith("sec-fetch-") for h in request.headers):
        why = "it came from a web browser (Origin or Sec-Fetch headers)"
    if why:
        raise HTTPProblem(403, f"admin change refused: {why}; without proxy.api_keys only programs on the proxy's "
                               "host may change instances - set api_keys (or --api-key-env) to use it otherwise",
                          "permission_error")


def _loopback(remote: str | None) -> bool:
    """Whether a client's address is this host's loopback (IPv4, IPv6, IPv4-mapped IPv6)."""
    if not remote:
        return False  # no address to tell by
    try:
        addr = ipaddress.ip_address(remote.split("%")[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _unreachable(url: str, e: BaseException) -> str:
    """Why an engine's health endpoint did not answer, in words (not an aiohttp repr)."""
    import aiohttp

    if isinstance(e, asyncio.TimeoutError):
        return f"{url}/health did not answer within {_PROBE_TIMEOUT.total:g}s"
    if isinstance(e, aiohttp.ClientConnectorError):
        os_error = getattr(e, "os_error", None)  # not on every subclass in every aiohttp release
        why = (os_error.strerror or str(os_error)) if isinstance(os_error, OSError) else str(e)
        return f"cannot connect to {e.host}:{e.port}: {why}"
    return f"{url}/health: {type(e).__name__}: {e}" if str(e) else f"{url}/health: {type(e).__name__}"


def _probe_timeout() -> Any:
    import aiohttp

    return aiohttp.ClientTimeout(total=2.0)


_PROBE_TIMEOUT = _probe_timeout()
