"""The in-process cache mode: tiers built in the engine's own process, no cache server.

vLLM's scheduler and worker share one process when the engine runs one worker (the uniproc
executor, tensor parallel size 1), so both sides of the connector reach the same cache
object through this module. Nothing survives the process except what the disk, Redis and
S3 tiers hold; use ``pdfabric cache-server`` to share a cache between engines.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from pdfabric.cache.client import LocalCacheClient

if TYPE_CHECKING:
    from pdfabric.connector.settings import CacheSettings

__all__ = ["local_client"]

_lock = threading.Lock()
_clients: dict[tuple[str, int], LocalCacheClient] = {}


def local_client(settings: "CacheSettings", chunk_bytes: int) -> LocalCacheClient:
    """The process's cache for these tiers and chunk size (built on first use)."""
    from pdfabric.cache.tiered import TieredCache

    assert settings.tiers is not None
    key = (repr(settings.tiers), chunk_bytes)
    with _lock:
        client = _clients.get(key)
        if client is None:
            cache = TieredCache.from_tiers(list(settings.tiers), chunk_bytes)
            client = _clients[key] = LocalCacheClient(cache, chunk_bytes, settings.chunk_tokens)
        return client
