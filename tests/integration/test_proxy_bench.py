"""The proxy overhead benchmark as a user runs it, in a tiny configuration: real child
processes (fakes, ``pdfabric proxy``, the toy proxy, the load generator), JSON schema."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

for _mod in ("fastapi", "httpx", "uvicorn"):  # the toy row's server
    pytest.importorskip(_mod)

pytestmark = [pytest.mark.integration]

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "proxy_overhead.py"
ROWS = ("direct", "pdfabric", "toy")
KEYS = {"row", "stream", "concurrency", "rps", "p50_ms", "p99_ms", "added_p50_ms", "added_p99_ms",
        "cpu_us_per_req", "requests", "errors", "non200", "valid", "rounds"}


@pytest.mark.timeout(90)
def test_proxy_bench_tiny_run_writes_every_row(tmp_path: Path) -> None:
    out = tmp_path / "proxy.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--rows", ",".join(ROWS), "--duration", "1", "--rounds", "1",
                        "--concurrency", "1,4", "--max-other-pct", "10000", "--json", str(out)],  # never re-measure
                       capture_output=True, text=True, timeout=80)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    doc = json.loads(out.read_text())
    assert doc["skipped"] == {}
    got = {(x["row"], x["stream"], x["concurrency"]): x for x in doc["rows"]}
    assert set(got) == {(row, s, c) for row in ROWS for s in (False, True) for c in (1, 4)}
    for key, x in got.items():
        assert KEYS <= set(x), key
        assert x["rps"] > 0 and x["requests"] > 0, key
        assert x["errors"] == 0 and x["non200"] == 0 and x["valid"], (key, x["first_error"])
        assert len(x["rounds"]) == 1 and x["disturbed"] == 0
        if x["row"] == "direct":
            assert x["added_p50_ms"] == 0 and x["cpu_us_per_req"] is None
        else:
            assert x["cpu_us_per_req"] > 0 and x["added_p50_ms"] is not None
    assert set(doc["ratios"]) >= {"vs_toy_c64", "vs_best_rust_c64"}
    assert doc["ratios"]["vs_toy_c64"] is None  # no c=64 point in this run
    for row in ROWS:
        assert row in r.stdout
