"""The proxy asks the shared KV cache before it chooses (route.py Rule 7, cache_view.py): a real
``pdfabric cache-server`` process, filled the way an engine fills it, the proxy and fake
engines on loopback. A prompt cached but for a short rest goes to a decode engine alone; a
partly cached one is paired; text and chat prompts are tokenized by a decode engine; a cache
server that is down or does not know the keying changes nothing but a counter."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from proxy_harness import Stack, only, wait_until

from pdfabric.cache.client import RemoteCacheClient
from pdfabric.cache.keys import ChunkKeyer
from pdfabric.testing.fake_engine import fake_token_ids
from pdfabric.testing.servers import CacheServerProcess

pytestmark = pytest.mark.integration

MakeStack = Callable[..., Stack]

FP = "model=fake-model;device=cpu;dtype=float32;layers=2;kv_heads=2;head_dim=8;block=16;tp=1"
CT = 16  # tokens per chunk
CHUNK_BYTES = 1024
ALONE_CACHED = 'pdfabric_proxy_decode_alone_total{reason="cached"}'


def outcome(name: str) -> str:
    return f'pdfabric_proxy_cache_lookups_total{{outcome="{name}"}}'


@pytest.fixture(scope="module")
def cache_server() -> Iterator[CacheServerProcess]:
    with CacheServerProcess(memory="64MiB") as srv:
        yield srv  # type: ignore[misc]


def fill(srv: CacheServerProcess, tokens: list[int], chunks: int | None = None, fingerprint: str = FP,
         salt: str | None = None) -> None:
    """Cache the leading ``chunks`` chunks of ``tokens`` (all but the last token: all it has)
    as an engine's scheduler would: its Hello tells the server the keying."""
    keys = ChunkKeyer.create(fingerprint, CT).keys(tokens[:-1], salt=salt)
    keys = keys[:chunks] if chunks is not None else keys
    c = RemoteCacheClient(srv.address, CHUNK_BYTES, name="test-engine", fingerprint=fingerprint, chunk_tokens=CT)
    try:
        with c.reserve(keys) as room:
            for v in room.views:
                if v is not None:
                    v[:] = b"\x01" * CHUNK_BYTES
        assert c.lookup(keys, count=False) == len(keys)
    finally:
        c.close()


def stack_on(make_stack: MakeStack, srv: CacheServerProcess, **settings: object) -> Stack:
    settings.setdefault("health_interval_s", 0.2)
    s = make_stack(prefills=1, decodes=1, cache_address=srv.address, cache_http_port=srv.http_port, **settings)
    wait_until(lambda: s.metrics().get("pdfabric_proxy_cache_keying_known") == 1, what="the proxy to learn the keying")
    return s


def ids(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def test_a_prompt_cached_but_its_last_token_goes_to_decode_alone(make_stack: MakeStack,
                                                                 cache_server: CacheServerProcess) -> None:
    prompt = ids(1000, 4 * CT + 1)  # every token but the last fills 4 chunks
    fill(cache_server, prompt)
    s = stack_on(make_stack, cache_server)
    p0, d0 = s.prefills[0], s.decodes[0]
    r = s.complete(prompt)
    assert r.status_code == 200, r.text
    assert r.headers["x-pdfabric-cached-tokens"] == str(4 * CT) and "x-pdfabric-prefill" not in r.headers
    assert p0.requests == [] and p0.tokenized == [] and d0.tokenized == []  # token ids: no /tokenize
    d = only(d0.requests)
    assert "kv_transfer_params" not in d.body and d.body["prompt"] == prompt
    r = s.complete(prompt, stream=True)  # streaming too
    assert r.status_code == 200 and r.headers["x-pdfabric-cached-tokens"] == str(4 * CT)
    assert p0.requests == []
    m = s.metrics()
    assert m[ALONE_CACHED] == 2 and m[outcome("alone")] == 2 and m[outcome("paired")] == 0
    assert m['pdfabric_proxy_decode_alone_total{reason="policy"}'] == 0
    assert m["pdfabric_proxy_cache_hit_tokens_total"] == 8 * CT
    assert m["pdfabric_proxy_cache_lookup_seconds_count"] == 2


def test_a_request_cache_salt_looks_up_its_own_chunks(make_stack: MakeStack,
                                                       cache_server: CacheServerProcess) -> None:
    s = stack_on(make_stack, cache_server)
    p0, d0 = s.prefills[0], s.decodes[0]
    plain, salted = ids(3000, 3 * CT + 1), ids(3500, 3 * CT + 1)
    fill(cache_server, plain)
    fill(cache_server, salted, salt="tenant-a")
    r = s.complete(plain, cache_salt="tenant-a")  # cached, but not for this tenant: paired
    assert r.status_code == 200 and r.headers["x-pdfabric-cached-tokens"] == "0" and len(p0.requests) == 1
    r = s.complete(salted, cache_salt="tenant-a")  # this tenant's chunks: decode alone
    assert r.status_code == 200 and r.headers["x-pdfabric-cached-tokens"] == str(3 * CT), r.text
    assert len(p0.requests) == 1 and d0.requests[-1].body["cache_salt"] == "tenant-a"
    r = s.complete(salted)  # the same prompt without the salt does not see them
    assert r.status_code == 200 and r.headers["x-pdfabric-cached-tokens"] == "0" and len(p0.requests) == 2


def test_the_rest_decides_alone_or_paired(make_stack: MakeStack, cache_server: CacheServerProcess) -> None:
    s = stack_on(make_stack, cache_server, cache_local_tokens=CT)
    p0, d0 = s.prefills[0], s.decodes[0]
    prompt = ids(2000, 6 * CT + 1)
    fill(cache_server, prompt, chunks=5)  # the 6th chunk is not cached: a rest of CT tokens
    r = s.complete(prompt)
    assert r.status_code == 200 and r.headers["x-pdfabric-cached-tokens"] == str(5 * CT)
    assert p0.requests == [] and "kv_transfer_params" not in only(d0.requests).body
    longer = prompt + [7]  # a rest of CT + 1 > cache_local_tokens: paired
    r = s.complete(longer)
    assert r.status_code == 200 and r.headers["x-pdfabric-cached-tokens"] == str(5 * CT)
    assert r.headers["x-pdfabric-prefill"] == "p0"
    s.settle()
    assert only(p0.requests).kv["pdfabric"] == "produce" and d0.requests[1].kv["pdfabric"] == "consume"
    r = s.complete(ids(9000, 6 * CT + 1))  # nothing cached: paired, header 0
    assert r.status_code == 200 and r.headers["x-pdfabric-cached-tokens"] == "0" and len(p0.requests) == 2
    r = s.complete(ids(9500, CT))  # shorter than a chunk plus one: nothing to ask
    assert r.status_code == 200 and r.headers["x-pdfabric-cached-tokens"] == "0" and len(p0.requests) == 3
    m = s.metrics()
    assert m[ALONE_CACHED] == 1 and m[outcome("paired")] == 2 and m[outcome("short")] == 1


def test_text_and_chat_prompts_are_tokenized_by_a_decode_engine(make_stack: MakeStack,
                                                               cache_server: CacheServerProcess) -> None:
    text = "".join(f"w{i:03d}" for i in range(4 * CT + 1))  # 4 characters per fake token
    fill(cache_server, fake_token_ids(text))
    chat_text = "".join(f"c{i:03d}" for i in range(3 * CT + 1))
    fill(cache_server, fake_token_ids(chat_text))
    s = stack_on(make_stack, cache_server)
    p0, d0 = s.prefills[0], s.decodes[0]
    r = s.complete(text)
    assert r.status_code == 200 and r.headers["x-pdfabric-cached-tokens"] == str(4 * CT)
    t = only(d0.tokenized)
    assert t.body == {"model": "fake-model", "prompt": text}
    r = s.chat(chat_text, chat_template_kwargs={"enable_thinking": False})
    assert r.status_code == 200 and r.headers["x-pdfabric-cached-tokens"] == str(3 * CT)
    t = d0.tokenized[1]
    assert t.body["messages"] == [{"role": "user", "content": chat_text}] and t.body["add_generation_prompt"]
    assert t.body["chat_template_kwargs"] == {"enable_thinking": False}  # fields that change the tokens
    assert p0.requests == [] and p0.tokenized == []
    assert [("kv_transfer_params" in x.body) for x in d0.requests] == [False, False]
    d0.faults.tokenize_status = 404  # an engine without /tokenize: paired as without the cache
    r = s.complete(text)
    assert r.status_code == 200 and "x-pdfabric-cached-tokens" not in r.headers
    assert r.headers["x-pdfabric-prefill"] == "p0"
    assert s.metrics()[outcome("tokenize_failed")] == 1
    r = s.complete(["one", "two"])  # a batch: not looked up
    assert r.status_code == 200 and "x-pdfabric-cached-tokens" not in r.headers
    assert s.metrics()[outcome("untokenized")] == 1


def test_a_slow_tokenizer_costs_at_most_the_timeout(make_stack: MakeStack, cache_server: CacheServerProcess) -> None:
    text = "".join(f"s{i:03d}" for i in range(2 * CT + 1))
    fill(cache_server, fake_token_ids(text))
    s = stack_on(make_stack, cache_server, cache_timeout_s=0.2)
    s.decodes[0].faults.tokenize_delay_s = 5.0
    t0 = time.monotonic()
    r = s.complete(text)
    took = time.monotonic() - t0
    assert r.status_code == 200 and "x-pdfabric-cached-tokens" not in r.headers
    assert r.headers["x-pdfabric-prefill"] == "p0" and took < 2.0, took
    assert s.metrics()[outcome("tokenize_failed")] == 1


def test_a_cache_server_that_is_down_costs_a_bounded_wait_then_nothing(make_stack: MakeStack) -> None:
    srv = CacheServerProcess(memory="16MiB").start()
    try:
        prompt = ids(3000, 2 * CT + 1)
        fill(srv, prompt)
        s = stack_on(make_stack, srv, cache_timeout_s=0.2)
        assert s.complete(prompt).headers["x-pdfabric-cached-tokens"] == str(2 * CT)
    finally:
        srv.stop()
    took = []
    for _ in range(3):
        t0 = time.monotonic()
        r = s.complete(prompt)
        took.append(time.monotonic() - t0)
        assert r.status_code == 200 and "x-pdfabric-cached-tokens" not in r.headers
        assert r.headers["x-pdfabric-prefill"] == "p0"  # paired, as without the cache
    assert max(took) < 2.0, took  # the first waits for the deadline (0.2 s); the rest not at all
    s.settle()
    assert len(s.prefills[0].requests) == 3
    m = s.metrics()
    assert m[outcome("failed")] == 3 and m[ALONE_CACHED] == 1
    assert s.proxy.cache is not None and s.proxy.cache.client.counters["skipped_while_down"] == 2


def test_a_restarted_cache_server_is_greeted_again_by_the_next_lookup(make_stack: MakeStack) -> None:
    """The proxy made no lookup while the server was down: its connection reconnected
    underneath it. The new server refuses a connection it never greeted; the proxy says
    Hello again and the same lookup is answered."""
    srv = CacheServerProcess(memory="16MiB").start()
    prompt = ids(5000, 2 * CT + 1)
    try:
        fill(srv, prompt)
        s = stack_on(make_stack, srv)
        assert s.complete(prompt).headers["x-pdfabric-cached-tokens"] == str(2 * CT)
    finally:
        srv.stop()
    with CacheServerProcess(srv.port, http_port=srv.http_port, memory="16MiB") as again:
        fill(again, prompt)
        r = s.complete(prompt)
        assert r.status_code == 200 and r.headers["x-pdfabric-cached-tokens"] == str(2 * CT)
    assert s.proxy.cache is not None
    counters = s.proxy.cache.client.counters
    assert counters["reconnects"] == 1 and counters["skipped_while_down"] == 0


def test_lookups_in_flight_when_the_server_restarted_all_get_answers() -> None:
    """Twenty lookups at once on a connection the new server never greeted: one reconnect,
    and every lookup answered (none drops the connection another just opened)."""
    from pdfabric.proxy.cache_client import LookupClient

    prompt = ids(7000, 2 * CT + 1)
    keys = ChunkKeyer.create(FP, CT).keys(prompt[:-1])
    srv = CacheServerProcess(memory="16MiB").start()

    async def run(client: LookupClient, n: int) -> list[int | None]:
        loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*(client.lookup(keys, CHUNK_BYTES, loop.time() + 5) for _ in range(n))))

    async def scenario() -> tuple[list[int | None], list[int | None], Counter[str]]:
        client = LookupClient(srv.address)
        try:
            before = await run(client, 1)
            srv.stop()
            with CacheServerProcess(srv.port, http_port=srv.http_port, memory="16MiB") as again:
                fill(again, prompt)
                after = await run(client, 20)
            return before, after, client.counters
        finally:
            await client.close()

    try:
        before, after, counters = asyncio.run(scenario())
    finally:
        srv.stop()
    assert before == [0] and after == [2] * 20
    assert counters["reconnects"] == 1 and counters["errors"] == 0, counters


def test_no_keying_yet_means_no_lookups(make_stack: MakeStack) -> None:
    with CacheServerProcess(memory="16MiB") as srv:
        c = RemoteCacheClient(srv.address, CHUNK_BYTES, fingerprint="salted-fp", chunk_tokens=CT, salted=True)
        try:
            assert c.lookup([b"k" * 16]) == 0  # a salted engine's hello: its keying is not published
        finally:
            c.close()
        s = make_stack(prefills=1, decodes=1, cache_address=srv.address, cache_http_port=srv.http_port,
                       health_interval_s=0.1)
        wait_until(lambda: s.proxy.cache is not None and s.proxy.cache.last_error, what="the first keying read")
        r = s.complete(ids(4000, 3 * CT + 1))
        assert r.status_code == 200 and "x-pdfabric-cached-tokens" not in r.headers
        assert r.headers["x-pdfabric-prefill"] == "p0"
        m = s.metrics()
        assert m[outcome("no_keying")] == 1 and m["pdfabric_proxy_cache_keying_known"] == 0
        prompt = ids(4100, CT + 1)
        fill(srv, prompt)  # an unsalted engine says hello: learnt at the next health interval
        wait_until(lambda: s.metrics()["pdfabric_proxy_cache_keying_known"] == 1, what="the keying")
        assert s.complete(prompt).headers["x-pdfabric-cached-tokens"] == str(CT)


def test_a_keying_said_after_start_up_serves_the_next_request(make_stack: MakeStack) -> None:
    """Engines say hello on their first request, so the keying often appears just before a
    user's first requests: a request reads /health itself rather than wait for the next
    health interval (60 s here)."""
    with CacheServerProcess(memory="16MiB") as srv:
        s = make_stack(prefills=1, decodes=1, cache_address=srv.address, cache_http_port=srv.http_port,
                       health_interval_s=60.0)
        wait_until(lambda: s.proxy.cache is not None and s.proxy.cache.last_error, what="the first keying read")
        prompt = ids(4200, 2 * CT + 1)
        fill(srv, prompt)  # the engine's hello, right after the proxy's start-up read
        r = s.complete(prompt)
        assert r.status_code == 200 and r.headers.get("x-pdfabric-cached-tokens") == str(2 * CT), r.headers
        assert "x-pdfabric-prefill" not in r.headers and s.prefills[0].requests == []
        m = s.metrics()
        assert m["pdfabric_proxy_cache_keying_known"] == 1 and m[outcome("no_keying")] == 0


def test_without_a_cache_address_nothing_is_asked(make_stack: MakeStack) -> None:
    s = make_stack(prefills=1, decodes=1)
    assert s.proxy.cache is None
    r = s.complete(ids(5000, 3 * CT + 1))
    assert r.status_code == 200 and "x-pdfabric-cached-tokens" not in r.headers
    assert s.decodes[0].tokenized == []
    m = s.metrics()
    assert m[ALONE_CACHED] == 0 and not any(k.startswith("pdfabric_proxy_cache_") for k in m)


def test_cache_lookup_without_a_cache_server_is_refused(tmp_path: Path) -> None:
    topo = tmp_path / "t.yaml"
    topo.write_text(
        "name: t\nmodel: {builtin: tiny-llama}\n"
        "instances:\n  - {name: p, role: prefill, port: 18100, control_port: 18101}\n"
        "  - {name: d, role: decode, port: 18200}\n"
        "proxy: {port: 18000, cache_lookup: true}\n")
    r = subprocess.run([sys.executable, "-m", "pdfabric.cli", "proxy", "--topology", str(topo)],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2 and "proxy.cache_lookup" in r.stderr and "cache.server" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "pdfabric.cli", "proxy", "--decode", "http://127.0.0.1:18200",
                        "--cache-http", "18301"], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2 and "--cache-http: needs --cache" in r.stderr, r.stderr
