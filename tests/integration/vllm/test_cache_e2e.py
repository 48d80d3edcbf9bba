"""The shared KV cache on real vLLM engines: a long document asked on one engine is served
from the cache on another, and still after an engine restart; outputs equal a cold run; the
engines' own metrics prove where the prompt tokens came from. A cache server that is down
costs a recompute, never a failed request."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdfabric.testing.engines import Engine, EngineSpec, connector_config
from pdfabric.testing.fabric import free_port, make_prompt
from pdfabric.testing.pairing import pair_completion

pytestmark = pytest.mark.integration

CHUNK = 256


GREEDY = {"max_tokens": 12, "temperature": 0, "return_token_ids": True, "ignore_eos": True}


class CacheServer:
    def __init__(self, log_dir: Path) -> None:
        self.port, self.http = free_port(), free_port()
        self.log = log_dir / "cache-server.log"
        self.argv = [sys.executable, "-m", "pdfabric.cli", "cache-server", "--port", str(self.port),
                     "--http-port", str(self.http), "--memory", "256MiB", "--disk", str(log_dir / "l2"),
                     "--disk-size", "1GiB"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> CacheServer:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while "pdfabric cache-server on" not in self.log.read_text():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture(scope="module")
def stack(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[CacheServer, Engine, Engine]]:
    log_dir = tmp_path_factory.mktemp("cache-e2e")
    server = CacheServer(log_dir).start()
    engines = []
    for name, core in (("engine-a", "0"), ("engine-b", "1")):
        # engine-b always takes the uncached rest of a prompt from its producer (no local shortcut)
        cache = {"server": f"127.0.0.1:{server.port}", "chunk_tokens": CHUNK,
                 **({"local_compute_tokens": 0} if name == "engine-b" else {})}
        extra = {"control_port": free_port(), "engine_name": name, "cache": cache}
        spec = EngineSpec(name, free_port(), tiny_model, log_dir, connector_config("kv_both", extra), cores=core)
        engines.append(Engine(spec))
    try:
        for e in engines:
            e.start()
        for e in engines:
            e.wait_ready(400)
        yield server, engines[0], engines[1]
    finally:
        for e in engines:
            e.stop()
        server.stop()


def ask(engine: Engine, prompt: list[int]) -> list[int]:
    r = engine.complete({"prompt": prompt, "max_tokens": 12, "temperature": 0, "return_token_ids": True,
                         "ignore_eos": True})
    return list(r["choices"][0]["token_ids"])


def _source(m: dict[str, float], source: str) -> float:
    return sum(v for k, v in m.items() if k.startswith(("vllm:prompt_tokens_by_source{",
                                                         "vllm:prompt_tokens_by_source_total{"))
               and f'source="{source}"' in k)


def sources(engine: Engine) -> tuple[float, float]:
    m = engine.metrics()
    return _source(m, "external_kv_transfer"), _source(m, "local_compute")


def wait_sources(engine: Engine, before: tuple[float, float], prompt_len: int) -> tuple[float, float]:
    """vLLM publishes a request's stats just after the answer: wait until they add up."""
    deadline = time.monotonic() + 10
    while True:
        now = sources(engine)
        got = (now[0] - before[0], now[1] - before[1])
        if got[0] + got[1] >= prompt_len or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def scrape(server: CacheServer) -> dict[object, float]:
    """``name`` or ``(name, tier)`` -> value, through prometheus_client's parser."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{server.http}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[object, float] = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            key = (sample.name, sample.labels["tier"]) if "tier" in sample.labels else sample.name
            out[key] = sample.value
    return out


def test_a_document_read_on_one_engine_comes_from_the_cache_on_another(stack: tuple[CacheServer, Engine, Engine],
                                                                       vocab_size: int) -> None:
    server, a, b = stack
    doc = make_prompt(1500, seed=4242, vocab=vocab_size)
    before = sources(a)
    cold = ask(a, doc)
    assert wait_sources(a, before, len(doc)) == (0, len(doc))  # nothing cached yet: all computed
    time.sleep(1.0)  # engine A stores its chunks after answering (off the critical path)
    before = sources(b)
    warm = ask(b, doc)
    assert warm == cold
    cached = (len(doc) - 1) // CHUNK * CHUNK  # full chunks of every prompt token but the last
    assert wait_sources(b, before, len(doc)) == (cached, len(doc) - cached)
    # the cache server's own account, scraped and parsed as Prometheus would
    m = scrape(server)
    assert m["pdfabric_cache_hit_tokens_total"] >= cached
    assert 0 < m["pdfabric_cache_hit_tokens_total"] / m["pdfabric_cache_lookup_tokens_total"] <= 1
    assert m[("pdfabric_cache_hits_total", "memory")] >= cached // CHUNK
    assert m[("pdfabric_cache_stores_total", "memory")] >= cached // CHUNK
    assert ("pdfabric_cache_evictions_total", "disk") in m and ("pdfabric_cache_misses_total", "disk") in m


def test_a_disaggregated_request_takes_the_cached_part_from_the_cache_and_the_rest_from_the_producer(
        stack: tuple[CacheServer, Engine, Engine], vocab_size: int) -> None:
    _, a, b = stack
    doc = make_prompt(1400, seed=9090, vocab=vocab_size)
    cold = ask(a, doc)
    time.sleep(1.0)
    producer = f"127.0.0.1:{a.spec.kv_transfer_config['kv_connector_extra_config']['control_port']}"  # type: ignore[index]
    before = sources(b)
    got = pair_completion(a.url, b.url, producer, {"prompt": doc, **GREEDY})
    assert got.token_ids == cold
    # every prompt token but the last came from outside: the cache's chunks and the producer's rest
    assert wait_sources(b, before, len(doc)) == (len(doc) - 1, 1)
    rest = (len(doc) - 1) - (len(doc) - 1) // CHUNK * CHUNK
    assert rest > 0  # the producer really had a part to push


def test_still_a_hit_after_the_engine_restarts(stack: tuple[CacheServer, Engine, Engine], vocab_size: int) -> None:
    _, a, b = stack
    doc = make_prompt(1100, seed=777, vocab=vocab_size)
    cold = ask(b, doc)
    time.sleep(1.0)
    a.stop()  # a restarted engine has an empty local prefix cache: only the shared cache can help
    a.start()
    a.wait_ready(400)
    before = sources(a)
    assert ask(a, doc) == cold
    cached = (len(doc) - 1) // CHUNK * CHUNK
    assert wait_sources(a, before, len(doc)) == (cached, len(doc) - cached)


def test_a_cache_server_that_is_down_costs_a_recompute_not_a_request(stack: tuple[CacheServer, Engine, Engine],
                                                                     vocab_size: int) -> None:
    server, a, b = stack
    doc = make_prompt(900, seed=31337, vocab=vocab_size)
    cold = ask(a, doc)
    time.sleep(1.0)
    server.stop()
    try:
        before = sources(b)
        t0 = time.monotonic()
        assert ask(b, doc) == cold
        assert time.monotonic() - t0 < 30
        assert wait_sources(b, before, len(doc)) == (0, len(doc))
    finally:
        server.start()
