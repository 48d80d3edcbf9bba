"""The environment the launcher gives engines: the compile-cache work-around on cpu only,
and never over a value the user chose."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdfabric.config import load_topology
from pdfabric.launch.plan import build_plan

ROOT = Path(__file__).resolve().parents[2]


def _engine_envs(platform: str, topo_file: Path = ROOT / "configs" / "cpu-1p1d-tcp.yaml") -> list[dict[str, str]]:
    topo = load_topology(topo_file)
    plan = build_plan(topo, topo_file, Path("/models/m"), platform)  # type: ignore[arg-type]
    return [p.env for p in plan if p.kind == "engine"]


def test_cpu_engines_use_the_compile_cache_that_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_USE_AOT_COMPILE", raising=False)
    envs = _engine_envs("cpu")
    assert len(envs) == 2 and all(e["VLLM_USE_AOT_COMPILE"] == "0" for e in envs)
    assert all("VLLM_USE_AOT_COMPILE" not in e for e in _engine_envs("cuda"))


def test_a_value_the_user_exported_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_USE_AOT_COMPILE", "1")
    assert all("VLLM_USE_AOT_COMPILE" not in e for e in _engine_envs("cpu"))  # the launcher's own env is passed on


def test_an_instance_env_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import yaml

    monkeypatch.delenv("VLLM_USE_AOT_COMPILE", raising=False)
    data = yaml.safe_load((ROOT / "configs" / "cpu-1p1d-tcp.yaml").read_text())
    data["instances"][0]["env"] = {"VLLM_USE_AOT_COMPILE": "1"}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(data))
    envs = _engine_envs("cpu", tmp_path / "t.yaml")
    assert [e["VLLM_USE_AOT_COMPILE"] for e in envs] == ["1", "0"]
