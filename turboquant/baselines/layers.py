"""A transformers cache layer over a per-vector codec, and the cache that holds one a layer.

:class:`CodecLayer` follows TurboQuant's window rule so that only the storage differs: tokens
enter a full-precision window of ``residual_length``; whenever it fills, whole multiples of
``residual_length`` are encoded and appended to the stored codes (one tensor per stored part, token
axis -2; per-vector codecs append, no re-quantization). The first call (prefill) returns its exact
inputs, later calls the decoded history followed by the window ``[batch, num_kv_heads, seq,
head_dim]``, for any attention implementation.

Decoding is per vector, so each flushed block is decoded once when it is stored and the decoded
history is kept beside the codes (``decode(codes[:n]) ++ decode(codes[n:]) == decode(codes)``):
a decode step costs one concatenation, not a decode of the whole history. The bytes a baseline is
charged (:meth:`CodecLayer.code_nbytes`) are its codes only; the decoded copy is simulation.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer


class CodecLayer(DynamicLayer):
    """Stored codes of keys and values (the codec's tensors, concatenated over tokens) + an exact
    residual window. (A ``DynamicLayer`` that tracks its own length, as transformers' quantized
    layers do; their base class is named differently across transformers 5.x.)"""

    is_croppable = False

    def __init__(self, key_codec: Any, value_codec: Any, residual_length: int = 16) -> None:
        super().__init__()
        self.cumulative_length = 0
        if residual_length < 0:
            raise ValueError(f"`residual_length` must be >= 0, got {residual_length}")
        self.key_codec, self.value_codec, self.residual_length = key_codec, value_codec, residual_length
        self._codes: dict[str, tuple[torch.Tensor, ...] | None] = {"k": None, "v": None}
        self._decoded: dict[str, torch.Tensor | None] = {"k": None, "v": None}
        self.compressed_tokens = 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

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
            for kind, codec, x in (("k", self.key_codec, k), ("v", self.value_codec, v)):
                new = codec.encode(x[:, :, :n_flush])
                old, old_dec = self._codes[kind], self._decoded[kind]
                self._codes[kind] = new if old is None else tuple(torch.cat(p, dim=-2) for p in zip(old, new))
                dec = codec.decode(new, x.dtype)
                self._decoded[kind] = dec if old_dec is None else torch.cat([old_dec, dec], dim=-2)
            self.compressed_tokens += n_flush
        self.keys, self.values = k[:, :, n_flush:].clone(), v[:, :, n_flush:].clone()
        if first:
            return key_states, value_states
        return self._history("k", self.keys), self._history("v", self.values)

    def _history(self, kind: str, window: torch.Tensor) -> torch.Tensor:
        decoded = self._decoded[kind]
        if decoded is None:
            return window
        return torch.cat([decoded.to(window.dtype), window], dim=-2)

    def code_nbytes(self) -> int:
        return sum(codec.nbytes(self._codes[kind]) for kind, codec in (("k", self.key_codec), ("v", self.value_codec))
                   if self._codes[kind] is not None)

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0
        self._codes = {"k": None, "v": None}
        self._decoded = {"k": None, "v": None}
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
