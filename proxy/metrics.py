"""Prometheus text for the proxy (``/metrics``), written by hand: no registry, no locks."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pdfabric.proxy.server import Proxy

__all__ = ["render"]


def render(proxy: "Proxy") -> str:
    c, s = proxy.stats.counters, proxy.stats.seconds
    lines = [
        "# TYPE pdfabric_proxy_requests_total counter",
        f"pdfabric_proxy_requests_total {c['requests']}",
        "# TYPE pdfabric_proxy_errors_total counter",
    ]
    lines += [f'pdfabric_proxy_errors_total{{code="{k[7:]}"}} {v}' for k, v in sorted(c.items()) if k.startswith("errors_")]
    lines += [
        "# TYPE pdfabric_proxy_prefill_failures_total counter",
        f"pdfabric_proxy_prefill_failures_total {c['prefill_failures']}",
        "# TYPE pdfabric_proxy_prefill_failures_late_total counter",
        f"pdfabric_proxy_prefill_failures_late_total {c['prefill_failures_late']}",
        "# TYPE pdfabric_proxy_decode_failures_total counter",
        f"pdfabric_proxy_decode_failures_total {c['decode_failures']}",
        "# TYPE pdfabric_proxy_streams_broken_total counter",
        f"pdfabric_proxy_streams_broken_total {c['streams_broken']}",
        "# TYPE pdfabric_proxy_decode_alone_total counter",
        f'pdfabric_proxy_decode_alone_total{{reason="policy"}} {c["decode_alone"]}',
        f'pdfabric_proxy_decode_alone_total{{reason="prefill_failed"}} {c["decode_alone_after_failure"]}',
        f'pdfabric_proxy_decode_alone_total{{reason="cached"}} {c["decode_alone_cached"]}',
        f'pdfabric_proxy_decode_alone_total{{reason="no_prefill"}} {c["decode_alone_no_prefill"]}',
        "# TYPE pdfabric_proxy_leg_seconds summary",
        f'pdfabric_proxy_leg_seconds_sum{{leg="prefill"}} {s["prefill"]:.6f}',
        f'pdfabric_proxy_leg_seconds_count{{leg="prefill"}} {c["prefill_n"]}',
        f'pdfabric_proxy_leg_seconds_sum{{leg="decode_first_byte"}} {s["decode_first_byte"]:.6f}',
        f'pdfabric_proxy_leg_seconds_count{{leg="decode_first_byte"}} {c["decode_first_byte_n"]}',
        "# TYPE pdfabric_proxy_instance_up gauge",
    ]
    instances = proxy.registry.all()
    for i in instances:
        labels = f'instance="{i.name}",role="{i.role}"'
        lines.append(f"pdfabric_proxy_instance_up{{{labels}}} {int(i.healthy and not i.draining)}")
    lines.append("# TYPE pdfabric_proxy_instance_in_flight gauge")  # a family's samples stay together
    for i in instances:
        lines.append(f'pdfabric_proxy_instance_in_flight{{instance="{i.name}",role="{i.role}"}} {i.in_flight}')
    if proxy.cache is not None:
        lines += _cache_lines(proxy)
    return "\n".join(lines) + "\n"


# outcomes of a request's cache lookup (cache_view.py), each counted as cache_<outcome>
_LOOKUP_OUTCOMES = ("alone", "paired", "short", "failed", "no_keying", "untokenized", "tokenize_failed")


def _cache_lines(proxy: Proxy) -> list[str]:
    c, s = proxy.stats.counters, proxy.stats.seconds
    cache = proxy.cache
    assert cache is not None
    lines = ["# TYPE pdfabric_proxy_cache_lookups_total counter"]
    lines += [f'pdfabric_proxy_cache_lookups_total{{outcome="{k}"}} {c["cache_" + k]}' for k in _LOOKUP_OUTCOMES]
    return lines + [
        "# TYPE pdfabric_proxy_cache_hit_tokens_total counter",
        f"pdfabric_proxy_cache_hit_tokens_total {c['cache_hit_tokens']}",
        "# TYPE pdfabric_proxy_cache_lookup_seconds summary",
        f"pdfabric_proxy_cache_lookup_seconds_sum {s['cache_lookup']:.6f}",
        f"pdfabric_proxy_cache_lookup_seconds_count {c['cache_lookup_n']}",
        "# TYPE pdfabric_proxy_cache_keying_known gauge",
        f"pdfabric_proxy_cache_keying_known {int(cache.keying is not None)}",
        "# TYPE pdfabric_proxy_cache_health_errors_total counter",
        f"pdfabric_proxy_cache_health_errors_total {c['cache_health_errors']}",
    ]
