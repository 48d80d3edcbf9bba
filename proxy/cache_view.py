"""What the shared KV cache holds of a prompt, asked before the proxy chooses its legs.

Theory of operation
-------------------
A decode engine whose connector finds all but a short rest of a prompt in the shared cache
loads the cached chunks and computes the rest itself, cancelling the producer's push; a
prefill leg for such a request is wasted work on a prefill engine. So, before choosing,
the proxy asks the cache server the same question the decode engine's connector will ask,
and sends such a request to a decode engine alone.

Rule 1 - off costs nothing. Without a cache address in the settings the proxy builds no
``CacheView``; the request path tests one attribute for ``None``.

Rule 2 - the engines' keys. Chunk keys are seeded with a fingerprint (model, layout) that
only the engines know; each engine's scheduler tells it to the cache server in its
``Hello``, and the server lists it on ``/health`` (``keyings``, most recent first; salted
keyings never). The proxy reads ``/health`` at start-up and every health interval until it
finds a keying, and uses the first one listed; until then a request reads it too (at most
every 0.25 s, within the request's lookup deadline), since an engine says hello on its first
request - often the moment before a user's first requests arrive. Without one it asks nothing (counted,
``outcome="no_keying"``). The prompt's token ids are the request's own (a token-id
prompt) or the decode engine's ``POST /tokenize`` (text prompts and chat messages, with the
fields that change the tokens passed along); the keys are those of every prompt token but
the last, as in the connector (``pdfabric.connector.vllm``).

Rule 3 - bounded. Tokenization and lookup share one deadline, ``timeout_s`` after the
request arrived; a lookup that fails (cache server down, slow, refusing) or a tokenization
that fails (engine error, timeout) leaves the request paired as without the cache, counted.
A failed cache server is not asked again for ``retry_after_s`` (``LookupClient``).

Rule 4 - the connector's rule. ``cached > 0 and prompt_tokens - 1 - cached <= local_tokens``
sends the request to a decode engine alone: exactly the requests for which the decode
engine's connector (``cache.local_compute_tokens``, default 256, which ``local_tokens``
mirrors) would compute the rest itself and cancel the producer's push anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pdfabric.proxy.cache_client import LookupClient
from pdfabric.proxy.legs import decode_json, encode_json, forward_headers

if TYPE_CHECKING:
    from pdfabric.proxy.server import Proxy

    from pdfabric.cache.keys import ChunkKeyer

__all__ = ["CacheView", "Keying", "Looked", "decide", "keying_of", "prompt_ids", "tokenize_body"]

# fields of a chat request that change its tokens, passed on to /tokenize as they are
_CHAT_TOKENS = ("add_generation_prompt", "continue_final_message", "add_special_tokens", "chat_template",
                "chat_template_kwargs", "tools", "mm_processor_kwargs")
_HEALTH_TIMEOUT_S = 2.0
_INLINE_REFRESH_S = 0.25  # a request without a keying reads /health itself, at most this often


@dataclass(frozen=True)
class Keying:
    """How the engines compute chunk keys, as the cache server publishes it."""

    fingerprint: str
    chunk_tokens: int
    chunk_bytes: int


@dataclass(frozen=True)
class Looked:
    """One request's answer: its exact prompt tokens, the leading ones cached, and whether
    a decode engine serves it alone (Rule 4)."""

    prompt_tokens: int
    cached_tokens: int
    alone: bool


def keying_of(health: Any) -> Keying | None:
    """The first usable keying of a cache server's ``/health`` answer, or ``None``."""
    if not isinstance(health, dict) or not isinstance(health.get("chunk_bytes"), int):
        return None
    for k in health.get("keyings") or []:
        if isinstance(k, dict) and isinstance(k.get("fingerprint"), str) and k["fingerprint"] \
                and isinstance(k.get("chunk_tokens"), int) and k["chunk_tokens"] > 0:
            return Keying(k["fingerprint"], k["chunk_tokens"], health["chunk_bytes"])
    return None


def decide(prompt_tokens: int, cached_tokens: int, local_tokens: int) -> bool:
    """Rule 4: whether the decode engine alone serves a prompt with this much cached."""
    return cached_tokens > 0 and prompt_tokens - 1 - cached_tokens <= local_tokens


def prompt_ids(body: dict[str, Any], chat: bool) -> list[int] | None:
    """The token ids of a completion request's single token-id prompt, else ``None``."""
    if chat:
        return None
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], list):
        p = p[0]  # a batch of one
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return p
    return None


def tokenize_body(body: dict[str, Any], chat: bool) -> dict[str, Any] | None:
    """The ``/tokenize`` request that gives the prompt's token ids as the engine will see
    them, or ``None`` for a prompt the proxy does not look up (a batch, embeddings,
    truncation, images or other non-text parts)."""
    if body.get("truncate_prompt_tokens") is not None or "prompt_embeds" in body:
        return None
    if not chat:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1:
            p = p[0]
        if not isinstance(p, str):
            return None
        out: dict[str, Any] = {"model": body["model"], "prompt": p}
        if "add_special_tokens" in body:
            out["add_special_tokens"] = body["add_special_tokens"]
        return out
    for m in body["messages"]:
        c = m.get("content") if isinstance(m, dict) else None
        if isinstance(c, list) and not all(isinstance(x, dict) and x.get("type") == "text" for x in c):
            return None
    return {"model": body["model"], "messages": body["messages"], "add_generation_prompt": True,
            **{k: body[k] for k in _CHAT_TOKENS if k in body}}


class CacheView:
    """The proxy's side of Rules 2-4; one per proxy, on its event loop."""

    def __init__(self, address: str, http_url: str, *, local_tokens: int, timeout_s: float,
                 retry_after_s: float = 2.0) -> None:
        self.address, self.http_url = address, http_url.rstrip("/")
        self.local_tokens, self.timeout_s = local_tokens, timeout_s
        self.client = LookupClient(address, retry_after_s=retry_after_s)
        self.keying: Keying | None = None
        self.keyer: ChunkKeyer | None = None
        self.last_error = ""
        self._rr = itertools.count()
        self._asked_at = -1e9  # loop time of the last inline /health read (Rule 2)

    async def close(self) -> None:
        await self.client.close()

    async def refresh(self, proxy: Proxy) -> None:
        """Read the keying from the cache server's ``/health`` (Rule 2); quiet on failure."""
        import aiohttp

        from pdfabric.cache.keys import ChunkKeyer

        try:
            timeout = aiohttp.ClientTimeout(total=_HEALTH_TIMEOUT_S)
            async with proxy.upstream.session.get(self.http_url + "/health", timeout=timeout) as resp:
                health = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:  # down, not JSON: asked again next interval
            self.last_error = f"{self.http_url}/health: {e!r}"
            proxy.stats.counters["cache_health_errors"] += 1
            return
        keying = keying_of(health)
        if keying is None:
            self.last_error = f"{self.http_url}/health lists no keying yet (no unsalted engine said hello)"
            return
        self.keyer = ChunkKeyer(keying.fingerprint, keying.chunk_tokens)
        self.keying, self.last_error = keying, ""

    async def look(self, proxy: Proxy, body: dict[str, Any], chat: bool, estimate: int) -> Looked | None:
        """Rule 2-4 for one request; ``None``: not looked up (counted by outcome)."""
        if estimate < proxy.settings.disaggregate_min_tokens or not proxy.registry.prefills():
            return None  # decode alone anyway: nothing to save
        c = proxy.stats.counters
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        if self.keyer is None and loop.time() - self._asked_at >= _INLINE_REFRESH_S:
            # an engine says hello on its first request, often just before the first
            # requests a user sends: read /health now rather than at the next interval
            self._asked_at = loop.time()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await self.refresh(proxy)
        keyer, keying = self.keyer, self.keying
        if keyer is None or keying is None:
            c["cache_no_keying"] += 1
            return None
        t0 = time.perf_counter()
        try:
            looked = await self._look(proxy, body, chat, keyer, keying, deadline)
        finally:
            proxy.stats.seconds["cache_lookup"] += time.perf_counter() - t0
            c["cache_lookup_n"] += 1
        return looked

    async def _look(self, proxy: Proxy, body: dict[str, Any], chat: bool, keyer: ChunkKeyer, keying: Keying,
                    deadline: float) -> Looked | None:
        c = proxy.stats.counters
        ids = prompt_ids(body, chat)
        if ids is None:
            req = tokenize_body(body, chat)
            if req is None:
                c["cache_untokenized"] += 1
                return None
            ids = await self._tokenize(proxy, req, deadline)
            if ids is None:
                c["cache_tokenize_failed"] += 1
                return None
        n = len(ids)
        salt = body.get("cache_salt")  # vLLM's per-request salt seeds the engine's keys too
        if salt is not None and not isinstance(salt, str):
            c["cache_untokenized"] += 1
            return None
        try:
            keys = keyer.keys(ids[: n - 1], salt=salt)
        except ValueError:  # token ids out of range: the engine refuses the request itself
            c["cache_untokenized"] += 1
            return None
        if not keys:
            c["cache_short"] += 1
            return Looked(n, 0, False)
        hits = await self.client.lookup(keys, keying.chunk_bytes, deadline)
        if hits is None:
            c["cache_failed"] += 1
            return None
        cached = hits * keying.chunk_tokens
        alone = decide(n, cached, self.local_tokens)
        c["cache_alone" if alone else "cache_paired"] += 1
        c["cache_hit_tokens"] += cached
        return Looked(n, cached, alone)

    async def _tokenize(self, proxy: Proxy, req: dict[str, Any], deadline: float) -> list[int] | None:
        """The prompt's token ids from a decode engine's ``POST /tokenize`` (in turn), or ``None``."""
        decodes = proxy.registry.decodes()
        if not decodes:
            return None
        inst = decodes[next(self._rr) % len(decodes)]
        try:
            async with asyncio.timeout_at(deadline):
                resp = await proxy.upstream.http.post(inst.url, "/tokenize", encode_json(req), forward_headers.get())
                data = await resp.read()
            if resp.status != 200:
                return None
            tokens = decode_json(data).get("tokens")
        except (TimeoutError, OSError, ValueError, AttributeError):
            return None
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, int) for t in tokens):
            return None
        return tokens
