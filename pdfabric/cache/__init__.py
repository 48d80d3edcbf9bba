"""Shared tiered KV cache: chunk keys, tiers (memory, disk, redis, s3) and their policy.

Modules, one role each::

    keys         ChunkKeyer, chunk_keys       deterministic prefix chain of chunk keys
    checksum     checksum64                   fast integrity check of stored chunks
    tier         CacheTier + outcome enums    the interface every tier implements
    memory_tier  MemoryTier                   L1: one (pinned) arena of fixed slots
    disk_tier    DiskTier                     L2: one verified file per chunk
    redis_tier   RedisTier                    L3: Redis/Valkey, values in parts
    s3_tier      S3Tier                       L3: S3-compatible object store
    breaker      Breaker                      bounded, quiet failure of remote tiers
    tiered       TieredCache                  fastest-first tiers, promotion, write-behind
    metrics      render_metrics               Prometheus text

The Redis and S3 tiers import redis-py / boto3 (the ``cache`` extra) only when used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pdfabric.cache.checksum import checksum64
from pdfabric.cache.disk_tier import DiskTier
from pdfabric.cache.keys import (
    DEFAULT_CHUNK_TOKENS,
    KEY_BYTES,
    ChunkKey,
    ChunkKeyer,
    check_chunk_tokens,
    chunk_bytes_of,
    chunk_keys,
    key_hex,
)
from pdfabric.cache.memory_tier import MemoryTier
from pdfabric.cache.metrics import render as render_metrics
from pdfabric.cache.tier import (
    CacheTier,
    GetOutcome,
    GetResult,
    PutOutcome,
    ReadLease,
    TierCapabilities,
    TierStats,
    WriteLease,
)
from pdfabric.cache.tiered import CacheRead, CacheStats, TieredCache

if TYPE_CHECKING:
    from pdfabric.cache.redis_tier import RedisTier
    from pdfabric.cache.s3_tier import S3Tier

__all__ = [
    "DEFAULT_CHUNK_TOKENS",
    "KEY_BYTES",
    "CacheRead",
    "CacheStats",
    "CacheTier",
    "ChunkKey",
    "ChunkKeyer",
    "DiskTier",
    "GetOutcome",
    "GetResult",
    "MemoryTier",
    "PutOutcome",
    "ReadLease",
    "RedisTier",
    "S3Tier",
    "TierCapabilities",
    "TierStats",
    "TieredCache",
    "WriteLease",
    "check_chunk_tokens",
    "checksum64",
    "chunk_bytes_of",
    "chunk_keys",
    "key_hex",
    "render_metrics",
]


def __getattr__(name: str) -> Any:
    if name == "RedisTier":
        from pdfabric.cache.redis_tier import RedisTier

        return RedisTier
    if name == "S3Tier":
        from pdfabric.cache.s3_tier import S3Tier

        return S3Tier
    raise AttributeError(f"module 'pdfabric.cache' has no attribute {name!r}")
