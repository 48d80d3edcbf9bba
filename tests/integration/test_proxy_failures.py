"""The proxy when engines fail: retries on another prefill, decode alone, unreachable and
hanging engines, health checks, and clients that hang up (route.py Rules 1-4)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable

import httpx
import openai
import pytest
from proxy_harness import LONG_PROMPT, Stack, assert_openai_error, only, sse_events, wait_until

MakeStack = Callable[..., Stack]

DECODE_ALONE_FAILED = 'pdfabric_proxy_decode_alone_total{reason="prefill_failed"}'


def test_prefill_http_500_is_retried_on_the_other_prefill(make_stack: MakeStack) -> None:
    s = make_stack(prefills=2, health_interval_s=60)
    p0, p1, d0 = *s.prefills, s.decodes[0]
    p0.faults.fail_status = 500
    p0.faults.first_token_delay_s = 0.1  # fails once both legs are on the wire
    d0.faults.first_token_delay_s = 0.4  # like a real decode engine: waits for the KV first
    r = s.complete(LONG_PROMPT)
    assert r.status_code == 200, r.text
    a, b = only(p0.requests), only(p1.requests)
    assert [x.kv["transfer_id"] for x in d0.requests] == [a.kv["transfer_id"], b.kv["transfer_id"]]
    # Rule 2: the first decode leg was cancelled (its engine saw the hang-up), the second served
    wait_until(lambda: d0.requests[0].cancelled, what="first decode leg cancelled")
    assert d0.requests[1].finished and not d0.requests[1].cancelled
    m = s.metrics()
    assert m["pdfabric_proxy_prefill_failures_total"] == 1 and m[DECODE_ALONE_FAILED] == 0
    p0_state = s.instance("p0")
    assert p0_state["healthy"] and "HTTP 500" in p0_state["last_error"]  # one bad answer is not "down"


def test_every_prefill_failing_leaves_decode_alone(make_stack: MakeStack, caplog: pytest.LogCaptureFixture) -> None:
    s = make_stack(prefills=2, health_interval_s=60)
    for p in s.prefills:
        p.faults.fail_status = 500
        p.faults.first_token_delay_s = 0.1
    s.decodes[0].faults.first_token_delay_s = 0.4
    r = s.complete(LONG_PROMPT, stream=True)
    assert r.status_code == 200 and sse_events(r.text)[-1] == "[DONE]"
    assert [len(p.requests) for p in s.prefills] == [1, 1]
    d = s.decodes[0].requests
    assert len(d) == 3 and "kv_transfer_params" not in d[2].body and d[2].finished
    wait_until(lambda: d[0].cancelled and d[1].cancelled, what="decode legs of the failed pairs cancelled")
    m = s.metrics()
    assert m[DECODE_ALONE_FAILED] == 1 and m["pdfabric_proxy_prefill_failures_total"] == 2
    assert m['pdfabric_proxy_decode_alone_total{reason="policy"}'] == 0
    assert any("serves a request alone" in rec.getMessage() for rec in caplog.records)


def test_unreachable_prefill_is_marked_unhealthy(make_stack: MakeStack) -> None:
    s = make_stack(prefills=2, health_interval_s=60)  # only the first probe, at start-up
    s.decodes[0].faults.first_token_delay_s = 0.3
    wait_until(lambda: all(e.health_checks for e in s.engines), what="first health probes")
    s.stop_engine(s.prefills[0])
    r = s.complete(LONG_PROMPT)
    assert r.status_code == 200
    s.settle()
    assert len(s.prefills[1].requests) == 1
    p0 = s.instance("p0")
    assert not p0["healthy"] and "unreachable" in p0["last_error"]
    # no longer chosen: the next request pairs p1 at once
    assert s.complete(LONG_PROMPT).status_code == 200
    s.settle()
    assert len(s.prefills[1].requests) == 2 and len(s.decodes[0].requests) == 3
    assert s.metrics()["pdfabric_proxy_prefill_failures_total"] == 1


def test_prefill_hanging_past_the_leg_timeout_is_given_up(make_stack: MakeStack) -> None:
    s = make_stack(prefills=2, pairing="sequential", leg_timeout_s=0.4, health_interval_s=60)
    s.prefills[0].faults.hang = True
    t0 = time.monotonic()
    r = s.complete(LONG_PROMPT)
    took = time.monotonic() - t0
    assert r.status_code == 200
    assert 0.35 < took < 3.0
    wait_until(lambda: s.prefills[0].requests[0].cancelled, what="the hung prefill leg closed")
    assert only(s.prefills[1].requests).finished
    assert only(s.decodes[0].requests).kv["transfer_id"] == s.prefills[1].requests[0].kv["transfer_id"]
    p0 = s.instance("p0")
    assert p0["healthy"] and "timed out" in p0["last_error"]


def test_sequential_prefill_without_kv_params_is_a_failed_leg(make_stack: MakeStack) -> None:
    s = make_stack(prefills=1, pairing="sequential", health_interval_s=60)
    s.prefills[0].role = "decode"  # answers like an engine without the pdfabric connector
    assert s.complete(LONG_PROMPT).status_code == 200
    assert "kv_transfer_params" not in only(s.decodes[0].requests).body
    assert s.metrics()[DECODE_ALONE_FAILED] == 1
    assert "kv_transfer_params" in s.instance("p0")["last_error"]


def test_unreachable_decode_answers_502_then_503(make_stack: MakeStack) -> None:
    s = make_stack(prefills=1, health_interval_s=60)
    wait_until(lambda: all(e.health_checks for e in s.engines), what="first health probes")
    s.stop_engine(s.decodes[0])
    err = assert_openai_error(s.complete(), 502)
    assert err["type"] == "upstream_error" and "decode" in err["message"]
    assert not s.instance("d0")["healthy"]
    err = assert_openai_error(s.complete(), 503)
    assert err["type"] == "service_unavailable"
    assert s.client.get("/health").status_code == 503


def test_no_healthy_decode_answers_503(make_stack: MakeStack) -> None:
    s = make_stack(prefills=1, health_interval_s=0.05)
    s.decodes[0].faults.unhealthy = True
    wait_until(lambda: not s.instance("d0")["healthy"], what="d0 marked down")
    assert_openai_error(s.complete(), 503)
    assert s.client.get("/health").status_code == 503
    assert s.decodes[0].requests == [] and s.prefills[0].requests == []


def test_health_checks_mark_an_instance_down_then_up(make_stack: MakeStack) -> None:
    s = make_stack(prefills=2, health_interval_s=0.05)
    p0 = s.prefills[0]
    p0.faults.unhealthy = True
    wait_until(lambda: not s.instance("p0")["healthy"], what="p0 marked down")
    assert s.metrics()['pdfabric_proxy_instance_up{instance="p0",role="prefill"}'] == 0
    for _ in range(3):
        assert s.complete(LONG_PROMPT).status_code == 200
    s.settle()
    assert p0.requests == [] and len(s.prefills[1].requests) == 3
    p0.faults.unhealthy = False
    wait_until(lambda: s.instance("p0")["healthy"], what="p0 back up")
    for _ in range(2):
        assert s.complete(LONG_PROMPT).status_code == 200
    s.settle()
    assert len(p0.requests) == 1  # round robin includes it again


def test_client_hanging_up_mid_stream_cancels_both_legs(make_stack: MakeStack) -> None:
    s = make_stack(prefills=1, engine={"delay_ms": 50, "tokens": 40})
    p0, d0 = s.prefills[0], s.decodes[0]
    p0.faults.first_token_delay_s = 5.0  # the prefill leg is still open when the client leaves
    with s.client.stream("POST", "/v1/completions", json={"model": "m", "prompt": "x", "stream": True}) as r:
        assert r.status_code == 200
        next(r.iter_raw())
    wait_until(lambda: d0.requests[0].cancelled, what="decode leg cancelled")
    wait_until(lambda: p0.requests[0].cancelled, what="prefill leg cancelled")
    wait_until(lambda: s.instance("d0")["in_flight"] == 0 and s.instance("p0")["in_flight"] == 0, what="loads back")
    p0.faults.first_token_delay_s = 0
    assert s.complete(max_tokens=1).status_code == 200


def test_client_hanging_up_before_the_first_byte_cancels_both_legs(make_stack: MakeStack) -> None:
    s = make_stack(prefills=1)
    p0, d0 = s.prefills[0], s.decodes[0]
    p0.faults.hang = True
    d0.faults.hang = True
    with pytest.raises(httpx.ReadTimeout):
        s.client.post("/v1/completions", json={"model": "m", "prompt": "x"}, timeout=0.3)
    wait_until(lambda: d0.cancelled and p0.cancelled, what="both legs cancelled")
    wait_until(lambda: s.instance("d0")["in_flight"] == 0 and s.instance("p0")["in_flight"] == 0, what="loads back")


def test_decode_engine_cutting_the_stream_ends_it_with_an_error_event(make_stack: MakeStack) -> None:
    """Rule 6: bytes already reached the client, so no retry; the stream ends with an error
    event and without [DONE] (never a silent truncation), and the openai client raises."""
    s = make_stack(prefills=1, engine={"tokens": 10})
    s.decodes[0].faults.cut_after = 3
    body = {"model": "m", "prompt": "x", "stream": True}
    with s.client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        events = sse_events("".join(r.iter_text()))
    assert len(events) == 4 and "[DONE]" not in events
    assert [e["choices"][0]["text"] for e in events[:3]] == [" tok0", " tok1", " tok2"]
    err = events[3]["error"]
    assert err["type"] == "upstream_error" and "d0" in err["message"] and "incomplete" in err["message"]
    assert s.metrics()["pdfabric_proxy_streams_broken_total"] == 1
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.APIError, match="incomplete"):
        for _ in client.completions.create(model="m", prompt="x", stream=True):
            pass
    client.close()
    s.decodes[0].faults.cut_after = None
    assert s.complete().status_code == 200
    wait_until(lambda: s.instance("d0")["in_flight"] == 0, what="decode load back")


def test_cut_streams_of_the_responses_and_messages_apis_raise_in_their_clients(make_stack: MakeStack) -> None:
    """Rule 6 in each API's own terms: a Responses stream ends with the Responses ``error``
    event (the openai client raises on it), a Messages stream with Anthropic's ``event:
    error`` (its client skips unnamed events, so a data-only one would be a silent end)."""
    import anthropic

    s = make_stack(prefills=1, engine={"tokens": 10})
    s.decodes[0].faults.cut_after = 3
    with s.client.stream("POST", "/v1/messages", json={"model": "m", "max_tokens": 10, "stream": True,
                                                        "messages": [{"role": "user", "content": "x"}]}) as r:
        raw = "".join(r.iter_text())
    assert raw.count("event: content_block_delta") == 3 and "message_stop" not in raw
    assert raw.rstrip().splitlines()[-2:][0] == "event: error" and "incomplete" in raw.splitlines()[-2]
    with s.client.stream("POST", "/v1/responses", json={"model": "m", "input": "x", "stream": True}) as r:
        lines = "".join(r.iter_text()).rstrip().splitlines()
    assert lines[-2] == "event: error" and "response.completed" not in "".join(lines)
    last = json.loads(lines[-1][len("data: "):])
    assert last["type"] == "error" and last["code"] == "upstream_error" and "incomplete" in last["message"]
    with openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0) as client:
        with pytest.raises(openai.APIError, match="incomplete"):
            for _ in client.responses.create(model="m", input="x", stream=True):
                pass
    with anthropic.Anthropic(base_url=s.url, api_key="none", max_retries=0) as ac:
        with pytest.raises(anthropic.APIStatusError, match="incomplete"):
            for _ in ac.messages.create(model="m", max_tokens=10, stream=True, messages=[{"role": "user", "content": "x"}]):
                pass
    assert s.metrics()["pdfabric_proxy_streams_broken_total"] == 4
    s.decodes[0].faults.cut_after = None
    wait_until(lambda: s.instance("d0")["in_flight"] == 0, what="decode load back")


@pytest.mark.parametrize("stream", [False, True])
def test_decode_engine_failing_before_its_answer_is_retried_on_another(make_stack: MakeStack, stream: bool) -> None:
    """Rule 5: nothing reached the client, so the request gets a new pair on the other decode
    engine; the failed leg is the only other one, and it did not finish."""
    s = make_stack(prefills=1, decodes=2, health_interval_s=60)
    d0, d1 = s.decodes
    d0.faults.cut_after = 0  # closes the connection without an answer
    for _ in range(2):  # round robin: one of the two starts on d0
        r = s.complete(LONG_PROMPT, stream=stream)
        assert r.status_code == 200, r.text
        assert r.headers["x-pdfabric-decode"] == "d1"
        if stream:
            assert sse_events(r.text)[-1] == "[DONE]"
    assert len(d0.requests) == 1 and d0.requests[0].cut and not d0.requests[0].finished
    assert len(d1.requests) == 2 and all(x.finished for x in d1.requests)
    s.settle()
    assert len(s.prefills[0].requests) == 3  # one prefill leg per pair tried
    assert s.metrics()["pdfabric_proxy_decode_failures_total"] == 1
    assert "closed the connection" in s.instance("d0")["last_error"]


def test_unreachable_decode_engine_is_retried_then_marked_down(make_stack: MakeStack) -> None:
    s = make_stack(prefills=1, decodes=2, health_interval_s=60)
    wait_until(lambda: all(e.health_checks for e in s.engines), what="first health probes")
    s.stop_engine(s.decodes[0])
    for _ in range(3):
        r = s.complete(LONG_PROMPT)
        assert r.status_code == 200 and r.headers["x-pdfabric-decode"] == "d1"
    d0 = s.instance("d0")
    assert not d0["healthy"] and "unreachable" in d0["last_error"]
    assert s.metrics()["pdfabric_proxy_decode_failures_total"] == 1  # then no longer chosen


def test_every_decode_attempt_failing_is_a_502_naming_the_engine(make_stack: MakeStack) -> None:
    s = make_stack(prefills=1, decodes=2, health_interval_s=60, decode_attempts=2)
    for d in s.decodes:
        d.faults.cut_after = 0
    err = assert_openai_error(s.complete(LONG_PROMPT), 502)
    assert "closed the connection" in err["message"] and err["type"] == "upstream_error"
    assert [len(d.requests) for d in s.decodes] == [1, 1]
    assert s.metrics()["pdfabric_proxy_decode_failures_total"] == 2


def test_raw_socket_hang_up_mid_stream(make_stack: MakeStack) -> None:
    """The same with a bare socket: no client library involved in how the connection ends."""
    s = make_stack(prefills=1, engine={"delay_ms": 50, "tokens": 40})
    body = b'{"model": "m", "prompt": "x", "stream": true}'
    with socket.create_connection(("127.0.0.1", s.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert b"data: " in sock.recv(65536) + sock.recv(65536)
    wait_until(lambda: s.decodes[0].requests[0].cancelled, what="decode leg cancelled")
    assert not s.decodes[0].requests[0].finished


def test_the_leg_timeout_bounds_silence_not_a_whole_stream(make_stack: MakeStack) -> None:
    s = make_stack(prefills=1, leg_timeout_s=0.3, engine={"delay_ms": 60, "tokens": 10})
    with s.client.stream("POST", "/v1/completions", json={"model": "m", "prompt": "x", "stream": True}) as r:
        text = "".join(r.iter_text())  # 0.6 s of tokens, never 0.3 s without one
    events = sse_events(text)
    assert events[-1] == "[DONE]" and len(events) == 11
    # a decode engine silent for longer than the leg timeout is given up
    s.decodes[0].faults.first_token_delay_s = 0.6
    err = assert_openai_error(s.complete(stream=True), 504)  # Rule 5: not retried (it may be busy)
    assert "timed out" in err["message"] and len(s.decodes[0].requests) == 2
    assert s.instance("d0")["healthy"]  # slow is not down


def test_tracing_headers_reach_both_legs_and_nothing_else_does(make_stack: MakeStack) -> None:
    s = make_stack(prefills=1)
    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    r = s.client.post("/v1/completions", json={"model": "m", "prompt": LONG_PROMPT},
                      headers={"X-Request-Id": "req-42", "traceparent": trace, "X-Secret": "no"})
    assert r.status_code == 200
    s.settle()
    for leg in (only(s.prefills[0].requests), only(s.decodes[0].requests)):
        assert leg.headers["x-request-id"] == "req-42" and leg.headers["traceparent"] == trace
        assert "x-secret" not in leg.headers and "authorization" not in leg.headers
    # the next request on the same keep-alive connection carries none of them
    assert s.complete(LONG_PROMPT).status_code == 200
    s.settle()
    for leg in (s.prefills[0].requests[1], s.decodes[0].requests[1]):
        assert "x-request-id" not in leg.headers and "traceparent" not in leg.headers


def test_a_prefill_leg_failing_after_the_decode_answered_is_counted(make_stack: MakeStack) -> None:
    s = make_stack(prefills=1)
    s.prefills[0].faults.fail_status = 500
    s.prefills[0].faults.first_token_delay_s = 0.3  # fails after the decode leg's first bytes
    assert s.complete(LONG_PROMPT, stream=True).status_code == 200
    wait_until(lambda: s.metrics()["pdfabric_proxy_prefill_failures_late_total"] == 1, what="late failure counted")


def test_no_healthy_prefill_serves_decode_alone_counted_and_logged(make_stack: MakeStack,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Every prefill engine down: a long prompt still gets an answer, from the decode engine
    alone - never silently: its own counter, and one warning (not one per request)."""
    s = make_stack(prefills=1, health_interval_s=0.2)
    wait_until(lambda: all(e.health_checks for e in s.engines), what="first health probes")
    s.stop_engine(s.prefills[0])
    wait_until(lambda: not s.instance("p0")["healthy"], what="p0 marked down by its health check")
    for _ in range(3):
        r = s.complete(LONG_PROMPT)
        assert r.status_code == 200, r.text
        assert "x-pdfabric-prefill" not in r.headers and r.headers["x-pdfabric-decode"] == "d0"
    assert all("kv_transfer_params" not in d.body for d in s.decodes[0].requests)
    m = s.metrics()
    assert m['pdfabric_proxy_decode_alone_total{reason="no_prefill"}'] == 3
    assert m['pdfabric_proxy_decode_alone_total{reason="policy"}'] == 0 and m[DECODE_ALONE_FAILED] == 0
    warned = [rec.getMessage() for rec in caplog.records if "no prefill instance is available" in rec.getMessage()]
    assert len(warned) == 1 and "decode engine d0 serves" in warned[0], warned
