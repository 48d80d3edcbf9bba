"""The topology example in docs/topology.md is a valid topology (docs move with the code)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pdfabric.config.loader import parse_topology

DOC = Path(__file__).resolve().parents[2] / "docs" / "topology.md"


def test_topology_doc_example_validates(monkeypatch: pytest.MonkeyPatch) -> None:
    text = DOC.read_text(encoding="utf-8")
    block = re.search(r"```yaml\n(.*?)```", text, re.S)
    assert block is not None, "docs/topology.md lost its YAML example"
    for name in ("PDFABRIC_SECRET", "PDFABRIC_API_KEYS", "REDIS_PASSWORD", "S3_KEY", "S3_SECRET"):
        monkeypatch.setenv(name, "x")
    topo = parse_topology(block.group(1), source=str(DOC), check_secrets=True)
    assert [i.name for i in topo.instances] == ["prefill-0", "decode-0"]
    assert topo.transport_for("prefill-0", "decode-0") == topo.transport
