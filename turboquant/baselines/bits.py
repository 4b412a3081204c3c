"""Measured bits a coordinate of a KV cache: ``8 * bytes held for compressed tokens / their
coordinates`` (codes + scales / norms; the full-precision window and per-layer constants such as
rotation signs excluded, as they do not grow with the context)."""

from __future__ import annotations

import math
from typing import Any

import torch


def _quantized_part(q: Any) -> tuple[int, int]:
    """(bytes, coordinates) of one stored part of a ``QuantizedLayer``: a quanto ``QTensor``, or
    HQQ's ``(packed codes, meta)`` (meta holds the original ``shape``, ``scale`` and ``zero``)."""
    if isinstance(q, (tuple, list)) and len(q) == 2 and isinstance(q[1], dict):
        codes, meta = q
        nbytes = _tensor_bytes(codes) + _tensor_bytes(meta.get("scale")) + _tensor_bytes(meta.get("zero"))
        return nbytes, math.prod(meta["shape"])
    return _tensor_bytes(q), q.numel()


def _tensor_bytes(t: Any) -> int:
    """Bytes of a tensor, or of the inner tensors of a tensor subclass (quanto's QTensor)."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (tuple, list)):
        return sum(_tensor_bytes(x) for x in t)
    return 0


# memory categories of turboquant.cache.cache_nbytes that are not compressed-token storage
_NOT_CODES = ("residual", "metadata", "exact_kv", "linear_state", "shared_tables")


def kv_bits(cache: Any) -> dict:
    """``{"bits_per_coordinate", "code_bytes", "coordinates"}`` of the compressed part of a
    ``TurboQuantCache``, a :class:`~turboquant.baselines.layers.CodecCache` or a transformers
    ``QuantizedCache`` (quanto or HQQ backend); ``bits_per_coordinate`` is 16 for a cache that compresses nothing
    (``DynamicCache``: bf16/fp16 reference) and None when nothing is compressed yet."""
    from transformers.cache_utils import QuantizedLayer

    from turboquant.baselines.layers import CodecLayer

    nbytes = coords = 0
    kind = "none"
    for layer in cache.layers:
        if isinstance(layer, CodecLayer):
            kind = "codec"
            nbytes += layer.code_nbytes()
            if layer.compressed_tokens:
                b, h, _, d = layer.keys.shape
                coords += 2 * b * h * d * layer.compressed_tokens
        elif isinstance(layer, QuantizedLayer):
            kind = "quantized"
            for q in (layer._quantized_keys, layer._quantized_values):
                if q is not None:
                    part_bytes, part_coords = _quantized_part(q)
                    nbytes += part_bytes
                    coords += part_coords
        elif hasattr(layer, "key_store"):  # TurboQuantLayer: tokens in the stores, window excluded
            kind = "turboquant"
            if getattr(layer, "is_initialized", False) and layer.key_store.length:
                window = layer.residual_keys()
                b = window.shape[0] if window is not None else layer.key_store.norms.shape[0]
                coords += 2 * b * layer.num_heads * layer.head_dim * layer.key_store.length
    if kind == "turboquant":
        from turboquant.cache import cache_nbytes

        used = cache_nbytes(cache).used
        nbytes = sum(v for k, v in used.items() if k not in _NOT_CODES)
    if kind == "none":
        return {"bits_per_coordinate": 16.0, "code_bytes": 0, "coordinates": 0}
    return {"bits_per_coordinate": 8 * nbytes / coords if coords else None, "code_bytes": nbytes,
            "coordinates": coords}
