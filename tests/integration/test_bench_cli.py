"""The transfer benchmark as a user runs it: real child processes, JSON schema, bad flags."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROW_KEYS = {"transport", "block_size", "total_bytes", "gbps", "baseline", "baseline_gbps", "ratio", "p50_us", "p99_us"}


def _run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pdfabric.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_bench_transfer_small_run_writes_json_and_table(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    r = _run("bench", "transfer", "--transport", "tcp,shm", "--size", "1MiB", "--block-size", "64KiB,256KiB",
             "--rounds", "3", "--latency-iters", "20", "--json", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert "tcp" in r.stdout and "shm" in r.stdout and "raw_socket" in r.stdout
    doc = json.loads(out.read_text())
    rows = doc["results"]
    bw = [x for x in rows if x["workload"] == "blocks"]
    assert {(x["transport"], x["block_size"]) for x in bw} == {
        (t, b) for t in ("tcp", "shm") for b in (65536, 262144)
    }
    for x in rows:
        assert ROW_KEYS <= set(x), x
        assert x["gbps"] > 0 and x["baseline_gbps"] > 0
        assert abs(x["ratio"] - x["gbps"] / x["baseline_gbps"]) < 1e-9
        assert len(x["rounds"]) >= 3
    assert {x["baseline"] for x in bw if x["transport"] == "tcp"} == {"raw_socket"}
    assert {x["baseline"] for x in bw if x["transport"] == "shm"} == {"memcpy"}
    assert {x["transport"] for x in rows if x["workload"] == "latency"} == {"tcp", "shm"}
    assert set(doc["baselines"]) == {"memcpy", "raw_socket", "shm_copy"}


@pytest.mark.skipif(importlib.util.find_spec("nixl") is None, reason="nixl is not installed (pip install --no-deps nixl nixl-cu12 nixl-cu13)")
def test_bench_nixl_rows_are_compared_with_raw_nixl_and_memcpy(tmp_path: Path) -> None:
    out = tmp_path / "nixl.json"
    r = _run("bench", "transfer", "--transport", "nixl", "--size", "2MiB", "--block-size", "256KiB",
             "--rounds", "3", "--latency-iters", "10", "--json", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "raw_nixl" in r.stdout and "vs memcpy" in r.stdout
    doc = json.loads(out.read_text())
    (bw,) = [x for x in doc["results"] if x["workload"] == "blocks"]
    assert bw["transport"] == "nixl" and bw["baseline"] == "raw_nixl" and bw["gbps"] > 0
    assert bw["ratio_to_raw_nixl"] == bw["ratio"] and bw["ratio_to_memcpy"] > 0
    # every write of the row (3 rounds + warm-up) is counted, on the offer path or the Ask path
    assert bw["offers_used"] + bw["asks"] == 4 and bw["offers_used"] >= 1
    (lat,) = [x for x in doc["results"] if x["workload"] == "latency"]
    assert lat["ratio_to_raw_nixl"] is None


def test_bench_kv_workload_uses_real_geometry(tmp_path: Path) -> None:
    out = tmp_path / "kv.json"
    r = _run("bench", "transfer", "--transport", "tcp", "--workload", "tiny", "--size", "2MiB",
             "--rounds", "3", "--latency-iters", "0", "--json", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(out.read_text())["results"]
    per_block = 2 * 4 * 2 * 64 * 32 * 2  # K+V, layers, kv heads, head dim, tokens, bf16
    assert row["workload"] == "tiny" and row["total_bytes"] % per_block == 0
    assert row["block_size"] == per_block // 4  # one layer's region of one block (cpu layout)


def test_bench_bad_flags_exit_2_without_traceback() -> None:
    for args, needle in (
        (["--transport", "carrier-pigeon"], "carrier-pigeon"),
        (["--transport", "tcp", "--rounds", "1"], "--rounds"),
        (["--transport", "tcp", "--size", "12 parsecs"], "12 parsecs"),
        (["--transport", "tcp", "--streams", "0"], "--streams: expected at least 1 connection, got 0"),
        (["--transport", "tcp", "--size", "0"], "--size: expected sizes above 0"),
        (["--transport", "tcp", "--size", "4MiB", "--block-size", "8MiB"], "smaller than every block"),
        (["--transport", "tcp", "--latency-iters", "-1"], "--latency-iters: expected 0 (skip) or more, got -1"),
        (["--transport", "tcp", "--json", "/nonexistent-dir/x.json"], "--json: cannot write /nonexistent-dir/x.json"),
        (["--transport", "tcp", "--plot", "/nonexistent-dir/x.png"], "--plot: cannot write"),
    ):
        r = _run("bench", "transfer", *args, timeout=60)
        assert r.returncode == 2, (args, r.returncode, r.stderr)
        assert needle in r.stderr and "Traceback" not in r.stderr


def test_cli_help_lists_subcommands() -> None:
    r = _run("--help", timeout=60)
    assert r.returncode == 0
    for cmd in ("config", "bench"):
        assert cmd in r.stdout
    r = _run(timeout=60)
    assert r.returncode == 2 and "usage" in r.stdout


def test_staging_overhead_benchmark_runs_both_paths(tmp_path: Path) -> None:
    out = tmp_path / "staging.json"
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "staging_overhead.py"
    r = subprocess.run([sys.executable, str(script), "--geometry", "tiny", "--blocks", "3,20", "--rounds", "3",
                        "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["results"]
    assert [x["blocks"] for x in rows] == [3, 20]
    for x in rows:
        assert x["direct_s"] > 0 and x["staged_s"] > 0 and abs(x["ratio"] - x["staged_s"] / x["direct_s"]) < 1e-9
        assert x["bytes"] == x["blocks"] * 4 * 2 * 32 * 128 * 2  # tiny: 4 layers, 2 heads, 32 tokens, 2x64 dims, bf16
    bad = subprocess.run([sys.executable, str(script), "--blocks", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--blocks value in 1..512" in bad.stderr and "Traceback" not in bad.stderr


def test_latency_floor_benchmark_measures_both_designs(tmp_path: Path) -> None:
    out = tmp_path / "floor.json"
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "latency_floor.py"
    r = subprocess.run([sys.executable, str(script), "--iters", "200", "--rounds", "3", "--json", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert len(doc["rounds"]["raw"]) == len(doc["rounds"]["handoff"]) == 3
    assert 0 < doc["raw_half_rtt_us"] and 0 < doc["raw_one_way_us"] and 0 < doc["handoff_one_way_us"]
    assert abs(doc["handoff_ratio"] - doc["handoff_one_way_us"] / doc["raw_half_rtt_us"]) < 1e-9
    assert "handoff one-way" in r.stdout and "raw half round trip" in r.stdout
    bad = subprocess.run([sys.executable, str(script), "--rounds", "2"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--rounds must be >= 3" in bad.stderr and "Traceback" not in bad.stderr
