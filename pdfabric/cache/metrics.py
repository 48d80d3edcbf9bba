"""Prometheus text for the tiered cache, written by hand: no registry, no locks.

Per tier (label ``tier``): hits, misses, corrupt, errors, evictions, stores, rejected
(counters), bytes read/written (counters), entries, bytes used, capacity, pinned
(gauges). For the cache: looked-up and hit tokens, the token hit ratio, promotions,
admission refusals and the write-behind queue.
"""

from __future__ import annotations

from pdfabric.cache.tiered import CacheStats

__all__ = ["render", "render_metrics"]

_TIER_COUNTERS = (
    ("hits", "hits_total", "Chunks found"),
    ("misses", "misses_total", "Chunks not found"),
    ("corrupt", "corrupt_total", "Chunks that failed their checksum and were dropped"),
    ("errors", "errors_total", "Backend failures (timeouts, connection errors, I/O errors)"),
    ("evictions", "evictions_total", "Chunks evicted to make room"),
    ("stores", "stores_total", "Chunks stored"),
    ("rejected", "rejected_total", "Chunks refused (too large, no space)"),
    ("bytes_read", "read_bytes_total", "Bytes served"),
    ("bytes_written", "written_bytes_total", "Bytes stored"),
)
_TIER_GAUGES = (
    ("entries", "entries", "Chunks held (local tiers)"),
    ("bytes_used", "used_bytes", "Bytes held (local tiers)"),
    ("capacity_bytes", "capacity_bytes", "Capacity (local tiers)"),
    ("pinned", "pinned", "Chunks pinned by readers or writers"),
)
_CACHE = (
    ("lookup_tokens", "lookup_tokens_total", "counter", "Prompt tokens looked up"),
    ("hit_tokens", "hit_tokens_total", "counter", "Prompt tokens found cached"),
    ("promotions", "promotions_total", "counter", "Chunks copied up into the first tier on a hit below it"),
    ("not_admitted", "not_admitted_total", "counter", "Chunks refused by the admission rule"),
    ("write_behind_queued", "write_behind_queued_total", "counter", "Chunks queued for slower tiers"),
    ("write_behind_dropped", "write_behind_dropped_total", "counter", "Chunks dropped: write-behind queue full"),
    ("write_behind_errors", "write_behind_errors_total", "counter", "Write-behind jobs that raised"),
    ("write_behind_pending", "write_behind_pending", "gauge", "Write-behind jobs not yet written"),
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(stats: CacheStats, prefix: str = "pdfabric_cache") -> str:
    """Text exposition format 0.0.4 of ``TieredCache.stats()``."""
    lines: list[str] = []
    for kinds, mtype in ((_TIER_COUNTERS, "counter"), (_TIER_GAUGES, "gauge")):
        for attr, suffix, help_text in kinds:
            name = f"{prefix}_{suffix}"
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {mtype}"]
            for t in stats.tiers:
                labels = f'tier="{_escape(t.name)}",kind="{_escape(t.kind)}"'
                lines.append(f"{name}{{{labels}}} {getattr(t, attr)}")
    for attr, suffix, mtype, help_text in _CACHE:
        name = f"{prefix}_{suffix}"
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {mtype}", f"{name} {getattr(stats, attr)}"]
    name = f"{prefix}_token_hit_ratio"
    lines += [
        f"# HELP {name} Hit tokens over looked-up tokens since start",
        f"# TYPE {name} gauge",
        f"{name} {stats.token_hit_ratio:.6f}",
    ]
    return "\n".join(lines) + "\n"


render_metrics = render
