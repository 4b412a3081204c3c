"""What a cache really holds in memory (:func:`cache_nbytes`) and what its layout needs
(:func:`ideal_kv_nbytes`): bytes a vector read from the ``CodeLayout``, never re-derived from bits."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, LinearAttentionCacheLayerMixin

from turboquant.cache.codec import _SHARED_H, _SHARED_S
from turboquant.cache.layers import ExactLayer, TurboQuantLayer
from turboquant.cache.settings import SHARED
from turboquant.layout import build_layout, parse_layout
from turboquant.quantizer import NORM_DTYPE

if TYPE_CHECKING:
    from turboquant.cache.model_cache import TurboQuantCache

@dataclass
class MemoryReport:
    """Bytes a cache holds. ``pinned``: storage really kept alive (whole buffers, deduplicated);
    ``used``: the valid part. Categories: ``codes`` (incl. QJL planes), ``norms`` (incl. residual
    norms), ``residual`` (full-precision window), ``exact_kv`` (uncompressed attention layers),
    ``linear_state`` (conv / recurrent states of linear-attention layers), ``metadata`` (every other
    per-layer tensor the stores keep alive: rotation signs or the dense ``Π`` with its cached copies,
    codebook tensors, kernel tables). ``shared_tables`` (centroid lookup tables, the QJL matrix ``S``) are held once
    per process for every cache of the same widths, whatever the number of tokens: reported, but
    not part of ``total_*``."""

    used: dict[str, int] = field(default_factory=dict)
    pinned: dict[str, int] = field(default_factory=dict)
    # pinned bytes per device (``"cuda:0"``, ``"cpu"``, ...; shared tables excluded): where a model
    # is spread over devices (``device_map``), each layer's stores live on its layer's device
    by_device: dict[str, int] = field(default_factory=dict)

    @property
    def total_used(self) -> int:
        return sum(v for k, v in self.used.items() if k != SHARED)

    @property
    def total_pinned(self) -> int:
        return sum(v for k, v in self.pinned.items() if k != SHARED)

    def kv_pinned(self) -> int:
        """Pinned bytes of the attention KV (everything but the linear-attention state)."""
        return self.total_pinned - self.pinned.get("linear_state", 0)

    def as_dict(self) -> dict:
        return {"used": dict(self.used), "pinned": dict(self.pinned), "by_device": dict(self.by_device),
                "total_used": self.total_used, "total_pinned": self.total_pinned}


class _Tally:
    def __init__(self) -> None:
        self.report = MemoryReport()
        self._seen: set[int] = set()

    def add(self, cat: str, t: torch.Tensor | None, used: int | None = None) -> None:
        """Count ``t`` once: ``used`` bytes (default: its elements) and its whole storage as pinned."""
        if t is None:
            return
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self._seen:  # shared tables, views of one buffer: counted once
            return
        if ptr:
            self._seen.add(ptr)
        self.report.used[cat] = self.report.used.get(cat, 0) + (t.numel() * t.element_size() if used is None else used)
        self.report.pinned[cat] = self.report.pinned.get(cat, 0) + storage.nbytes()
        if cat != SHARED:
            dev = str(t.device)
            self.report.by_device[dev] = self.report.by_device.get(dev, 0) + storage.nbytes()


def _held_tensors(root: Any) -> Iterator[torch.Tensor]:
    """Every tensor reachable from ``root`` through this package's objects, dataclasses, dicts,
    lists and tuples (what a codec or a store keeps alive besides its code buffers)."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif type(obj).__module__.startswith("turboquant") and hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())


def _shared_storages() -> set[int]:
    """Storages of the process-wide tables every layer/cache of the same width shares (QJL ``S``,
    Sylvester ``H``, centroid lookup tables): reported as ``shared_tables``."""
    from turboquant.attention import _TABLES
    from turboquant.layout import SHARED_DENSE

    tables = [*_SHARED_S.values(), *_SHARED_H.values(), *_TABLES.values(), *SHARED_DENSE.values()]
    return {t.untyped_storage().data_ptr() for t in _held_tensors(tables)}


def cache_nbytes(cache: Cache) -> MemoryReport:
    """Memory report of a ``TurboQuantCache`` or any transformers ``Cache`` (e.g. ``DynamicCache``)."""
    tally = _Tally()
    for layer in cache.layers:
        if isinstance(layer, TurboQuantLayer):
            if not layer.is_initialized:
                continue
            shared = _shared_storages()
            for store in (layer.key_store, layer.value_store):
                used = store.used_nbytes()
                tally.add("codes", store.codes, used.get("codes", 0))
                tally.add("codes", store.qjl, used.get("qjl", 0))
                tally.add("norms", store.norms, used.get("norms", 0))
                tally.add("norms", store.rnorms, used.get("rnorms", 0))
                tally.add("outlier_index", store.outliers)
                # everything else the store keeps alive: rotation signs or dense Π (and the copies
                # its rotation caches per device), codebook tensors, kernel tables (Π, Π^T, LUTs)
                for t in _held_tensors((store.codec, store.engine)):
                    tally.add(SHARED if t.untyped_storage().data_ptr() in shared else "metadata", t)
            if layer._rk is not None:
                per_tok = layer._rk[:, :, :1].numel() * layer._rk.element_size()
                tally.add("residual", layer._rk, per_tok * layer._r)
                tally.add("residual", layer._rv, per_tok * layer._r)
            continue
        if isinstance(layer, LinearAttentionCacheLayerMixin):
            for states in (layer.conv_states, layer.recurrent_states):
                for t in states.values():
                    tally.add("linear_state", t)
        if isinstance(layer, CacheLayerMixin) and getattr(layer, "is_initialized", False):
            for t in (layer.keys, layer.values):
                if isinstance(t, torch.Tensor):
                    tally.add("exact_kv", t)
    return tally.report


def ideal_kv_nbytes(cache: TurboQuantCache, tokens: int, batch: int = 1) -> int:
    """Bytes the layout needs for ``tokens`` tokens: per compressed vector packed codes + 16-bit
    norm(s) (+ QJL plane); exact layers at 2 bytes a coordinate (bf16). No window, no metadata."""
    s, sh = cache.settings, cache.shape
    total = 0
    for layer in cache.layers:
        if isinstance(layer, TurboQuantLayer):
            for kind, bits, mode in (("k", s.key_bits, s.key_mode), ("v", s.value_bits, s.value_mode)):
                spec = s.layout_spec(kind)
                total += tokens * batch * sh.num_kv_heads * _vector_nbytes(sh.head_dim, spec, mode)
                total += sh.num_kv_heads * build_layout(spec, sh.head_dim, rotation="dense").index_nbytes()
        elif isinstance(layer, ExactLayer):
            total += 2 * tokens * batch * sh.num_kv_heads * sh.head_dim * 2
    return total


def _vector_nbytes(d: int, spec: object, mode: str) -> int:
    """Bytes of one stored vector from its layout: codes + float16 norms (prod: the mse part's
    layout at ``b - 1`` bits + the 1-bit QJL plane + the residual norm)."""
    if mode == "mse":
        return build_layout(spec, d, rotation="dense").nbytes_per_vector
    mse_bits = float(parse_layout(spec)) - 1
    mse = build_layout(mse_bits, d, rotation="dense").nbytes_per_vector if mse_bits > 0 else 0
    return mse + d // 8 + NORM_DTYPE.itemsize
