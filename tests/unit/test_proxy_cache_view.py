"""The proxy's cache lookup without sockets: the decision rule, the keying read from
``/health``, the prompt's token ids or the ``/tokenize`` request, and the settings that turn
it on (topology and flags)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from pdfabric.proxy.cache_view import (
    Keying,
    decide,
    keying_of,
    prompt_ids,
    tokenize_body,
)

from pdfabric.commands.proxy import register, settings_and_registry
from pdfabric.config import parse_topology
from pdfabric.errors import ConfigError

TOPOLOGY = """\
name: t
model: {builtin: tiny-llama}
instances:
  - {name: prefill-0, role: prefill, port: 8100, control_port: 8101}
  - {name: decode-0, role: decode, port: 8200}
"""
CACHE = "cache:\n  server: {host: 127.0.0.1, port: 8300}\n  tiers: [{kind: memory, size: 1GiB}]\n"


@pytest.mark.parametrize(("prompt", "cached", "local", "alone"), [
    (65, 64, 0, True),      # all but the last token: nothing left to compute
    (97, 80, 16, True),     # a rest of 16 <= 16
    (98, 80, 16, False),    # a rest of 17
    (1001, 768, 256, True),
    (2001, 0, 4096, False),  # nothing cached: the connector waits for the producer as well
])
def test_decode_alone_exactly_when_the_connector_computes_the_rest(prompt: int, cached: int, local: int,
                                                                   alone: bool) -> None:
    assert decide(prompt, cached, local) is alone


def test_keying_of_health() -> None:
    health = {"status": "ok", "chunk_bytes": 4096,
              "keyings": [{"fingerprint": "", "chunk_tokens": 64}, {"fingerprint": "fp", "chunk_tokens": 64},
                          {"fingerprint": "older", "chunk_tokens": 32}]}
    assert keying_of(health) == Keying("fp", 64, 4096)
    assert keying_of({"status": "ok", "chunk_bytes": None, "keyings": []}) is None  # no engine said hello
    assert keying_of({"status": "ok", "chunk_bytes": 4096}) is None  # an older server: no keyings
    assert keying_of(["not", "a", "dict"]) is None


def test_prompt_ids_only_for_one_token_id_prompt() -> None:
    assert prompt_ids({"prompt": [1, 2, 3]}, chat=False) == [1, 2, 3]
    assert prompt_ids({"prompt": [[1, 2, 3]]}, chat=False) == [1, 2, 3]  # a batch of one
    assert prompt_ids({"prompt": [[1, 2], [3]]}, chat=False) is None
    assert prompt_ids({"prompt": "text"}, chat=False) is None
    assert prompt_ids({"prompt": [True, 2]}, chat=False) is None
    assert prompt_ids({"messages": []}, chat=True) is None


def test_tokenize_body_passes_what_changes_the_tokens() -> None:
    assert tokenize_body({"model": "m", "prompt": "hi", "max_tokens": 5}, chat=False) == {"model": "m", "prompt": "hi"}
    assert tokenize_body({"model": "m", "prompt": ["hi"], "add_special_tokens": False}, chat=False) == {
        "model": "m", "prompt": "hi", "add_special_tokens": False}
    msgs = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    body = {"model": "m", "messages": msgs, "tools": [], "continue_final_message": True, "temperature": 0}
    assert tokenize_body(body, chat=True) == {"model": "m", "messages": msgs, "add_generation_prompt": True,
                                              "tools": [], "continue_final_message": True}
    assert tokenize_body({"model": "m", "prompt": ["a", "b"]}, chat=False) is None  # a batch
    assert tokenize_body({"model": "m", "prompt": "hi", "truncate_prompt_tokens": 3}, chat=False) is None
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:"}}]}]
    assert tokenize_body({"model": "m", "messages": image}, chat=True) is None


def _args(*argv: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    register(ap.add_subparsers())
    return ap.parse_args(["proxy", *argv])


def test_topology_cache_lookup_takes_the_cache_servers_addresses(tmp_path: Path) -> None:
    f = tmp_path / "t.yaml"
    f.write_text(TOPOLOGY + CACHE + "proxy: {cache_lookup: true, cache_local_tokens: 64}\n")
    settings, _ = settings_and_registry(_args("--topology", str(f)))
    assert (settings.cache_address, settings.cache_http_port, settings.cache_local_tokens) == ("127.0.0.1:8300",
                                                                                            8301, 64)
    f.write_text(TOPOLOGY + CACHE)  # off unless asked
    assert settings_and_registry(_args("--topology", str(f)))[0].cache_address is None


def test_cache_lookup_without_a_cache_server_names_the_path() -> None:
    for extra in ("", "cache:\n  tiers: [{kind: memory, size: 1GiB}]\n"):
        with pytest.raises(ConfigError) as info:
            parse_topology(TOPOLOGY + extra + "proxy: {cache_lookup: true}\n", source="t.yaml")
        assert info.value.path == "proxy.cache_lookup" and "cache.server" in str(info.value)


def test_cache_flags() -> None:
    settings, _ = settings_and_registry(_args("--decode", "http://127.0.0.1:8200", "--cache", "10.0.0.5:8300",
                                              "--cache-http", "9000", "--cache-local-tokens", "0"))
    assert (settings.cache_address, settings.cache_http_port, settings.cache_local_tokens) == ("10.0.0.5:8300",
                                                                                            9000, 0)
    for argv, path in ((("--cache", "8300"), "--cache"), (("--cache", "h:99999"), "--cache"),
                       (("--cache-http", "9000"), "--cache-http"),
                       (("--cache", "h:1", "--cache-local-tokens", "-1"), "--cache-local-tokens")):
        with pytest.raises(ConfigError) as info:
            settings_and_registry(_args("--decode", "http://127.0.0.1:8200", *argv))
        assert info.value.path == path


def test_proxy_port_and_min_tokens_flags_are_checked() -> None:
    ok, _ = settings_and_registry(_args("--decode", "http://127.0.0.1:8200", "--port", "0", "--min-tokens", "0"))
    assert (ok.port, ok.disaggregate_min_tokens) == (0, 0)
    for argv, path, words in ((("--port", "70000"), "--port", "got 70000"), (("--port", "-1"), "--port", "got -1"),
                              (("--min-tokens", "-5"), "--min-tokens", "got -5")):
        with pytest.raises(ConfigError) as info:
            settings_and_registry(_args("--decode", "http://127.0.0.1:8200", *argv))
        assert info.value.path == path and words in str(info.value)
