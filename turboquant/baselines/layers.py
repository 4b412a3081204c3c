"""A transformers cache layer over a per-vector codec, and the cache that holds one a layer.

:class:`CodecLayer` follows TurboQuant's window rule so that only the storage differs: tokens
enter a full-precision window of ``residual_length``; whenever it fills, whole multiples of
``residual_length`` are encoded and appended to the stored codes (per-vector codecs append, no
re-quantization). The first call (prefill) returns its exact inputs, later calls the decoded history
followed by the window ``[batch, num_kv_heads, seq, head_dim]``, for any attention implementation.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import BaseQuantizedLayer, Cache


class CodecLayer(BaseQuantizedLayer):
    """Stored codes of keys and values (lists of encoded chunks) + an exact residual window."""

    def __init__(self, key_codec: Any, value_codec: Any, residual_length: int = 16) -> None:
        super().__init__()
        if residual_length < 0:
            raise ValueError(f"`residual_length` must be >= 0, got {residual_length}")
        self.key_codec, self.value_codec, self.residual_length = key_codec, value_codec, residual_length
        self._codes: dict[str, list[tuple[torch.Tensor, ...]]] = {"k": [], "v": []}
        self.compressed_tokens = 0

    def _quantize(self, tensor):  # the chunked store below replaces the one-tensor base API
        raise NotImplementedError

    def _dequantize(self, q_tensor):
        raise NotImplementedError

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        first = not self.is_initialized
        if first:
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states[:, :, :0], value_states[:, :, :0]
        self.cumulative_length += key_states.shape[-2]
        k = torch.cat([self.keys, key_states], dim=-2)
        v = torch.cat([self.values, value_states], dim=-2)
        R = self.residual_length
        n_flush = k.shape[-2] if R == 0 else (k.shape[-2] // R) * R
        if n_flush:
            self._codes["k"].append(self.key_codec.encode(k[:, :, :n_flush]))
            self._codes["v"].append(self.value_codec.encode(v[:, :, :n_flush]))
            self.compressed_tokens += n_flush
        self.keys, self.values = k[:, :, n_flush:].clone(), v[:, :, n_flush:].clone()
        if first:
            return key_states, value_states
        return self._history("k", self.keys), self._history("v", self.values)

    def _history(self, kind: str, window: torch.Tensor) -> torch.Tensor:
        codec = self.key_codec if kind == "k" else self.value_codec
        parts = [codec.decode(c, window.dtype) for c in self._codes[kind]]
        return torch.cat([*parts, window], dim=-2)

    def code_nbytes(self) -> int:
        return sum(self.key_codec.nbytes(c) for c in self._codes["k"]) + sum(
            self.value_codec.nbytes(c) for c in self._codes["v"]
        )

    def reset(self) -> None:
        super().reset()
        self._codes = {"k": [], "v": []}
        self.compressed_tokens = 0


class CodecCache(Cache):
    """A ``Cache`` of :class:`CodecLayer` s, one a decoder layer (dense full-attention models).

    Args:
        config: the model's config (layer count, KV heads, head dim).
        make_codec: ``fn(head_dim, layer_idx, "k"|"v") -> codec``.
        residual_length: exact window, as ``TurboQuantCache``'s.
    """

    def __init__(self, config: Any, make_codec: Any, residual_length: int = 16, name: str = "") -> None:
        text = config.get_text_config(decoder=True)
        kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
        if kinds - {"full_attention"}:
            raise ValueError(f"{name or 'CodecCache'} supports models with only full-attention layers; found {sorted(kinds)}")
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.name, self.head_dim = name, head_dim
        layers = [CodecLayer(make_codec(head_dim, i, "k"), make_codec(head_dim, i, "v"), residual_length)
                  for i in range(text.num_hidden_layers)]
        super().__init__(layers=layers)
