"""A peer engine dies (SIGKILL) in the middle of a transfer, then comes back.

Over tcp, on real vLLM engines. The survivor must recompute or release, end idle (leak
check), and serve transfers with the restarted peer.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from pdfabric.testing.fabric import FabricPair, make_prompt
from pdfabric.testing.pairing import pair_completion

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

GREEDY = {"max_tokens": 12, "temperature": 0, "return_token_ids": True, "ignore_eos": True}


@pytest.fixture(scope="module")
def pair(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FabricPair]:
    p = FabricPair(
        tiny_model, tmp_path_factory.mktemp("engines-death"), {"kind": "tcp"},
        producer_extra={"lease_s": 8.0, "grant_wait_s": 2.0, "faults": {"delay_prefix": "late-", "delay_s": 3.0}},
        consumer_extra={"transfer_timeout_s": 6.0},
    ).start()
    try:
        yield p
    finally:
        p.stop()


def _counter(pair: FabricPair, which: str, key: str) -> int:
    return pair.status(which).counters.get(key, 0)


def _works(pair: FabricPair, seed: int, vocab: int) -> None:
    prompt = make_prompt(150, seed=seed, vocab=vocab)
    want = pair.prefill.complete({"prompt": prompt, **GREEDY})["choices"][0]["token_ids"]
    recomputes = _counter(pair, "decode", "recomputes")
    got = pair_completion(pair.prefill.url, pair.decode.url, pair.producer_addr, {"prompt": prompt, **GREEDY})
    assert got.token_ids == want
    assert _counter(pair, "decode", "recomputes") == recomputes, "the transfer failed after the restart"


def test_consumer_dies_mid_transfer_producer_releases(pair: FabricPair, vocab_size: int) -> None:
    prompt = make_prompt(300, seed=601, vocab=vocab_size)
    body = {"prompt": prompt, **GREEDY}
    # the producer pushes 3 s late; the consumer is killed while it waits
    t = threading.Thread(target=lambda: _ignore(pair_completion, pair.prefill.url, pair.decode.url,
                                                pair.producer_addr, body, transfer_id=f"late-{uuid.uuid4().hex}"), daemon=True)
    t.start()
    time.sleep(1.5)
    pair.decode.kill()
    t.join(60)
    assert pair.wait_idle(30) == []  # the producer alone is checked: its push failed, blocks freed
    assert _counter(pair, "prefill", "producer_push_failures") >= 1
    pair.restart("decode")
    _works(pair, 602, vocab_size)
    assert pair.wait_idle(30) == []


def test_producer_dies_while_consumer_waits_then_restarts(pair: FabricPair, vocab_size: int) -> None:
    prompt = make_prompt(220, seed=603, vocab=vocab_size)
    want = pair.prefill.complete({"prompt": prompt, **GREEDY})["choices"][0]["token_ids"]
    recomputes = _counter(pair, "decode", "recomputes")
    box: dict[str, object] = {}
    t = threading.Thread(target=lambda: box.update(r=_ignore(
        pair_completion, pair.prefill.url, pair.decode.url, pair.producer_addr, {"prompt": prompt, **GREEDY},
        transfer_id=f"late-{uuid.uuid4().hex}")), daemon=True)
    t.start()
    time.sleep(1.5)
    pair.prefill.kill()
    t.join(60)
    result = box.get("r")
    assert result is not None and result.token_ids == want  # type: ignore[attr-defined]
    assert _counter(pair, "decode", "recomputes") == recomputes + 1
    assert pair.wait_idle(30) == []
    pair.restart("prefill")
    _works(pair, 604, vocab_size)  # the consumer's link re-handshakes with the new producer
    assert pair.wait_idle(30) == []


def _ignore(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    """Run a leg whose peer we kill; the decode leg's result is what we check."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # the prefill leg's connection dies with its engine
        return e
