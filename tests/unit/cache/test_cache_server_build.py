"""The cache server's tiers, built at the first engine's hello: a build that fails part way
gives back what it made and leaves the server able to build again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pdfabric.cache import tiered
from pdfabric.cache.server import CacheService
from pdfabric.config.models import CacheConfig
from pdfabric.errors import ConfigError

CHUNK = 256 * 1024


def _service(tmp_path: Path, port: int = 0) -> CacheService:
    cfg = CacheConfig.model_validate({"tiers": [
        {"kind": "memory", "size": "8MiB"},
        {"kind": "disk", "path": str(tmp_path / "l2"), "size": "64MiB"},
        {"kind": "redis", "url": "redis://127.0.0.1:9/0"},
    ]})
    return CacheService(cfg, port=port, http_port=None, shm_dir=tmp_path)


def test_a_build_that_fails_after_the_disk_tier_can_be_made_again(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    svc = _service(tmp_path)
    real = tiered.build_tier

    def failing(spec: Any, *args: Any) -> Any:
        if spec.kind == "redis":
            raise ImportError("redis is not installed")
        return real(spec, *args)

    try:
        svc._check_disk_tiers()
        assert set(svc._disk_locks) == {1}  # held from start
        monkeypatch.setattr(tiered, "build_tier", failing)
        with pytest.raises(ImportError):
            svc._build(CHUNK)
        assert svc.arena is None and svc.cache is None
        assert not list(tmp_path.glob("pdfabric-cache-*"))  # the arena file went with it
        assert set(svc._disk_locks) == {1}  # the directory is ours again, not the half-built tier's
        rival = _service(tmp_path)
        try:
            with pytest.raises(ConfigError, match="in use by another cache"):
                rival._check_disk_tiers()  # still held: another server is refused
        finally:
            rival.stop()
        monkeypatch.setattr(tiered, "build_tier", real)
        svc._build(CHUNK)  # the next hello builds it all
        assert svc.cache is not None and svc._disk_locks == {}
    finally:
        svc.stop()
    other = _service(tmp_path)
    try:
        other._check_disk_tiers()  # stopped: the directory is free
    finally:
        other.stop()
