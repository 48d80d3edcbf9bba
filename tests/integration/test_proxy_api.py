"""The proxy's edges: bad client input, API keys, the admin API, and ``pdfabric proxy`` /
the fake engine as real child processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from proxy_harness import LONG_PROMPT, BackgroundLoop, Stack, assert_openai_error, free_port, only, wait_until

from pdfabric.testing.fake_engine import FakeEngine

MakeStack = Callable[..., Stack]

MSGS = [{"role": "user", "content": "hi"}]
BAD_BODIES: list[tuple[str, str, bytes, str]] = [
    ("malformed-json", "/v1/completions", b'{"model": "m", "prompt": ', "not valid JSON"),
    ("not-utf8", "/v1/completions", b'{"model": "\xff\xfe"}', "not valid JSON"),
    ("empty", "/v1/completions", b"", "not valid JSON"),
    ("nan", "/v1/completions", b'{"model": "m", "prompt": "x", "temperature": NaN}', "not valid JSON"),
    ("array", "/v1/completions", b'[{"model": "m", "prompt": "x"}]', "expected a JSON object"),
    ("string", "/v1/chat/completions", b'"hello"', "expected a JSON object"),
    ("no-model", "/v1/completions", json.dumps({"prompt": "x"}).encode(), "'model'"),
    ("model-not-str", "/v1/completions", json.dumps({"model": 3, "prompt": "x"}).encode(), "'model'"),
    ("stream-yes", "/v1/completions", json.dumps({"model": "m", "prompt": "x", "stream": "yes"}).encode(), "'stream'"),
    ("max-tokens-neg", "/v1/completions", json.dumps({"model": "m", "prompt": "x", "max_tokens": -1}).encode(),
     "'max_tokens'"),
    ("max-tokens-str", "/v1/chat/completions", json.dumps({"model": "m", "messages": MSGS, "max_tokens": "5"}).encode(),
     "'max_tokens'"),
    ("max-tokens-bool", "/v1/completions", json.dumps({"model": "m", "prompt": "x", "max_tokens": True}).encode(),
     "'max_tokens'"),
    ("no-prompt", "/v1/completions", json.dumps({"model": "m"}).encode(), "'prompt'"),
    ("no-messages", "/v1/chat/completions", json.dumps({"model": "m", "prompt": "x"}).encode(), "'messages'"),
    ("responses-no-input", "/v1/responses", json.dumps({"model": "m", "prompt": "x"}).encode(), "'input'"),
    ("responses-input-num", "/v1/responses", json.dumps({"model": "m", "input": 3}).encode(), "'input'"),
    ("responses-max-output", "/v1/responses", json.dumps({"model": "m", "input": "x", "max_output_tokens": 0}).encode(),
     "'max_output_tokens'"),
    ("responses-previous", "/v1/responses", json.dumps({"model": "m", "input": "x",
                                                        "previous_response_id": "resp_1"}).encode(),
     "'previous_response_id' is not supported"),
    ("responses-conversation", "/v1/responses", json.dumps({"model": "m", "input": "x",
                                                            "conversation": "conv_1"}).encode(),
     "'conversation' is not supported"),
    ("responses-background", "/v1/responses", json.dumps({"model": "m", "input": "x", "background": True}).encode(),
     "'background' is not supported"),
    ("messages-no-max-tokens", "/v1/messages", json.dumps({"model": "m", "messages": MSGS}).encode(),
     "'max_tokens' is required"),
    ("messages-no-messages", "/v1/messages", json.dumps({"model": "m", "max_tokens": 3}).encode(), "'messages'"),
    ("client-kv-params", "/v1/completions", json.dumps({"model": "m", "prompt": "x", "kv_transfer_params": {
        "pdfabric": "consume", "transfer_id": "t", "producer": "10.0.0.1:1"}}).encode(), "kv_transfer_params"),
]


# -- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("path,raw,needle", [b[1:] for b in BAD_BODIES], ids=[b[0] for b in BAD_BODIES])
def test_bad_input_is_refused_and_nothing_is_forwarded(make_stack: MakeStack, path: str, raw: bytes,
                                                       needle: str) -> None:
    s = make_stack(prefills=1)
    r = s.client.post(path, content=raw, headers={"content-type": "application/json"})
    if path == "/v1/messages":  # Anthropic's error shape on its API
        assert r.status_code == 400 and r.json()["type"] == "error"
        err = r.json()["error"]
    else:
        err = assert_openai_error(r, 400)
    assert needle in err["message"] and err["type"] == "invalid_request_error"
    assert all(e.requests == [] for e in s.engines)
    assert s.complete(LONG_PROMPT).status_code == 200  # still serving
    assert s.metrics()['pdfabric_proxy_errors_total{code="400"}'] == 1


def test_oversized_body_is_413(make_stack: MakeStack) -> None:
    s = make_stack(prefills=1, max_body=4096)
    err = assert_openai_error(s.complete("x" * 10_000), 413)
    assert "4096" in err["message"]
    assert all(e.requests == [] for e in s.engines)
    assert s.complete("x" * 1000).status_code == 200


def test_tokenize_is_answered_by_one_engine_the_next_if_one_is_down(make_stack: MakeStack) -> None:
    s = make_stack(prefills=1, api_keys=("sk-test",))
    body = {"model": "m", "prompt": "hello there"}
    assert_openai_error(s.client.post("/tokenize", json=body), 401)  # the proxy's keys guard it too
    auth = {"Authorization": "Bearer sk-test"}
    r = s.client.post("/tokenize", json=body, headers=auth)
    assert r.status_code == 200 and r.json()["count"] == len(r.json()["tokens"]) >= 1
    assert len(s.decodes[0].tokenized) == 1 and s.prefills[0].tokenized == []  # a decode engine first
    s.decodes[0].faults.tokenize_status = 500  # its own trouble: the next engine answers
    r = s.client.post("/tokenize", json=body, headers=auth)
    assert r.status_code == 200 and len(s.decodes[0].tokenized) == 2 and len(s.prefills[0].tokenized) == 1
    s.prefills[0].faults.tokenize_status = 500  # every engine fails: the last answer is passed on
    assert s.client.post("/tokenize", json=body, headers=auth).status_code == 500
    s.prefills[0].faults.tokenize_status = None
    s.stop_engine(s.decodes[0])
    r = s.client.post("/tokenize", json=body, headers=auth)
    assert r.status_code == 200 and len(s.prefills[0].tokenized) == 3  # down: the next engine
    assert all(e.requests == [] for e in s.engines)  # nothing was paired


def test_unknown_path_and_wrong_method_are_openai_errors(make_stack: MakeStack) -> None:
    s = make_stack(prefills=1)
    assert_openai_error(s.client.post("/v1/embeddings", json={"model": "m"}), 404)
    assert_openai_error(s.client.get("/v1/completions"), 405)
    assert all(e.requests == [] for e in s.engines)


# -- API keys ----------------------------------------------------------------------------------
def test_api_keys(make_stack: MakeStack) -> None:
    s = make_stack(prefills=1, api_keys=("key-one", "key-two"))
    body = {"model": "m", "prompt": "x"}
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "key-one"},
                    {"Authorization": "Basic a2V5LW9uZQ=="}, {"Authorization": "Bearer key-on"},
                    {"Authorization": "Bearer key-one,key-two"}):
        err = assert_openai_error(s.client.post("/v1/completions", json=body, headers=headers), 401)
        assert err["type"] == "authentication_error"
    assert_openai_error(s.client.get("/admin/instances"), 401)
    assert_openai_error(s.client.get("/v1/models"), 401)
    assert all(e.requests == [] for e in s.engines)
    for key in ("key-one", "key-two"):
        r = s.client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200
    assert s.client.get("/health").status_code == 200  # probes need no key
    assert s.client.get("/metrics").status_code == 200


# -- admin API -----------------------------------------------------------------------------------
def test_admin_list_add_drain_remove(make_stack: MakeStack, bg: BackgroundLoop) -> None:
    s = make_stack(prefills=1, decodes=1)
    listed = s.client.get("/admin/instances").json()["instances"]
    assert [(i["name"], i["role"], i["url"], i["healthy"]) for i in listed] == [
        ("p0", "prefill", s.prefills[0].url, True), ("d0", "decode", s.decodes[0].url, True)]
    assert listed[0]["control"] == s.prefills[0].control

    d1 = FakeEngine("d1", "decode")
    bg.run(d1.start())
    s.decodes.append(d1)  # stopped with the stack
    r = s.client.post("/admin/instances", json={"name": "d1", "role": "decode", "url": d1.url + "/"})
    assert r.status_code == 201 and r.json()["url"] == d1.url
    assert_openai_error(s.client.post("/admin/instances", json={"name": "d1", "role": "decode", "url": d1.url}), 409)
    assert_openai_error(s.client.post("/admin/instances", json={"name": "x", "role": "prefill", "url": d1.url}), 400)
    assert_openai_error(s.client.post("/admin/instances", json={"name": "x", "role": "boss", "url": d1.url}), 400)
    assert_openai_error(s.client.post("/admin/instances", content=b"[]"), 400)
    for url in ("x:1", "http://", "ftp://h:1"):
        bad = assert_openai_error(s.client.post("/admin/instances", json={"name": "x", "role": "decode", "url": url}), 400)
        assert "url: expected an http://host:port URL" in bad["message"], bad
    for _ in range(4):
        assert s.complete().status_code == 200
    assert len(s.decodes[0].requests) == 2 and len(d1.requests) == 2  # round robin over both

    r = s.client.post("/admin/instances/d0/drain")
    assert r.status_code == 200 and r.json()["draining"] is True
    for _ in range(3):
        assert s.complete().status_code == 200
    assert len(s.decodes[0].requests) == 2 and len(d1.requests) == 5
    assert s.metrics()['pdfabric_proxy_instance_up{instance="d0",role="decode"}'] == 0

    r = s.client.delete("/admin/instances/d1")
    assert r.status_code == 200 and r.json()["name"] == "d1"
    assert [i["name"] for i in s.client.get("/admin/instances").json()["instances"]] == ["p0", "d0"]
    assert_openai_error(s.complete(), 503)  # d0 drained, d1 gone
    assert len(d1.requests) == 5


def test_an_added_instance_is_checked_before_it_counts_as_healthy() -> None:
    """Added through the admin API, an engine that does not answer is down at once: the
    proxy's /health does not turn 200 for an engine it never reached."""
    dead = free_port()
    proc = _spawn("-m", "pdfabric.cli", "proxy", "--decode", f"http://127.0.0.1:{dead}", "--port", "0",
                  "--model", "m", "--health-interval", "0.2")
    try:
        url = _first_line(proc).split()[3]
        with httpx.Client(base_url=url, timeout=10) as c:
            wait_until(lambda: c.get("/health").status_code == 503, what="decode-0 seen down")
            r = c.post("/admin/instances", json={"name": "dq", "role": "decode", "url": f"http://127.0.0.1:{dead}"})
            assert r.status_code == 201 and r.json()["healthy"] is False, r.text
            assert r.json()["last_error"].startswith(f"health check: cannot connect to 127.0.0.1:{dead}: "), r.text
            assert c.get("/health").status_code == 503
            listed = c.get("/admin/instances").json()["instances"]
            assert "ClientConnectorError" not in listed[0]["last_error"] and str(dead) in listed[0]["last_error"]
        rc, err = _sigterm(proc)
        assert rc == 0 and "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_admin_unknown_instance_is_404_naming_the_known_ones(make_stack: MakeStack) -> None:
    s = make_stack(prefills=1)
    for r in (s.client.post("/admin/instances/d9/drain"), s.client.post("/admin/instances/d9/undrain"),
              s.client.delete("/admin/instances/d9")):
        err = assert_openai_error(r, 404)
        assert err["code"] == "unknown_instance"
        assert "'d9'" in err["message"] and "p0" in err["message"] and "d0" in err["message"]


# -- child processes ----------------------------------------------------------------------------
def _spawn(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def _first_line(proc: subprocess.Popen[str], timeout: float = 30.0) -> str:
    got: list[str] = []
    t = threading.Thread(target=lambda: got.append(proc.stdout.readline() if proc.stdout else ""), daemon=True)
    t.start()
    t.join(timeout)
    if not got or not got[0]:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        raise AssertionError(f"no start-up line from {proc.args}: rc={proc.returncode} stderr={err[-2000:]}")
    return got[0].strip()


def _sigterm(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, err


def _fakes(bg: BackgroundLoop) -> tuple[FakeEngine, FakeEngine]:
    p, d = FakeEngine("p0", "prefill"), FakeEngine("d0", "decode")

    async def up() -> None:
        await p.start()
        await d.start()

    bg.run(up())
    return p, d


def _stop(bg: BackgroundLoop, *engines: FakeEngine) -> None:
    async def down() -> None:
        for e in engines:
            await e.stop()

    bg.run(down())


def test_cli_proxy_from_flags(bg: BackgroundLoop) -> None:
    p, d = _fakes(bg)
    proc = _spawn("-m", "pdfabric.cli", "proxy", "--prefill", f"{p.url}@{p.control}", "--decode", d.url,
                  "--port", "0", "--model", "served-name")
    try:
        line = _first_line(proc)
        assert line.startswith("pdfabric proxy on http://127.0.0.1:"), line
        url = line.split()[3]
        with httpx.Client(base_url=url, timeout=10) as c:
            assert c.get("/health").json() == {"status": "ok"}
            assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["served-name"]
            assert c.post("/v1/completions", json={"model": "m", "prompt": "x"}).status_code == 200
        wait_until(lambda: p.requests, what="prefill leg")
        assert only(d.requests).kv == {"pdfabric": "consume", "transfer_id": only(p.requests).kv["transfer_id"],
                                       "producer": p.control}
        rc, err = _sigterm(proc)
        assert rc == 0, err
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        _stop(bg, p, d)


def test_cli_proxy_keeps_admin_changes_across_a_restart_in_its_state_file(bg: BackgroundLoop, tmp_path: Path) -> None:
    """With --state-file, a drain, an added and a removed instance survive the proxy's
    restart (as its launcher restarts it); undrain puts an instance back in service."""
    p, d = _fakes(bg)
    extra = FakeEngine("d1", "decode")
    bg.run(extra.start())
    state = tmp_path / "proxy-state.json"
    argv = ("-m", "pdfabric.cli", "proxy", "--prefill", f"{p.url}@{p.control}", "--decode", d.url,
            "--port", "0", "--model", "m", "--state-file", str(state))
    proc = _spawn(*argv)
    try:
        url = _first_line(proc).split()[3]
        with httpx.Client(base_url=url, timeout=10) as c:
            assert not state.exists()  # nothing changed yet
            assert c.post("/admin/instances", json={"name": "d1", "role": "decode", "url": extra.url}).status_code == 201
            assert c.post("/admin/instances/decode-0/drain").status_code == 200
        assert _sigterm(proc)[0] == 0
        saved = json.loads(state.read_text())["instances"]
        assert [(i["name"], i["draining"]) for i in saved] == [("prefill-0", False), ("decode-0", True), ("d1", False)]

        proc = _spawn(*argv)  # the same command again, as a restart
        url = _first_line(proc).split()[3]
        with httpx.Client(base_url=url, timeout=10) as c:
            listed = {i["name"]: i for i in c.get("/admin/instances").json()["instances"]}
            assert set(listed) == {"prefill-0", "decode-0", "d1"} and listed["decode-0"]["draining"] is True
            assert listed["prefill-0"]["control"] == p.control
            wait_until(lambda: c.get("/health").status_code == 200, what="a healthy decode engine")
            for _ in range(2):
                assert c.post("/v1/completions", json={"model": "m", "prompt": "x"}).status_code == 200
            assert len(d.requests) == 0 and len(extra.requests) == 2  # the drain held
            assert c.post("/admin/instances/decode-0/undrain").json()["draining"] is False
            assert c.delete("/admin/instances/d1").status_code == 200
            assert c.post("/v1/completions", json={"model": "m", "prompt": "x"}).status_code == 200
            assert len(d.requests) == 1 and len(extra.requests) == 2
        assert [(i["name"], i["draining"]) for i in json.loads(state.read_text())["instances"]] == [
            ("prefill-0", False), ("decode-0", False)]
        rc, err = _sigterm(proc)
        assert rc == 0 and "Traceback" not in err, err
        assert f"instances as an earlier run's admin changes left them, from {state}" in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        _stop(bg, p, d, extra)


_ENTRY = {"name": "d0", "role": "decode", "url": "http://127.0.0.1:9", "control": None, "draining": True}


@pytest.mark.parametrize(("content", "expected"), [
    ("{not json", "not JSON"),
    ('{"basis": "x", "instances": {}}', 'expected {"basis": "...", "instances": [...]}'),
    (json.dumps({"basis": "B", "instances": [{"name": "d0"}]}), "instances[0]: expected the keys"),
    (json.dumps({"basis": "B", "instances": [{**_ENTRY, "role": "boss"}]}),
     "instances[0].role: expected prefill, decode or both, got 'boss'"),
    (json.dumps({"basis": "B", "instances": [{**_ENTRY, "url": "http:"}]}),
     "instances[0].url: expected an http://host:port URL, got 'http:'"),
    (json.dumps({"basis": "B", "instances": [_ENTRY, _ENTRY]}), "instance 'd0' already exists"),
    (json.dumps({"basis": "other", "instances": [_ENTRY]}), "was saved by a proxy started with other instances"),
])
def test_cli_proxy_with_a_state_file_it_cannot_use_starts_from_its_flags(tmp_path: Path, content: str,
                                                                         expected: str) -> None:
    """The state file is the proxy's own; one it cannot use (damaged, or saved for other
    instances) is reported and the proxy starts from the instances it was given - exiting
    would only have its launcher restart it into the same file."""
    from pdfabric.proxy.instances import Instance, basis_of

    state = tmp_path / "proxy-state.json"
    state.write_text(content.replace('"B"', json.dumps(basis_of([Instance("decode-0", "decode", "http://127.0.0.1:9")]))))
    proc = _spawn("-m", "pdfabric.cli", "proxy", "--decode", "http://127.0.0.1:9", "--port", "0",
                  "--state-file", str(state))
    try:
        url = _first_line(proc).split()[3]
        with httpx.Client(base_url=url, timeout=10) as c:
            listed = c.get("/admin/instances").json()["instances"]
            assert [(i["name"], i["draining"]) for i in listed] == [("decode-0", False)]
        rc, err = _sigterm(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert rc == 0 and "Traceback" not in err, err
    assert expected in err and str(state) in err, err


def test_cli_proxy_from_a_topology_file(bg: BackgroundLoop, tmp_path: Path) -> None:
    p, d = _fakes(bg)
    port, control = free_port(), free_port()
    topo = tmp_path / "topo.yaml"
    topo.write_text(f"""\
name: proxy-test
model:
  builtin: tiny-llama
instances:
  - name: prefill-0
    role: prefill
    port: {p.port}
    control_port: {control}
  - name: decode-0
    role: decode
    port: {d.port}
proxy:
  port: {port}
  policy: least_loaded
  pairing: sequential
  api_keys: {{env: PDFABRIC_TEST_PROXY_KEYS}}
""")
    proc = _spawn("-m", "pdfabric.cli", "proxy", "--topology", str(topo), env={"PDFABRIC_TEST_PROXY_KEYS": "k1,k2"})
    try:
        line = _first_line(proc)
        assert f"http://127.0.0.1:{port}" in line and "least_loaded" in line and "sequential" in line, line
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            assert c.get("/health").status_code == 200
            assert c.post("/v1/completions", json={"model": "m", "prompt": "x"}).status_code == 401
            auth = {"Authorization": "Bearer k2"}
            assert [m["id"] for m in c.get("/v1/models", headers=auth).json()["data"]] == ["tiny-llama"]
            r = c.post("/v1/completions", json={"model": "tiny-llama", "prompt": "x"}, headers=auth)
            assert r.status_code == 200
        # sequential: the prefill answer (whose producer is the fake's own address) goes to decode as is
        assert only(d.requests).kv == only(p.requests).body["kv_transfer_params"] | {
            "pdfabric": "consume", "producer": p.control, "num_tokens": 1}
        rc, err = _sigterm(proc)
        assert rc == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        _stop(bg, p, d)


@pytest.mark.parametrize("args,needle", [
    (["--prefill", "notaurl", "--decode", "http://127.0.0.1:1"], "--prefill expects URL@CONTROL"),
    (["--prefill", "http://127.0.0.1:1@127.0.0.1:2"], "no decode instance"),
    (["--decode", "127.0.0.1:8200"], "--decode expects an http://host:port URL"),
    (["--topology", "/nonexistent/topo.yaml"], "no such file"),
    (["--topology", "configs/cpu-1p1d-tcp.yaml", "--prefill", "http://127.0.0.1:1@127.0.0.1:2"],
     "instance 'prefill-0' already exists in configs/cpu-1p1d-tcp.yaml"),
], ids=["prefill-notaurl", "no-decode", "decode-no-scheme", "no-topology", "name-clash"])
def test_cli_proxy_bad_flags_exit_2(args: list[str], needle: str) -> None:
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-m", "pdfabric.cli", "proxy", *args], capture_output=True, text=True,
                       timeout=60, cwd=root, check=False)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_cli_proxy_on_a_busy_port_exits_2_and_leaves_nothing_open() -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "pdfabric.cli", "proxy", "--decode", "http://127.0.0.1:9",
                            "--port", str(port)], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in r.stderr, r.stderr
    assert "Unclosed" not in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_fake_engine_as_a_child_process() -> None:
    proc = _spawn("-m", "pdfabric.testing.fake_engine", "--port", "0", "--role", "prefill", "--tokens", "3",
                  "--delay-ms", "1", "--control", "127.0.0.1:9999")
    try:
        line = _first_line(proc)
        assert line.startswith("fake engine fake-prefill (prefill) on http://127.0.0.1:"), line
        url = line.split()[-1]
        with httpx.Client(base_url=url, timeout=10) as c:
            kv: dict[str, Any] = {"pdfabric": "produce", "transfer_id": "t-1"}
            body = c.post("/v1/completions", json={"model": "m", "prompt": "abcdefgh", "kv_transfer_params": kv}).json()
            assert body["choices"][0]["text"] == " tok0 tok1 tok2"
            assert body["kv_transfer_params"] == {"pdfabric": "consume", "transfer_id": "t-1",
                                                  "producer": "127.0.0.1:9999", "num_tokens": 2}
            assert c.post("/fake/faults", json={"unhealthy": True}).json()["unhealthy"] is True
            assert c.get("/health").status_code == 503
            (seen,) = c.get("/fake/requests").json()
            assert seen["path"] == "/v1/completions" and seen["body"]["kv_transfer_params"] == kv and seen["finished"]
        rc, err = _sigterm(proc)
        assert rc == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_metrics_parse_with_the_prometheus_client_parser(make_stack: MakeStack) -> None:
    """What a Prometheus server scrapes: every family typed, its samples together (a parser
    refuses a family that comes back after another one)."""
    from prometheus_client.parser import text_string_to_metric_families

    s = make_stack(prefills=1, decodes=2)
    assert s.complete().status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(s.client.get("/metrics").text)}
    assert families["pdfabric_proxy_instance_in_flight"].type == "gauge"
    assert families["pdfabric_proxy_instance_up"].type == "gauge"
    assert {smp.labels["instance"] for smp in families["pdfabric_proxy_instance_in_flight"].samples} == {"p0", "d0", "d1"}
    assert families["pdfabric_proxy_requests"].type == "counter"  # the parser drops _total
    assert all(f.type != "unknown" for f in families.values()), [n for n, f in families.items() if f.type == "unknown"]
