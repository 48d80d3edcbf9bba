"""KV-cache geometry as value types, and the byte regions of blocks.

Theory of operation
-------------------
An engine keeps one KV tensor per attention layer (vLLM hands them to a connector as
``kv_caches: dict[layer_name, Tensor]``). A *block* is ``block_size`` token slots of every
layer. To move a block between engines we need its bytes as ``Region`` s (absolute
address, length) in each layer tensor. The supported layouts, per layer::

    kind        tensor shape                                      segments per block
    cpu         [num_blocks, num_kv_heads, block_size, 2*head_dim]  1  (K, V interleaved)
    flash_nhd   [2, num_blocks, block_size, num_kv_heads, head_dim] 2  (K plane, V plane)
    flash_hnd   [2, num_blocks, num_kv_heads, block_size, head_dim] 2
    mla         [num_blocks, block_size, latent_dim]                1  (no K/V split)

In every layout the block index is the outermost dimension of a *segment* (the whole
tensor, or one of the K/V planes), so one block of one segment of one layer is ONE
contiguous run of ``segment_bytes`` bytes, at::

    layer_addrs[layer] + segment * segment_stride + block_id * block_stride

Rule 1 - region order. ``KVLayout.regions(ids)`` walks layers (in the given order, by
default the engine's order), then segments (K before V), then the *runs* of ``ids``:
maximal stretches of ids that go up by one, in the order given. A run becomes one
region. The order depends only on the geometry and the ids, never on addresses, so two
processes describing the same geometry produce the same sequence.

Rule 2 - pairing. Source and destination ids rarely fragment alike (``[1, 2, 3]`` to
``[7, 9, 10]``), so src region *i* and dst region *i* from two separate ``regions()``
calls need not have equal lengths. ``pair_regions`` walks both id lists together and cuts
a run wherever *either* side stops being consecutive; every pair it returns has equal
lengths, and copying each pair moves block ``src_ids[k]`` into block ``dst_ids[k]``.

Rule 3 - compatibility. Bytes only mean the same thing on both sides when kind, dtype,
block size, heads, head dim and layer count agree; ``num_blocks`` may differ. A
``LayoutFingerprint`` (those fields plus model and TP rank/size) travels in the
handshake; ``check_compatible`` refuses a mismatch naming every differing field, and its
``digest()`` is a SHA-256 of a canonical encoding, stable across processes.

Tensors are read by duck typing (torch tensors, numpy arrays); torch is never imported
here. Layer tensors must be contiguous. Regions do not own memory: the engine keeps the
tensors alive while their regions are registered or in flight.
"""

from __future__ import annotations

import hashlib
import json
import operator
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args

import numpy as np

from pdfabric.errors import LayoutError, ProtocolMismatch
from pdfabric.memory import Region, RegionArray

__all__ = [
    "LayoutKind",
    "LAYOUT_KINDS",
    "KVGeometry",
    "KVLayout",
    "LayoutFingerprint",
    "coalesce_block_ids",
    "pair_regions",
    "pair_columns",
]

LayoutKind = Literal["cpu", "flash_nhd", "flash_hnd", "mla"]
LAYOUT_KINDS: tuple[str, ...] = get_args(LayoutKind)
_TWO_SEGMENT_KINDS = ("flash_nhd", "flash_hnd")
_FINGERPRINT_VERSION = "pdfabric-layout-fingerprint-v1"


def _check_positive(owner: str, **values: Any) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise LayoutError(f"{owner}: {name} must be a positive int, got {value!r}")


@dataclass(frozen=True, slots=True)
class KVGeometry:
    """Shape of an engine's KV cache: what a block is, independent of where it lives.

    For ``mla``, ``head_dim`` is the latent dim and ``num_kv_heads`` is 1.
    """

    kind: LayoutKind
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    element_size: int

    def __post_init__(self) -> None:
        if self.kind not in LAYOUT_KINDS:
            raise LayoutError(f"KVGeometry: kind must be one of {LAYOUT_KINDS}, got {self.kind!r}")
        _check_positive(
            "KVGeometry",
            num_layers=self.num_layers,
            num_blocks=self.num_blocks,
            block_size=self.block_size,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            element_size=self.element_size,
        )
        if not isinstance(self.dtype, str) or not self.dtype:
            raise LayoutError(f"KVGeometry: dtype must be a name like 'bfloat16', got {self.dtype!r}")
        if self.kind == "mla" and self.num_kv_heads != 1:
            raise LayoutError(
                "KVGeometry: mla has one latent per token, num_kv_heads must be 1, "
                f"got {self.num_kv_heads}"
            )

    @property
    def segments_per_block(self) -> int:
        """2 when K and V live in separate planes (flash), else 1."""
        return 2 if self.kind in _TWO_SEGMENT_KINDS else 1

    @property
    def segment_bytes(self) -> int:
        """Bytes of one block within one segment of one layer (one contiguous run)."""
        per_token = self.num_kv_heads * self.head_dim * self.element_size
        return self.block_size * per_token * (2 if self.kind == "cpu" else 1)

    @property
    def block_bytes_per_layer(self) -> int:
        return self.segment_bytes * self.segments_per_block

    @property
    def block_bytes(self) -> int:
        """Bytes of one block across all layers."""
        return self.block_bytes_per_layer * self.num_layers

    @property
    def layer_bytes(self) -> int:
        """Bytes of one layer tensor."""
        return self.block_bytes_per_layer * self.num_blocks

    @property
    def tensor_shape(self) -> tuple[int, ...]:
        """The per-layer tensor shape this geometry describes."""
        nb, bs, h, d = self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim
        if self.kind == "cpu":
            return (nb, h, bs, 2 * d)
        if self.kind == "flash_nhd":
            return (2, nb, bs, h, d)
        if self.kind == "flash_hnd":
            return (2, nb, h, bs, d)
        return (nb, bs, d)

    def mismatches(self, other: KVGeometry, this: str = "src", that: str = "dst") -> list[str]:
        """Fields (except num_blocks) that differ, as ``"name src=.. dst=.."`` strings."""
        out = []
        for f in fields(self):
            if f.name == "num_blocks":
                continue
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a != b:
                out.append(f"{f.name} {this}={a} {that}={b}")
        return out


def coalesce_block_ids(block_ids: Sequence[int]) -> list[tuple[int, int]]:
    """Runs of ids that go up by one, in the order given: ``[3,4,5,9,10] -> [(3,3),(9,2)]``."""
    runs: list[tuple[int, int]] = []
    start = prev = None
    count = 0
    for i in block_ids:
        if prev is not None and i == prev + 1:
            count += 1
        else:
            if start is not None:
                runs.append((start, count))
            start, count = i, 1
        prev = i
    if start is not None:
        runs.append((start, count))
    return runs


@dataclass(frozen=True, slots=True)
class _TensorInfo:
    shape: tuple[int, ...]
    dtype: str
    element_size: int
    addr: int
    contiguous: bool
    device: str


def _tensor_info(name: str, t: Any) -> _TensorInfo:
    """Read shape/dtype/address from a torch tensor or numpy array without importing either."""
    if hasattr(t, "data_ptr") and hasattr(t, "element_size"):  # torch.Tensor
        return _TensorInfo(
            shape=tuple(int(s) for s in t.shape),
            dtype=str(t.dtype).removeprefix("torch."),
            element_size=int(t.element_size()),
            addr=int(t.data_ptr()),
            contiguous=bool(t.is_contiguous()),
            device=str(t.device),
        )
    if hasattr(t, "__array_interface__"):  # numpy.ndarray
        return _TensorInfo(
            shape=tuple(int(s) for s in t.shape),
            dtype=str(t.dtype.name),
            element_size=int(t.itemsize),
            addr=int(t.__array_interface__["data"][0]),
            contiguous=bool(t.flags["C_CONTIGUOUS"]),
            device="cpu",
        )
    raise LayoutError(f"kv_caches[{name!r}]: expected a torch tensor or numpy array, got {type(t).__name__}")


def _flash_kind(shape: tuple[int, ...], kind: str | None, block_size: int | None) -> str:
    """NHD vs HND for a 5-D ``[2, nb, x, y, d]`` tensor: by hint, else NHD."""
    if kind is not None:
        return kind
    if block_size is not None and shape[3] == block_size and shape[2] != block_size:
        return "flash_hnd"
    return "flash_nhd"


def _geometry_from_shape(
    name: str, info: _TensorInfo, num_layers: int, kind: str | None, block_size: int | None
) -> KVGeometry:
    """Infer the geometry of a layer tensor from its shape, honouring hints."""
    shape = info.shape
    expected = {"cpu": 4, "flash_nhd": 5, "flash_hnd": 5, "mla": 3}
    if kind is not None and kind not in expected:
        raise LayoutError(f"unknown layout kind {kind!r}; expected one of {LAYOUT_KINDS}")
    if kind is not None and len(shape) != expected[kind]:
        raise LayoutError(
            f"kv_caches[{name!r}]: kind {kind!r} expects a {expected[kind]}-D tensor, got shape {list(shape)}"
        )
    if len(shape) == 4:
        kind, (nb, h, bs, d2) = "cpu", shape
        if d2 % 2:
            raise LayoutError(
                f"kv_caches[{name!r}]: cpu layout needs an even last dim (2*head_dim), "
                f"got shape {list(shape)}"
            )
        d = d2 // 2
    elif len(shape) == 5 and shape[0] == 2:
        kind = _flash_kind(shape, kind, block_size)
        if kind == "flash_nhd":
            _, nb, bs, h, d = shape
        else:
            _, nb, h, bs, d = shape
    elif len(shape) == 3:
        kind, (nb, bs, d), h = "mla", shape, 1
    else:
        raise LayoutError(
            f"kv_caches[{name!r}]: cannot describe a tensor of shape {list(shape)}; expected "
            "cpu [num_blocks, kv_heads, block_size, 2*head_dim], flash [2, num_blocks, ...5-D], "
            "or mla [num_blocks, block_size, latent_dim]"
        )
    if block_size is not None and bs != block_size:
        raise LayoutError(
            f"kv_caches[{name!r}]: {kind} shape {list(shape)} has block_size {bs}, "
            f"but block_size={block_size} was given"
        )
    return KVGeometry(kind, num_layers, nb, bs, h, d, info.dtype, info.element_size)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class KVLayout:
    """A geometry placed in memory: where each layer tensor lives, and its strides.

    ``block_stride`` is the byte distance between consecutive blocks within one segment;
    ``segment_stride`` the distance between a block's K and V segments (0 with one
    segment). Both default to the dense values of a contiguous tensor.
    Addresses are in this process (device addresses when ``device`` is not ``cpu``).
    """

    geometry: KVGeometry
    layer_names: tuple[str, ...]
    layer_addrs: tuple[int, ...]
    block_stride: int
    segment_stride: int
    device: str = "cpu"

    def __post_init__(self) -> None:
        g = self.geometry
        if len(self.layer_names) != g.num_layers or len(self.layer_addrs) != g.num_layers:
            raise LayoutError(
                f"KVLayout: geometry has {g.num_layers} layers but {len(self.layer_names)} names "
                f"and {len(self.layer_addrs)} addresses were given"
            )
        if len(set(self.layer_names)) != len(self.layer_names):
            raise LayoutError(f"KVLayout: layer names must be unique, got {list(self.layer_names)}")
        for name, addr in zip(self.layer_names, self.layer_addrs):
            if isinstance(addr, bool) or not isinstance(addr, int) or addr <= 0:
                raise LayoutError(f"KVLayout: layer {name!r} has invalid base address {addr!r}")
        if self.block_stride < g.segment_bytes:
            raise LayoutError(
                f"KVLayout: block_stride {self.block_stride} is smaller than a block's "
                f"{g.segment_bytes} bytes"
            )
        self._check_segment_stride()

    def _check_segment_stride(self) -> None:
        g, ss = self.geometry, self.segment_stride
        if g.segments_per_block == 1:
            if ss != 0:
                raise LayoutError(
                    f"KVLayout: {g.kind} has one segment per block; segment_stride must be 0, got {ss}"
                )
            return
        interleaved = g.segment_bytes <= ss and ss + g.segment_bytes <= self.block_stride
        planar = ss >= (g.num_blocks - 1) * self.block_stride + g.segment_bytes
        if not (interleaved or planar):
            raise LayoutError(
                f"KVLayout: segment_stride {ss} makes K and V overlap (block_stride {self.block_stride}, "
                f"{g.segment_bytes} bytes per segment, {g.num_blocks} blocks)"
            )

    # ---- constructors -------------------------------------------------------------

    @classmethod
    def from_geometry(
        cls,
        geometry: KVGeometry,
        layer_addrs: Sequence[int],
        layer_names: Sequence[str] | None = None,
        *,
        block_stride: int | None = None,
        segment_stride: int | None = None,
        device: str = "cpu",
    ) -> KVLayout:
        """Layout of dense tensors at ``layer_addrs`` (names default to ``layer.<i>``)."""
        if layer_names is None:
            layer_names = [f"layer.{i}" for i in range(len(layer_addrs))]
        bs = geometry.segment_bytes if block_stride is None else block_stride
        if segment_stride is None:
            segment_stride = bs * geometry.num_blocks if geometry.segments_per_block == 2 else 0
        return cls(geometry, tuple(layer_names), tuple(layer_addrs), bs, segment_stride, device)

    @classmethod
    def from_kv_caches(
        cls,
        kv_caches: Mapping[str, Any],
        kind: LayoutKind | None = None,
        block_size: int | None = None,
    ) -> KVLayout:
        """Describe vLLM's ``kv_caches`` (layer order kept as given).

        ``kind`` forces a layout (needed to tell flash NHD from HND when block_size equals
        the number of kv heads); ``block_size`` is checked against the shape and also
        disambiguates NHD/HND. Every layer must have the same shape and dtype, be
        contiguous, and live on the same device.
        """
        if not kv_caches:
            raise LayoutError("kv_caches is empty: no layer tensors to describe")
        names = tuple(kv_caches)
        infos = [_tensor_info(n, kv_caches[n]) for n in names]
        first_name, first = names[0], infos[0]
        geometry = _geometry_from_shape(first_name, first, len(names), kind, block_size)
        for name, info in zip(names, infos):
            if not info.contiguous:
                raise LayoutError(
                    f"kv_caches[{name!r}]: tensor is not contiguous; pdfabric needs each layer's KV "
                    "as one dense tensor (check the attention backend's kv cache stride order)"
                )
            for what in ("shape", "dtype", "device"):
                a, b = getattr(info, what), getattr(first, what)
                if a != b:
                    raise LayoutError(
                        f"kv_caches[{name!r}]: {what} {a} differs from {b} of layer {first_name!r}; "
                        "all layers must share one geometry (hybrid KV caches are not supported)"
                    )
        return cls.from_geometry(geometry, [i.addr for i in infos], names, device=first.device)

    # ---- regions ------------------------------------------------------------------

    def _check_ids(self, block_ids: Sequence[int]) -> list[int]:
        try:
            ids = [operator.index(i) for i in block_ids]
        except TypeError as e:
            raise LayoutError(f"block ids must be integers: {e}") from None
        nb = self.geometry.num_blocks
        if ids and (min(ids) < 0 or max(ids) >= nb):
            bad = next(i for i in ids if i < 0 or i >= nb)
            raise LayoutError(
                f"block id {bad} is out of range: this layout has num_blocks={nb} (valid 0..{nb - 1})"
            )
        return ids

    def _check_layers(self, layers: Sequence[int] | None) -> Sequence[int]:
        n = self.geometry.num_layers
        if layers is None:
            return range(n)
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
                raise LayoutError(f"layer index {layer!r} is out of range: this layout has {n} layers")
        return layers

    def _runs(self, ids: list[int]) -> list[tuple[int, int]]:
        """Runs that are contiguous in memory (single blocks when blocks are padded)."""
        if self.dense_blocks:
            return coalesce_block_ids(ids)
        return [(i, 1) for i in ids]

    @property
    def dense_blocks(self) -> bool:
        """True when consecutive blocks of a segment are adjacent in memory."""
        return self.block_stride == self.geometry.segment_bytes

    def segment_bases(self, layers: Sequence[int] | None = None) -> list[int]:
        """Base address of every (layer, segment), in region order."""
        ss, nseg = self.segment_stride, self.geometry.segments_per_block
        return [self.layer_addrs[layer] + s * ss for layer in self._check_layers(layers) for s in range(nseg)]

    def region_array(self, block_ids: Sequence[int], layers: Sequence[int] | None = None) -> RegionArray:
        """The bytes of ``block_ids`` as a ``RegionArray`` (what a grant takes without a
        Python object per block): per layer, per segment, per run of ids adjacent in the given
        order - the same bytes as ``regions``, possibly cut into more pieces."""
        ids = self._check_ids(block_ids)
        runs = _joint_runs(ids, ids, self.dense_blocks, self.dense_blocks).astype(np.uint64)
        bases = np.array(self.segment_bases(layers), dtype=np.uint64)[:, None]
        lengths = runs[:, 2] * np.uint64(self.geometry.segment_bytes)
        return RegionArray(
            (bases + runs[:, 0] * np.uint64(self.block_stride)).reshape(-1),
            np.broadcast_to(lengths, (len(bases), len(runs))).reshape(-1),
        )

    def regions(self, block_ids: Sequence[int], layers: Sequence[int] | None = None) -> list[Region]:
        """Coalesced byte regions of ``block_ids``: per layer, per segment, per run (Rule 1)."""
        runs = self._runs(self._check_ids(block_ids))
        stride, seg = self.block_stride, self.geometry.segment_bytes
        return [
            Region(base + start * stride, count * seg)
            for base in self.segment_bases(layers)
            for start, count in runs
        ]

    def block_regions(self, block_id: int, layer: int | None = None) -> list[Region]:
        """Regions of one block: of one layer (K then V), or of every layer when None."""
        return self.regions([block_id], None if layer is None else [layer])

    def registration_regions(self) -> list[Region]:
        """One region per layer tensor, covering all of it, for ``transport.register``."""
        g = self.geometry
        span = (g.num_blocks - 1) * self.block_stride + g.segment_bytes
        if g.segments_per_block == 2:
            span += self.segment_stride
        return [Region(addr, span) for addr in self.layer_addrs]

    def fingerprint(self, model: str, tp_rank: int = 0, tp_size: int = 1) -> LayoutFingerprint:
        g = self.geometry
        return LayoutFingerprint(
            model=model,
            kind=g.kind,
            dtype=g.dtype,
            block_size=g.block_size,
            num_layers=g.num_layers,
            num_kv_heads=g.num_kv_heads,
            head_dim=g.head_dim,
            tp_rank=tp_rank,
            tp_size=tp_size,
        )


def _joint_runs(src: list[int], dst: list[int], src_dense: bool, dst_dense: bool) -> np.ndarray:
    """(k, 3) int64 runs [src_start, dst_start, count], cut wherever either side stops being
    contiguous (every id its own run unless both layouts are dense)."""
    s, d = np.asarray(src, dtype=np.int64).reshape(-1), np.asarray(dst, dtype=np.int64).reshape(-1)
    if not (src_dense and dst_dense) or len(s) < 2:
        return np.stack([s, d, np.ones_like(s)], axis=1)
    brk = np.ones(len(s), dtype=bool)
    brk[1:] = (s[1:] != s[:-1] + 1) | (d[1:] != d[:-1] + 1)
    idx = np.flatnonzero(brk)
    return np.stack([s[idx], d[idx], np.diff(np.append(idx, len(s)))], axis=1)


def pair_columns(
    src_layout: KVLayout,
    src_ids: Sequence[int],
    dst_layout: KVLayout,
    dst_ids: Sequence[int],
    layers: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``pair_regions`` as three uint64 columns (source addresses, destination addresses,
    lengths), in the same order - what ``TransferPlan.from_arrays`` takes, with no Python
    object per block."""
    diff = src_layout.geometry.mismatches(dst_layout.geometry)
    if diff:
        raise LayoutError("cannot pair regions of incompatible layouts: " + "; ".join(diff))
    if len(src_ids) != len(dst_ids):
        raise LayoutError(
            f"cannot pair {len(src_ids)} source block ids with {len(dst_ids)} destination block ids"
        )
    src, dst = src_layout._check_ids(src_ids), dst_layout._check_ids(dst_ids)
    runs = _joint_runs(src, dst, src_layout.dense_blocks, dst_layout.dense_blocks).astype(np.uint64)
    seg = np.uint64(src_layout.geometry.segment_bytes)
    sst, dstr = np.uint64(src_layout.block_stride), np.uint64(dst_layout.block_stride)
    sb = np.array(src_layout.segment_bases(layers), dtype=np.uint64)[:, None]
    db = np.array(dst_layout.segment_bases(layers), dtype=np.uint64)[:, None]
    shape = (len(sb), len(runs))
    return (
        (sb + runs[:, 0] * sst).reshape(-1),
        (db + runs[:, 1] * dstr).reshape(-1),
        np.broadcast_to(runs[:, 2] * seg, shape).reshape(-1),
    )


def pair_regions(
    src_layout: KVLayout,
    src_ids: Sequence[int],
    dst_layout: KVLayout,
    dst_ids: Sequence[int],
    layers: Sequence[int] | None = None,
) -> list[tuple[Region, Region]]:
    """(src, dst) region pairs of equal length that copy ``src_ids[k]`` into ``dst_ids[k]`` (Rule 2).

    Order: per layer, per segment, per joint run. Raises ``LayoutError`` when the two
    geometries differ in anything but ``num_blocks``, or when the id counts differ.
    """
    s, d, n = pair_columns(src_layout, src_ids, dst_layout, dst_ids, layers)
    return [(Region(a, k), Region(b, k)) for a, b, k in zip(s.tolist(), d.tolist(), n.tolist())]


@dataclass(frozen=True, slots=True)
class LayoutFingerprint:
    """What must agree between a prefill and a decode engine for KV bytes to mean the same.

    Exchanged at handshake. ``num_blocks`` is deliberately absent: engines size their
    caches independently.
    """

    model: str
    kind: LayoutKind
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    tp_rank: int
    tp_size: int

    def __post_init__(self) -> None:
        if self.kind not in LAYOUT_KINDS:
            raise LayoutError(f"LayoutFingerprint: kind must be one of {LAYOUT_KINDS}, got {self.kind!r}")
        _check_positive(
            "LayoutFingerprint",
            block_size=self.block_size,
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            tp_size=self.tp_size,
        )
        rank = self.tp_rank
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.tp_size:
            raise LayoutError(
                f"LayoutFingerprint: tp_rank must be in 0..{self.tp_size - 1}, got {rank!r}"
            )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayoutFingerprint:
        """Inverse of ``as_dict``; unknown or missing keys raise ``ProtocolMismatch``."""
        names = {f.name for f in fields(cls)}
        extra, missing = set(data) - names, names - set(data)
        if extra or missing:
            raise ProtocolMismatch(
                f"layout fingerprint fields differ: unexpected {sorted(extra)}, missing {sorted(missing)}"
            )
        return cls(**data)

    def digest(self) -> str:
        """SHA-256 hex of a canonical encoding; equal across processes and Python runs."""
        payload = json.dumps([_FINGERPRINT_VERSION, self.as_dict()], sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def check_compatible(
        self, other: LayoutFingerprint, local: str = "local", remote: str = "remote"
    ) -> None:
        """Raise ``ProtocolMismatch`` naming every field that differs, with both values."""
        diff = [
            f"{f.name} {local}={getattr(self, f.name)} {remote}={getattr(other, f.name)}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]
        if diff:
            raise ProtocolMismatch(
                "layout mismatch: " + "; ".join(diff) + " - both engines must serve the same model with the "
                "same dtype, block size, attention backend and tensor-parallel layout"
            )
