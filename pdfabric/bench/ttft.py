"""End-to-end time to first token on real vLLM engines: pdfabric against vLLM's own
connectors and a single engine, same prompts, same machine, same run.

Setups (one at a time: start, measure, stop; never two at once):

- ``pdfabric-tcp`` / ``pdfabric-shm``: ``FabricPair`` (prefill on core 0, decode on core 1);
  by default both legs go out at once (``concurrent``), ``--pdfabric-mode sequential``
  sends the prefill leg first and forwards its ``kv_transfer_params``;
- ``example``: vLLM's ``ExampleConnector``; the prefill engine writes each layer's KV as
  safetensors into a shared temporary directory, the decode engine reads it back. The
  directory is emptied before every pass (otherwise the prefill engine of a later round
  would *load* its own earlier output instead of computing);
- ``nixl``: vLLM's ``NixlConnector`` (``kv_producer`` / ``kv_consumer``, ``kv_buffer_device:
  cpu``, UCX on loopback), driven as vLLM's toy proxy does: prefill leg with ``do_remote_decode``,
  its response's ``kv_transfer_params`` to the decode leg;
- ``single``: one engine on core 0, no disaggregation: the baseline.

Every engine runs with ``--no-enable-prefix-caching``: each round repeats the same prompt
set, and a prefix hit would skip the very work being measured. Requests go one at a time
(concurrency 1); prompts are token ids (``make_prompt``), greedy, ``ignore_eos``.

A measured request streams the decode leg (``"stream": true``). TTFT is from sending the
first leg until the first SSE ``data:`` chunk with a choice (vLLM emits one per new token
even when its text is empty); end-to-end until ``data: [DONE]``. The split:

- ``P leg``: until the prefill engine's response (sequential) - in concurrent mode the
  prefill leg runs beside the decode leg and is reported side by side;
- ``D leg``: from sending the decode leg until its first token (sequential: TTFT - P leg;
  concurrent: = TTFT);
- ``D wait`` / ``D 1st``: the decode engine's own view, from its Prometheus histograms
  (one request at a time, so a histogram's ``_sum`` delta is that request's value):
  ``request_queue_time`` (arrival until scheduled: for a remote-KV request this is the
  KV transfer and the wait for it) and ``request_prefill_time`` (scheduled until the first
  token: computing the token(s) not transferred). ``kv/req`` and ``local/req`` are the
  prompt tokens that came from the transfer and that were computed locally, per request.

Correctness: a verification pass (non-streamed, ``return_token_ids``) per setup; every
disaggregated output must equal the single engine's token for token, and every streamed
text must equal the single engine's text. A disaggregated request that got no KV (a
silent recompute) is flagged too.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pdfabric.bench.ttft_report import Sample, SetupRun, format_table, summarize
from pdfabric.testing.engines import Engine, EngineError, EngineSpec, connector_config, http_json
from pdfabric.testing.fabric import FabricPair, free_port, make_prompt

__all__ = ["SETUPS", "Setup", "format_table", "make_setup", "run_benchmark", "run_setup", "stream_completion"]

SETUPS = ("pdfabric-tcp", "pdfabric-shm", "example", "nixl", "single")
ENGINE_ARGS = ["--no-enable-prefix-caching"]
NIXL_PIP = ".venv/bin/pip install --no-deps nixl nixl-cu12 nixl-cu13"
_MODEL = "tiny-llama"
_QUEUE, _PREFILL = "vllm:request_queue_time_seconds", "vllm:request_prefill_time_seconds"
_SOURCES = ("external_kv_transfer", "local_compute")


@dataclass
class Timing:
    ttft: float
    e2e: float
    p_leg: float | None
    d_leg: float
    text: str


# -- HTTP ------------------------------------------------------------------------------


def stream_completion(url: str, body: dict[str, Any], timeout: float = 300.0) -> tuple[float, float, str]:
    """POST a streamed completion; returns (first-token instant, [DONE] instant, text),
    instants on ``time.perf_counter``."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port or 80, timeout=timeout)
    try:
        conn.request("POST", "/v1/completions", json.dumps({"model": _MODEL, **body, "stream": True}),
                     {"content-type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise EngineError(f"{url}: HTTP {resp.status}: {resp.read()[:500].decode(errors='replace')}")
        first: float | None = None
        parts: list[str] = []
        while True:
            line = resp.readline()
            now = time.perf_counter()
            if not line:
                raise EngineError(f"{url}: stream ended without [DONE]")
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                if first is None:
                    raise EngineError(f"{url}: stream carried no token")
                return first, now, "".join(parts)
            choices = json.loads(data).get("choices") or []
            if choices:
                first = now if first is None else first
                parts.append(choices[0].get("text") or "")
    finally:
        conn.close()


def _snapshot(engine: Engine) -> dict[str, float]:
    m = engine.metrics()
    out = {"count": m.get(_QUEUE + "_count", 0.0), "wait": m.get(_QUEUE + "_sum", 0.0),
           "first": m.get(_PREFILL + "_sum", 0.0)}
    for src in _SOURCES:
        out[src] = sum(v for k, v in m.items() if k.startswith(("vllm:prompt_tokens_by_source{",
                       "vllm:prompt_tokens_by_source_total{")) and f'source="{src}"' in k)
    return out


def _snapshot_after(engine: Engine, before: dict[str, float], timeout: float = 10.0) -> dict[str, float]:
    """The engine's counters once the request after ``before`` is recorded (stats land
    a moment after the response)."""
    deadline = time.monotonic() + timeout
    while True:
        snap = _snapshot(engine)
        if snap["count"] > before["count"] or time.monotonic() > deadline:
            return snap
        time.sleep(0.01)


def _tree_cpu_s(pid: int) -> float:
    import psutil

    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.Error:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def idle_cpu(engines: Sequence[Engine], seconds: float = 2.0) -> dict[str, float]:
    """CPU use of each idle engine (its whole process tree), in % of one core."""
    pids = {e.spec.name: e.proc.pid for e in engines if e.proc is not None}
    before = {n: _tree_cpu_s(p) for n, p in pids.items()}
    time.sleep(seconds)
    return {n: round(100 * (_tree_cpu_s(p) - before[n]) / seconds, 1) for n, p in pids.items()}


# -- setups ----------------------------------------------------------------------------


class Setup:
    """One way of serving a request; ``measured`` is the engine that streams the tokens."""

    name = ""
    mode = "single"

    def start(self, timeout: float) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    @property
    def engines(self) -> list[Engine]:
        raise NotImplementedError

    @property
    def measured(self) -> Engine:
        return self.engines[-1]

    def before_pass(self) -> None:
        """Called before every pass over the prompts."""

    def request(self, body: dict[str, Any]) -> Timing:
        raise NotImplementedError

    def verify(self, body: dict[str, Any]) -> tuple[list[int], str]:
        raise NotImplementedError

    def notes(self) -> list[str]:
        return [f"idle cpu % {idle_cpu(self.engines)}"]


def _choice(resp: dict[str, Any]) -> tuple[list[int], str]:
    c = resp["choices"][0]
    return list(c.get("token_ids") or []), str(c.get("text", ""))


class SingleSetup(Setup):
    name = "single"

    def __init__(self, model: Path, log_dir: Path) -> None:
        self.engine = Engine(EngineSpec("single", free_port(), model, log_dir, None, cores="0",
                                        extra_args=list(ENGINE_ARGS)))

    @property
    def engines(self) -> list[Engine]:
        return [self.engine]

    def start(self, timeout: float) -> None:
        try:
            self.engine.start().wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self.engine.stop()

    def request(self, body: dict[str, Any]) -> Timing:
        t0 = time.perf_counter()
        first, done, text = stream_completion(self.engine.url, body)
        return Timing(first - t0, done - t0, None, first - t0, text)

    def verify(self, body: dict[str, Any]) -> tuple[list[int], str]:
        return _choice(self.engine.complete({**body, "return_token_ids": True}))


class PairSetup(Setup):
    """Prefill leg first (``max_tokens`` 1, not streamed), its ``kv_transfer_params`` to
    the decode leg; or, ``concurrent``, both at once with ``decode_params``."""

    mode = "sequential"
    needs_params = True

    @property
    def prefill(self) -> Engine:
        return self.engines[0]

    def produce_params(self, tid: str) -> dict[str, Any] | None:
        return None

    def decode_params(self, tid: str) -> dict[str, Any]:
        raise NotImplementedError

    def _p_body(self, body: dict[str, Any], tid: str) -> dict[str, Any]:
        p = {"model": _MODEL, **body, "max_tokens": 1, "stream": False}
        params = self.produce_params(tid)
        if params is not None:
            p["kv_transfer_params"] = params
        return p

    def _forward(self, p: dict[str, Any]) -> dict[str, Any]:
        params = p.get("kv_transfer_params")
        if self.needs_params and not params:
            raise EngineError(f"{self.name}: prefill response carries no kv_transfer_params: {str(p)[:300]}")
        return {"kv_transfer_params": params} if params else {}

    def request(self, body: dict[str, Any]) -> Timing:
        tid = f"ttft-{uuid.uuid4().hex}"
        if self.mode == "concurrent":
            return self._concurrent(body, tid)
        t0 = time.perf_counter()
        p = http_json(self.prefill.url + "/v1/completions", self._p_body(body, tid))
        t_p = time.perf_counter()
        first, done, text = stream_completion(self.measured.url, {**body, **self._forward(p)})
        return Timing(first - t0, done - t0, t_p - t0, first - t_p, text)

    def _concurrent(self, body: dict[str, Any], tid: str) -> Timing:
        box: dict[str, Any] = {}
        t0 = time.perf_counter()

        def prefill() -> None:
            try:
                http_json(self.prefill.url + "/v1/completions", self._p_body(body, tid))
            except Exception as e:  # noqa: BLE001 - reported after the decode leg
                box["err"] = e
            box["t"] = time.perf_counter() - t0

        th = threading.Thread(target=prefill, daemon=True)
        th.start()
        first, done, text = stream_completion(self.measured.url, {**body, "kv_transfer_params": self.decode_params(tid)})
        th.join(300)
        if "err" in box:
            raise EngineError(f"{self.name}: prefill leg failed: {box['err']}")
        return Timing(first - t0, done - t0, box.get("t"), first - t0, text)

    def verify(self, body: dict[str, Any]) -> tuple[list[int], str]:
        body = {**body, "return_token_ids": True}
        tid = f"ttft-v-{uuid.uuid4().hex}"
        if self.mode == "concurrent":
            box: dict[str, Any] = {}
            th = threading.Thread(target=lambda: box.setdefault(
                "p", http_json(self.prefill.url + "/v1/completions", self._p_body(body, tid))), daemon=True)
            th.start()
            d = self.measured.complete({**body, "kv_transfer_params": self.decode_params(tid)})
            th.join(300)
            return _choice(d)
        p = http_json(self.prefill.url + "/v1/completions", self._p_body(body, tid))
        return _choice(self.measured.complete({**body, **self._forward(p)}))


class FabricSetup(PairSetup):
    def __init__(self, model: Path, log_dir: Path, transport: str, mode: str) -> None:
        self.name, self.mode = f"pdfabric-{transport}", mode
        self.pair = FabricPair(model, log_dir / transport, {"kind": transport}, engine_args=list(ENGINE_ARGS))

    @property
    def engines(self) -> list[Engine]:
        return [self.pair.prefill, self.pair.decode]

    def start(self, timeout: float) -> None:
        self.pair.start(timeout)

    def stop(self) -> None:
        self.pair.stop()

    def produce_params(self, tid: str) -> dict[str, Any] | None:
        return {"pdfabric": "produce", "transfer_id": tid}

    def decode_params(self, tid: str) -> dict[str, Any]:
        return {"pdfabric": "consume", "transfer_id": tid, "producer": self.pair.producer_addr}

    def notes(self) -> list[str]:
        leaks = self.pair.wait_idle(30)
        rec = self.pair.status("decode").counters.get("recomputes", 0)
        return super().notes() + [f"leaks: {leaks or 'none'}", f"decode recomputes: {rec}"]


class VllmPairSetup(PairSetup):
    """vLLM's own ``example`` or ``nixl`` connector, pinned like ``FabricPair``."""

    def __init__(self, model: Path, log_dir: Path, connector: str) -> None:
        self.name = connector
        self.needs_params = connector == "nixl"
        self.store = Path(tempfile.mkdtemp(prefix="pdfabric-ttft-kv-")) if connector == "example" else None
        specs = []
        for name, role, core in (("prefill", "kv_producer", "0"), ("decode", "kv_consumer", "1")):
            env: dict[str, str] = {}
            extra: dict[str, Any] | None = None
            if self.store is not None:
                extra = {"shared_storage_path": str(self.store)}
            else:
                env = {"VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port()), "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
                       "UCX_NET_DEVICES": "lo"}
            cfg = connector_config(role, extra, connector=connector)
            if connector == "nixl":
                cfg["kv_buffer_device"] = "cpu"
            specs.append(EngineSpec(name, free_port(), model, log_dir / connector, cfg, cores=core,
                                    extra_args=list(ENGINE_ARGS), env=env))
        self._engines = [Engine(s) for s in specs]

    @property
    def engines(self) -> list[Engine]:
        return self._engines

    def start(self, timeout: float) -> None:
        if self.name == "nixl" and importlib.util.find_spec("nixl") is None:
            raise EngineError(f"the nixl package is not installed (pip: {NIXL_PIP})")
        try:
            for e in self._engines:
                e.start()
            for e in self._engines:
                e.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for e in reversed(self._engines):
            e.stop()
        if self.store is not None:
            shutil.rmtree(self.store, ignore_errors=True)

    def before_pass(self) -> None:
        if self.store is not None:
            for child in self.store.iterdir():
                shutil.rmtree(child, ignore_errors=True)

    def produce_params(self, tid: str) -> dict[str, Any] | None:
        if self.name != "nixl":
            return None
        return {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                "remote_block_ids": None, "remote_host": None, "remote_port": None}


def make_setup(name: str, model: Path, log_dir: Path, pdfabric_mode: str = "concurrent") -> Setup:
    if name.startswith("pdfabric-"):
        return FabricSetup(model, log_dir, name.removeprefix("pdfabric-"), pdfabric_mode)
    if name in ("example", "nixl"):
        return VllmPairSetup(model, log_dir, name)
    if name == "single":
        return SingleSetup(model, log_dir)
    raise ValueError(f"unknown setup {name!r}; expected one of {', '.join(SETUPS)}")


# -- measuring -------------------------------------------------------------------------


def _body(prompt: list[int], max_tokens: int) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}


def _measure_pass(setup: Setup, rnd: int, n_tokens: int, prompts: list[list[int]], max_tokens: int) -> list[Sample]:
    setup.before_pass()
    out: list[Sample] = []
    snap = _snapshot(setup.measured)
    for i, prompt in enumerate(prompts):
        t = setup.request(_body(prompt, max_tokens))
        after = _snapshot_after(setup.measured, snap)
        ok = after["count"] == snap["count"] + 1
        d = {k: (after[k] - snap[k]) if ok else None for k in after}
        out.append(Sample(rnd, n_tokens, i, t.ttft, t.e2e, t.p_leg, t.d_leg, d["wait"], d["first"],
                          d["external_kv_transfer"], d["local_compute"], t.text))
        snap = after
    return out


def run_setup(setup: Setup, prompts: dict[int, list[list[int]]], warm: list[list[int]], *,
              max_tokens: int, rounds: int, timeout: float, log: Callable[[str], None]) -> SetupRun:
    run = SetupRun(setup.name, setup.mode)
    t0 = time.monotonic()
    try:
        log(f"[{setup.name}] starting engines")
        setup.start(timeout)
        log(f"[{setup.name}] ready after {time.monotonic() - t0:.0f} s; warmup, verification, {rounds} rounds")
        setup.before_pass()
        for p in warm:
            setup.request(_body(p, max_tokens))
        for n, ps in prompts.items():
            setup.before_pass()
            run.verified[n] = [setup.verify(_body(p, max_tokens)) for p in ps]
        for r in range(rounds):
            for n, ps in prompts.items():
                run.samples += _measure_pass(setup, r, n, ps, max_tokens)
        run.notes = setup.notes()
    except Exception as e:  # noqa: BLE001 - a failed setup is a row, the others still run
        run.error = f"{type(e).__name__}: {e}"
        log(f"[{setup.name}] FAILED: {run.error}")
    finally:
        setup.stop()
    run.seconds = time.monotonic() - t0
    log(f"[{setup.name}] done in {run.seconds:.0f} s")
    return run


# -- driver ----------------------------------------------------------------------------


def run_benchmark(setups: Sequence[str], *, prompts: int = 16, lengths: Sequence[int] = (800,),
                  max_tokens: int = 32, rounds: int = 3, warmup: int = 2, pdfabric_mode: str = "concurrent",
                  log_dir: Path, timeout: float = 400.0,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every setup in turn (engines of one setup at a time); the JSON document."""
    from pdfabric.testing.tinymodel import build_tiny_llama

    model = build_tiny_llama()
    vocab = int(json.loads((model / "config.json").read_text())["vocab_size"])
    sets = {n: [make_prompt(n, seed=n * 1000 + i, vocab=vocab) for i in range(prompts)] for n in lengths}
    warm = [make_prompt(lengths[i % len(lengths)], seed=900_000 + i, vocab=vocab) for i in range(warmup)]
    t0 = time.monotonic()
    runs = [run_setup(make_setup(name, model, log_dir, pdfabric_mode), sets, warm, max_tokens=max_tokens,
                      rounds=rounds, timeout=timeout, log=log) for name in setups]
    rows = summarize(runs, lengths)
    return {
        "benchmark": "e2e_ttft",
        "meta": {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": str(model), "prompts": prompts,
                 "prompt_tokens": list(lengths), "max_tokens": max_tokens, "rounds": rounds, "warmup": warmup,
                 "pdfabric_mode": pdfabric_mode, "engine_args": ENGINE_ARGS, "seconds": round(time.monotonic() - t0, 1),
                 "setup_seconds": {r.name: round(r.seconds, 1) for r in runs}},
        "results": [asdict(r) for r in rows],
        "samples": {r.name: [{k: v for k, v in asdict(s).items() if k != "text"} for s in r.samples] for r in runs},
    }
