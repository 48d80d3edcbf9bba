"""The routing proxy on real loopback sockets in front of fake engines: pass-through
(JSON and SSE), how the two legs are paired, and the routing policies."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from proxy_harness import LONG_PROMPT, Stack, only, sse_events, wait_until

MakeStack = Callable[..., Stack]


# -- pass-through ------------------------------------------------------------------------
def test_completion_non_streaming_is_passed_through(make_stack: MakeStack) -> None:
    s = make_stack(prefills=1)
    r = s.complete("hello there", max_tokens=3)
    assert r.status_code == 200, r.text
    assert r.headers["x-fake-engine"] == "d0"
    body = r.json()
    assert body["id"] == "cmpl-d0-1" and body["object"] == "text_completion"
    assert body["choices"][0]["text"] == " tok0 tok1 tok2"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3
    assert only(s.decodes[0].requests).finished


def test_chat_non_streaming_is_passed_through(make_stack: MakeStack) -> None:
    s = make_stack(prefills=1)
    r = s.chat("hi", max_tokens=2)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": " tok0 tok1", "tool_calls": []}
    assert only(s.decodes[0].seen("/v1/chat/completions")).finished


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_streaming_chunks_arrive_as_the_engine_writes_them(make_stack: MakeStack, chat: bool) -> None:
    s = make_stack(prefills=1, engine={"delay_ms": 100, "tokens": 6})
    path = "/v1/chat/completions" if chat else "/v1/completions"
    req: dict[str, Any] = {"model": "fake-model", "stream": True}
    req.update({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"})
    arrivals: list[tuple[float, str]] = []
    t0 = time.monotonic()
    with s.client.stream("POST", path, json=req) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line:
                arrivals.append((time.monotonic() - t0, line))
    events = sse_events("\n".join(line for _, line in arrivals))
    assert events[-1] == "[DONE]" and len(events) == 7
    pieces = [e["choices"][0]["delta"]["content"] if chat else e["choices"][0]["text"] for e in events[:-1]]
    assert "".join(pieces) == " tok0 tok1 tok2 tok3 tok4 tok5"
    first, last = arrivals[0][0], arrivals[-1][0]
    # the engine writes a token every 100 ms: buffered, they would all arrive at once
    assert last - first > 0.35, arrivals
    assert first < last - 0.35


def test_error_status_of_the_decode_engine_is_passed_through(make_stack: MakeStack) -> None:
    s = make_stack(prefills=0)
    s.decodes[0].faults.fail_status = 422
    r = s.complete()
    assert r.status_code == 422 and "injected failure" in r.json()["message"]


# -- pairing -------------------------------------------------------------------------------
@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_concurrent_pairing_sends_both_legs_with_one_transfer_id(make_stack: MakeStack, chat: bool) -> None:
    s = make_stack(prefills=1, pairing="concurrent")
    extra = {"stream": True, "stream_options": {"include_usage": True}, "max_tokens": 4, "temperature": 0.5, "n": 1}
    if chat:
        client_body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], **extra}
        r = s.client.post("/v1/chat/completions", json=client_body)
    else:
        client_body = {"model": "fake-model", "prompt": "hello", **extra}
        r = s.client.post("/v1/completions", json=client_body)
    assert r.status_code == 200
    assert sse_events(r.text)[-2]["usage"]["completion_tokens"] == 4
    s.settle()
    p, d = only(s.prefills[0].requests), only(s.decodes[0].requests)
    tid = p.kv["transfer_id"]
    assert p.kv == {"pdfabric": "produce", "transfer_id": tid}
    assert p.body["max_tokens"] == 1 and p.body["stream"] is False
    assert "stream_options" not in p.body and "n" not in p.body
    if chat:
        assert p.body["max_completion_tokens"] == 1
    assert d.kv == {"pdfabric": "consume", "transfer_id": tid, "producer": s.prefills[0].control}
    assert r.headers["x-pdfabric-transfer-id"] == tid
    assert (r.headers["x-pdfabric-prefill"], r.headers["x-pdfabric-decode"]) == ("p0", "d0")
    assert {k: v for k, v in d.body.items() if k != "kv_transfer_params"} == client_body
    assert abs(p.at - d.at) < 0.5  # both sent at once


def test_sequential_pairing_forwards_the_prefill_answer_to_decode(make_stack: MakeStack) -> None:
    s = make_stack(prefills=1, pairing="sequential")
    s.prefills[0].faults.first_token_delay_s = 0.2
    r = s.complete(LONG_PROMPT, max_tokens=2)
    assert r.status_code == 200
    p, d = only(s.prefills[0].requests), only(s.decodes[0].requests)
    assert p.finished
    assert d.at >= p.at + 0.2  # decode only after the prefill answered
    tid = p.kv["transfer_id"]
    assert d.kv == {"pdfabric": "consume", "transfer_id": tid, "producer": s.prefills[0].control,
                    "num_tokens": len(LONG_PROMPT) // 4}
    assert d.body["max_tokens"] == 2 and d.body["prompt"] == LONG_PROMPT


@pytest.mark.parametrize("pairing", ["concurrent", "sequential"])
def test_responses_api_is_disaggregated(make_stack: MakeStack, pairing: str) -> None:
    s = make_stack(prefills=1, pairing=pairing, engine={"tokens": 6})
    client_body = {"model": "fake-model", "input": [{"role": "user", "content": LONG_PROMPT}],
                   "instructions": "be brief", "max_output_tokens": 3, "stream": True}
    r = s.client.post("/v1/responses", json=client_body)
    assert r.status_code == 200 and r.headers["x-pdfabric-prefill"] == "p0"
    kinds = [line[7:] for line in r.text.splitlines() if line.startswith("event: ")]
    assert kinds == ["response.created"] + ["response.output_text.delta"] * 3 + ["response.completed"]
    s.settle()
    p, d = only(s.prefills[0].requests), only(s.decodes[0].requests)
    tid = p.kv["transfer_id"]
    assert p.path == d.path == "/v1/responses"
    assert p.kv == {"pdfabric": "produce", "transfer_id": tid}
    # the Responses API reads max_output_tokens (max_tokens would be ignored: a full answer)
    assert p.body["max_output_tokens"] == 1 and "max_tokens" not in p.body
    assert p.body["stream"] is False and p.body["store"] is False  # its 1-token answer is never kept
    assert p.finished
    assert d.kv["transfer_id"] == tid and d.kv["producer"] == s.prefills[0].control
    # the answer is not kept either: nothing could fetch it through the proxy
    assert {k: v for k, v in d.body.items() if k != "kv_transfer_params"} == {**client_body, "store": False}


def test_openai_client_responses(make_stack: MakeStack) -> None:
    s = make_stack(prefills=1, api_keys=("sk-test",), engine={"tokens": 4})
    with openai.OpenAI(base_url=s.url + "/v1", api_key="sk-test", max_retries=0, timeout=10) as client:
        got = client.responses.create(model="fake-model", input="hello there", max_output_tokens=3)
        assert got.output_text == " tok0 tok1 tok2" and got.usage is not None and got.usage.output_tokens == 3
        events = list(client.responses.create(model="fake-model", input=[{"role": "user", "content": "hi"}],
                                              stream=True))
        deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
        assert "".join(deltas) == " tok0 tok1 tok2 tok3" and events[-1].type == "response.completed"
        with pytest.raises(openai.BadRequestError) as ei:
            client.responses.create(model="fake-model", input="again", previous_response_id=got.id)
        assert "previous_response_id" in str(ei.value)
    s.settle()
    assert len(s.prefills[0].requests) == len(s.decodes[0].requests) == 2


def test_messages_api_is_disaggregated(make_stack: MakeStack) -> None:
    s = make_stack(prefills=1, engine={"tokens": 6})
    client_body = {"model": "fake-model", "system": "be brief", "max_tokens": 3, "stream": True,
                   "messages": [{"role": "user", "content": [{"type": "text", "text": LONG_PROMPT}]}],
                   "thinking": {"type": "enabled", "budget_tokens": 1024}}
    r = s.client.post("/v1/messages", json=client_body)
    assert r.status_code == 200 and r.headers["x-pdfabric-prefill"] == "p0"
    kinds = [line[7:] for line in r.text.splitlines() if line.startswith("event: ")]
    assert kinds[:2] == ["message_start", "content_block_start"] and kinds[-1] == "message_stop"
    assert kinds.count("content_block_delta") == 3
    s.settle()
    p, d = only(s.prefills[0].requests), only(s.decodes[0].requests)
    tid = p.kv["transfer_id"]
    assert p.path == d.path == "/v1/messages"
    assert p.kv == {"pdfabric": "produce", "transfer_id": tid}
    assert p.body["max_tokens"] == 1 and p.body["stream"] is False
    # vLLM refuses a thinking budget that is not under max_tokens (1); it only bounds sampling
    assert "thinking" not in p.body and p.body["system"] == "be brief"
    assert d.kv["transfer_id"] == tid
    assert {k: v for k, v in d.body.items() if k != "kv_transfer_params"} == client_body


def test_anthropic_client_messages(make_stack: MakeStack) -> None:
    import anthropic

    s = make_stack(prefills=1, api_keys=("sk-test",), engine={"tokens": 4})
    with anthropic.Anthropic(base_url=s.url, api_key="sk-test", max_retries=0, timeout=10) as client:
        msg = client.messages.create(model="fake-model", max_tokens=3, messages=[{"role": "user", "content": "hi"}])
        assert msg.content[0].text == " tok0 tok1 tok2" and msg.usage.output_tokens == 3  # type: ignore[union-attr]
        events = list(client.messages.create(model="fake-model", max_tokens=8, stream=True,
                                             messages=[{"role": "user", "content": "hi"}]))
        text = "".join(e.delta.text for e in events if e.type == "content_block_delta")  # type: ignore[union-attr]
        assert text == " tok0 tok1 tok2 tok3" and events[-1].type == "message_stop"
    with anthropic.Anthropic(base_url=s.url, api_key="wrong", max_retries=0, timeout=10) as client:
        with pytest.raises(anthropic.AuthenticationError):
            client.messages.create(model="fake-model", max_tokens=3, messages=[{"role": "user", "content": "hi"}])
    s.settle()
    assert len(s.prefills[0].requests) == len(s.decodes[0].requests) == 2


# -- policies ------------------------------------------------------------------------------
def test_round_robin_alternates_pairs(make_stack: MakeStack) -> None:
    s = make_stack(prefills=2, decodes=2, policy="round_robin")
    for _ in range(4):
        assert s.complete().status_code == 200
    pairs = s.served_pairs()
    assert pairs[0] != pairs[1] and pairs[0] == pairs[2] and pairs[1] == pairs[3]
    assert {p for p, _ in pairs[:2]} == {"p0", "p1"} and {d for _, d in pairs[:2]} == {"d0", "d1"}


def test_least_loaded_avoids_busy_instances(make_stack: MakeStack) -> None:
    s = make_stack(prefills=2, decodes=2, policy="least_loaded", engine={"delay_ms": 100, "tokens": 10})
    s.prefills[0].faults.first_token_delay_s = 1.0  # its prefill leg stays open
    got_first = threading.Event()
    errors: list[BaseException] = []

    def busy() -> None:
        body = {"model": "m", "prompt": "x", "stream": True}
        try:
            with httpx.Client(base_url=s.url, timeout=10) as c, c.stream("POST", "/v1/completions", json=body) as r:
                for _ in r.iter_lines():
                    got_first.set()
        except httpx.HTTPError as e:  # pragma: no cover - reported below
            errors.append(e)
            got_first.set()

    t = threading.Thread(target=busy)
    t.start()
    try:
        assert got_first.wait(5)
        # the busy request holds p0 (prefill leg open) and d0 (still streaming)
        assert [len(e.requests) for e in s.engines] == [1, 0, 1, 0]
        assert s.instance("p0")["in_flight"] == 1 and s.instance("d0")["in_flight"] == 1
        s.prefills[0].faults.first_token_delay_s = 0
        assert s.complete().status_code == 200
    finally:
        t.join(10)
    assert not errors
    wait_until(lambda: len(s.prefills[1].requests) == 1, what="second prefill leg")
    assert {e.name: len(e.requests) for e in s.engines} == {"p0": 1, "d0": 1, "p1": 1, "d1": 1}
    wait_until(lambda: all(s.instance(n)["in_flight"] == 0 for n in ("p0", "p1", "d0", "d1")), what="loads back")


def test_prefix_aware_sends_a_shared_prefix_to_the_prefill_that_computed_it(make_stack: MakeStack) -> None:
    s = make_stack(prefills=2, decodes=1, policy="prefix_aware")
    prefix_a, prefix_b = "A" * 2048, "B" * 2048  # two 256-token chunks each
    # p0 is busy with prefix B while prefix A arrives: A goes to p1 (load breaks the tie)
    s.prefills[0].faults.first_token_delay_s = 0.6
    done: list[int] = []
    t = threading.Thread(target=lambda: done.append(s.complete(prefix_b + " first").status_code))
    t.start()
    try:
        wait_until(lambda: s.prefills[0].requests, what="p0 busy")
        with httpx.Client(base_url=s.url, timeout=10) as c:
            assert c.post("/v1/completions", json={"model": "m", "prompt": prefix_a + " first"}).status_code == 200
    finally:
        t.join(10)
    assert done == [200]
    s.prefills[0].faults.first_token_delay_s = 0
    # concurrent pairing: the client can have its answer before the prefill leg reached p1
    wait_until(lambda: s.prefills[1].requests, what="the prefill leg on p1")
    assert [r.body["prompt"] for r in s.prefills[1].requests] == [prefix_a + " first"]
    # now both idle: each shared prefix goes back to the prefill that has it
    for _ in range(2):
        assert s.complete(prefix_a + " second question").status_code == 200
        assert s.complete(prefix_b + " second question").status_code == 200
    # (a prefill leg may reach its engine just after the client got its answer)
    wait_until(lambda: len(s.prefills[0].requests) + len(s.prefills[1].requests) == 6, what="prefill legs")
    assert {r.body["prompt"][0] for r in s.prefills[0].requests} == {"B"}
    assert {r.body["prompt"][0] for r in s.prefills[1].requests} == {"A"}


def test_short_prompts_go_to_decode_alone(make_stack: MakeStack) -> None:
    s = make_stack(prefills=1, disaggregate_min_tokens=32)
    r = s.complete("hi")
    assert r.status_code == 200
    assert s.prefills[0].requests == []
    d = only(s.decodes[0].requests)
    assert "kv_transfer_params" not in d.body
    assert s.complete(LONG_PROMPT).status_code == 200  # ~45 tokens: disaggregated
    s.settle()
    assert len(s.prefills[0].requests) == 1 and s.decodes[0].requests[1].kv["pdfabric"] == "consume"
    m = s.metrics()
    assert m['pdfabric_proxy_decode_alone_total{reason="policy"}'] == 1
    assert m['pdfabric_proxy_decode_alone_total{reason="prefill_failed"}'] == 0


# -- the official openai client -------------------------------------------------------------
def test_openai_client_completions_and_chat(make_stack: MakeStack) -> None:
    s = make_stack(prefills=1, api_keys=("sk-test",), engine={"tokens": 4})
    with openai.OpenAI(base_url=s.url + "/v1", api_key="sk-test", max_retries=0, timeout=10) as client:
        c = client.completions.create(model="fake-model", prompt="hello", max_tokens=3)
        assert c.choices[0].text == " tok0 tok1 tok2" and c.usage is not None and c.usage.completion_tokens == 3
        chunks = list(client.completions.create(model="fake-model", prompt="hello", stream=True))
        assert "".join(ch.choices[0].text for ch in chunks) == " tok0 tok1 tok2 tok3"
        ch = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}])
        assert ch.choices[0].message.content == " tok0 tok1 tok2 tok3"
        stream = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}],
                                                stream=True, max_tokens=2)
        assert "".join(x.choices[0].delta.content or "" for x in stream) == " tok0 tok1"
        assert [m.id for m in client.models.list()] == ["fake-model"]
        with pytest.raises(openai.BadRequestError) as ei:
            client.completions.create(model="fake-model", prompt="x", max_tokens=-1)
        assert "max_tokens" in str(ei.value)
    s.settle()
    assert len(s.prefills[0].requests) == len(s.decodes[0].requests) == 4
