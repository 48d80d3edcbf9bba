"""Joint choice of the (prefill, decode) pair for one request. Pure: no I/O.

- ``round_robin``: each role in turn.
- ``least_loaded``: fewest in-flight prompt tokens, then fewest in-flight requests.
- ``prefix_aware``: the prefill instance that most recently computed the longest run of
  the prompt's leading chunks (chunk hashes chained like the KV cache's block hashes),
  load as tie-breaker; decode by load.

Conditional disaggregation: a prompt shorter than ``disaggregate_min_tokens`` (estimated),
or a deployment without a usable prefill engine, goes to a decode engine alone.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from dataclasses import dataclass
from typing import Any, Literal

from pdfabric.proxy.instances import Instance

__all__ = ["Choice", "Router", "estimate_tokens", "chunk_hashes"]

CHUNK_TOKENS = 256
_CHARS_PER_TOKEN = 4
_MAX_RECENT = 4096


def estimate_tokens(prompt: Any) -> int:
    """Prompt tokens: exact for token-id prompts, ~4 characters per token for text."""
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return len(prompt)
    if isinstance(prompt, list):
        return sum(estimate_tokens(p) for p in prompt)
    if isinstance(prompt, str):
        return max(1, len(prompt) // _CHARS_PER_TOKEN)
    return 1


def chunk_hashes(prompt: Any, limit: int = 64) -> list[bytes]:
    """Chained hashes of the prompt's leading chunks (token ids, or text at ~4 chars/token)."""
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        data = b"".join(int(t).to_bytes(4, "little", signed=True) for t in prompt)
        step = CHUNK_TOKENS * 4
    elif isinstance(prompt, str):
        data, step = prompt.encode("utf-8", "surrogatepass"), CHUNK_TOKENS * _CHARS_PER_TOKEN
    else:
        return []
    out, prev = [], b""
    for i in range(0, min(len(data), step * limit) - step + 1, step):
        prev = hashlib.blake2b(prev + data[i:i + step], digest_size=16).digest()
        out.append(prev)
    return out


@dataclass(frozen=True)
class Choice:
    decode: Instance
    prefill: Instance | None  # None: decode alone


class Router:
    def __init__(self, policy: Literal["round_robin", "least_loaded", "prefix_aware"], min_tokens: int = 0) -> None:
        self.policy = policy
        self.min_tokens = min_tokens
        self._rr = itertools.count()

    def choose(self, prefills: list[Instance], decodes: list[Instance], tokens: int,
               hashes: list[bytes], exclude: frozenset[str] = frozenset()) -> Choice | None:
        decodes = [d for d in decodes if d.name not in exclude]
        if not decodes:
            return None
        prefills = [p for p in prefills if p.name not in exclude]
        turn = next(self._rr)
        if self.policy == "round_robin":
            d = decodes[turn % len(decodes)]
        else:
            d = min(decodes, key=_load)
        if tokens < self.min_tokens or not prefills:
            return Choice(d, None)
        pool = [p for p in prefills if p is not d]
        if not pool:  # a single "both" instance: it prefills for itself
            pool = prefills
        if self.policy == "round_robin":
            p = pool[turn % len(pool)]
        elif self.policy == "least_loaded":
            p = min(pool, key=_load)
        else:
            p = min(pool, key=lambda i: (-_prefix_run(i, hashes), _load(i)))
        return Choice(d, p)

    @staticmethod
    def remember(inst: Instance, hashes: list[bytes]) -> None:
        if not hashes:
            return
        now = time.monotonic()
        for h in hashes:
            inst.recent[h] = now
        while len(inst.recent) > _MAX_RECENT:
            inst.recent.pop(next(iter(inst.recent)))


def _load(i: Instance) -> tuple[int, int]:
    return (i.in_flight_tokens, i.in_flight)


def _prefix_run(i: Instance, hashes: list[bytes]) -> int:
    n = 0
    for h in hashes:
        if h not in i.recent:
            break
        n += 1
    return n
