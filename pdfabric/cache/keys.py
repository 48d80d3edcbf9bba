"""Chunk keys: a deterministic prefix chain over token ids.

Theory of operation
-------------------
A prompt's token ids are cut into chunks of ``chunk_tokens`` tokens; only full chunks
get a key (a trailing partial chunk is never cached). Keys chain, so a key names a chunk
*and everything before it*::

    seed    = SHA-256("pdfabric-chunk-key-v1" | len | fingerprint | len | salt)[:16]
    key_0   = SHA-256(seed    | tokens of chunk 0 | fingerprint)[:16]
    key_i   = SHA-256(key_i-1 | tokens of chunk i | fingerprint)[:16]

Rule 1 - determinism. Token ids are encoded as little-endian uint32 and strings as
UTF-8; nothing depends on ``PYTHONHASHSEED``, the platform or the process, so every
engine, cache server and proxy computes the same keys.

Rule 2 - prefix property. The keys of a prefix of a token list are a prefix of the keys
of the whole list, which is what lets a lookup stop at the first missing chunk.

Rule 3 - isolation. The fingerprint (model and KV layout, e.g.
``LayoutFingerprint.digest()``) and an optional tenant salt seed the chain, so two
models, layouts or tenants never share a key; the fingerprint is also mixed into every
step. Keys are 128 bits: collisions are not a practical concern.

Rule 4 - what the tokens do not say. A request's own salt (vLLM's ``cache_salt``) seeds
its chain anew, ``seed' = SHA-256(seed | "request-salt" | len | salt)[:16]``, and content
that hides behind placeholder tokens (an image, an audio clip: the same placeholder ids
for every image) is named by *extras*, ``(token position, identifier)`` pairs: a chunk
holding the position of an extra mixes ``len | identifier`` of each into its step, and the
chain carries it into every later chunk. With neither, keys are exactly as above.

``chunk_tokens`` must be a positive multiple of the engine's block size, so a chunk is a
whole number of KV blocks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NewType

import numpy as np

if TYPE_CHECKING:
    from pdfabric.layout import KVGeometry, LayoutFingerprint

__all__ = [
    "DEFAULT_CHUNK_TOKENS",
    "KEY_BYTES",
    "ChunkKey",
    "ChunkKeyer",
    "check_chunk_tokens",
    "chunk_bytes_of",
    "chunk_keys",
    "key_hex",
]

ChunkKey = NewType("ChunkKey", bytes)
"""16 bytes naming one chunk of KV and its whole prefix."""

KEY_BYTES = 16
DEFAULT_CHUNK_TOKENS = 256
_VERSION = b"pdfabric-chunk-key-v1"
_U32_MAX = 2**32 - 1


def key_hex(key: bytes) -> str:
    """The 32-character lowercase hex form used for storage names (files, Redis, S3)."""
    return key.hex()


def check_chunk_tokens(chunk_tokens: int, block_size: int | None = None) -> int:
    """Return ``chunk_tokens`` if it is positive and a multiple of ``block_size``, else raise."""
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    if block_size is not None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if chunk_tokens % block_size:
            lower = max(block_size, chunk_tokens // block_size * block_size)
            raise ValueError(
                f"chunk_tokens={chunk_tokens} is not a multiple of the engine block size "
                f"{block_size}; a chunk must be whole KV blocks - use {lower} or "
                f"{lower + block_size} (cache.chunk_tokens in the topology)"
            )
    return chunk_tokens


def chunk_bytes_of(geometry: KVGeometry, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> int:
    """Bytes of one chunk: ``chunk_tokens`` tokens of KV in every layer of ``geometry``."""
    check_chunk_tokens(chunk_tokens, geometry.block_size)
    return chunk_tokens // geometry.block_size * geometry.block_bytes


def _fingerprint_text(fingerprint: str | LayoutFingerprint) -> str:
    if isinstance(fingerprint, str):
        if not fingerprint:
            raise ValueError("fingerprint must be a non-empty string (model and KV layout)")
        return fingerprint
    return fingerprint.digest()


def _salt_bytes(salt: str | bytes | None) -> bytes:
    if salt is None:
        return b""
    return salt.encode("utf-8") if isinstance(salt, str) else bytes(salt)


def _token_bytes(token_ids: Sequence[int] | np.ndarray, n: int) -> bytes:
    """The first ``n`` token ids as little-endian uint32 bytes; raises on ids out of range."""
    arr = np.asarray(token_ids[:n])
    if arr.ndim != 1:
        raise ValueError(f"token ids must be a flat sequence, got shape {list(arr.shape)}")
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > _U32_MAX):
        bad = next(int(t) for t in arr.tolist() if t < 0 or t > _U32_MAX)
        raise ValueError(f"token id {bad} is outside 0..{_U32_MAX}")
    return arr.astype("<u4", copy=False).tobytes()


@dataclass(frozen=True)
class ChunkKeyer:
    """Computes chunk keys for one model/layout fingerprint (and optional tenant salt).

    Immutable and thread-safe; cheap to keep one per engine.
    """

    fingerprint: str
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    block_size: int | None = None
    salt: bytes = b""
    _fp: bytes = field(init=False, repr=False, compare=False)
    _seed: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_chunk_tokens(self.chunk_tokens, self.block_size)
        fp = _fingerprint_text(self.fingerprint).encode("utf-8")
        salt = _salt_bytes(self.salt)
        seed = hashlib.sha256(
            _VERSION + len(fp).to_bytes(4, "little") + fp + len(salt).to_bytes(4, "little") + salt
        ).digest()[:KEY_BYTES]
        object.__setattr__(self, "_fp", fp)
        object.__setattr__(self, "_seed", seed)

    @classmethod
    def create(
        cls,
        fingerprint: str | LayoutFingerprint,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        *,
        block_size: int | None = None,
        salt: str | bytes | None = None,
    ) -> ChunkKeyer:
        """Accepts a ``LayoutFingerprint`` (its ``digest()`` is used) and a str salt."""
        return cls(_fingerprint_text(fingerprint), chunk_tokens, block_size, _salt_bytes(salt))

    def num_chunks(self, num_tokens: int) -> int:
        """How many full chunks ``num_tokens`` tokens make."""
        return num_tokens // self.chunk_tokens

    def keys(
        self,
        token_ids: Sequence[int] | np.ndarray,
        *,
        salt: str | bytes | None = None,
        extras: Sequence[tuple[int, bytes]] = (),
    ) -> list[ChunkKey]:
        """Keys of every full chunk of ``token_ids``, in order (the prefix chain); ``salt``
        and ``extras`` as Rule 4 says."""
        n = self.num_chunks(len(token_ids)) * self.chunk_tokens
        data = _token_bytes(token_ids, n)
        step = self.chunk_tokens * 4
        prev, fp, out = self._seed, self._fp, []
        if salt:
            b = _salt_bytes(salt)
            prev = hashlib.sha256(prev + b"request-salt" + len(b).to_bytes(4, "little") + b).digest()[:KEY_BYTES]
        mixed: dict[int, bytes] = {}
        for pos, ident in sorted(extras):
            if pos < 0:
                raise ValueError(f"extra at token position {pos}: positions are >= 0")
            c = pos // self.chunk_tokens
            mixed[c] = mixed.get(c, b"") + len(ident).to_bytes(4, "little") + ident
        for c, off in enumerate(range(0, len(data), step)):
            prev = hashlib.sha256(prev + data[off : off + step] + fp + mixed.get(c, b"")).digest()[:KEY_BYTES]
            out.append(ChunkKey(prev))
        return out


def chunk_keys(
    token_ids: Sequence[int] | np.ndarray,
    *,
    fingerprint: str | LayoutFingerprint,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    block_size: int | None = None,
    salt: str | bytes | None = None,
) -> list[ChunkKey]:
    """Keys of the full chunks of ``token_ids``; see the module docstring for the chain."""
    keyer = ChunkKeyer.create(fingerprint, chunk_tokens, block_size=block_size, salt=salt)
    return keyer.keys(token_ids)
