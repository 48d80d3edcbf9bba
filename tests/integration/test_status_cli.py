"""``pdfabric status`` against a running proxy (fake engines behind it)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Callable

import pytest

from proxy_harness import Stack

pytestmark = [pytest.mark.integration]


def status(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pdfabric.cli", "status", *args], capture_output=True, text=True,
                          timeout=60, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})


def test_status_lists_instances_health_and_load(make_stack: Callable[..., Stack]) -> None:
    s = make_stack(prefills=1, decodes=1)
    assert s.complete().status_code == 200
    r = status(s.url, "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    names = {i["name"]: i for i in data["instances"]}
    assert len(names) == 2 and all(i["healthy"] for i in names.values())
    assert sum(i["served"] for i in names.values()) >= 1
    assert "pdfabric_proxy_requests_total 1" in data["metrics"]
    table = status(s.url)
    assert table.returncode == 0 and "pdfabric status" in table.stdout and "up" in table.stdout


def test_status_without_a_proxy_says_so() -> None:
    r = status("http://127.0.0.1:9")
    assert r.returncode == 1 and "cannot read the proxy at http://127.0.0.1:9" in r.stderr
