"""Compression arithmetic (C01) and KV-cache memory accounting from a Hugging Face config (C06).

KV bytes of one sequence: ``Σ_{full-attention layers} 2 (K and V) · H_kv · d_head · T · bits / 8``.
Only full-attention layers hold a cache that grows with T; linear-attention (Gated DeltaNet) layers
hold a fixed state (conv window + recurrent matrix), sliding-window layers at most ``window`` tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GIB = 2**30
FULL, LINEAR, SLIDING = "full_attention", "linear_attention", "sliding_attention"


def vector_bits(d: int, bits_per_coordinate: float) -> float:
    """Bits of one d-dimensional vector at ``bits_per_coordinate`` (no metadata)."""
    if d < 1:
        raise ValueError(f"`d` must be >= 1, got {d}")
    if not 0 < bits_per_coordinate <= 64:
        raise ValueError(f"`bits_per_coordinate` must be in (0, 64], got {bits_per_coordinate}")
    return d * bits_per_coordinate


def compression_ratio(d: int, from_bits: float, to_bits: float, metadata_bits: float = 0.0) -> float:
    """``d · from_bits / (d · to_bits + metadata_bits)``; e.g. fp32 -> 4 bit at d=1536 is 8x."""
    return vector_bits(d, from_bits) / (vector_bits(d, to_bits) + metadata_bits)


@dataclass(frozen=True)
class KVLayout:
    """What a model's config says about its cache: layer types, KV heads, head dim, linear state."""

    name: str
    layer_types: tuple[str, ...]
    num_kv_heads: int
    head_dim: int
    sliding_window: int | None = None
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 0
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_config(cls, config: dict | str | Path) -> KVLayout:
        """Read a ``config.json`` (path or dict); multimodal configs use their ``text_config``."""
        if isinstance(config, (str, Path)):
            path = Path(config)
            if not path.is_file():
                raise FileNotFoundError(f"config file not found: {path}")
            name = path.stem
            config = json.loads(path.read_text())
        else:
            name = config.get("_name_or_path", config.get("model_type", "config"))
        text = config.get("text_config") or config
        n_layers = text["num_hidden_layers"]
        types = text.get("layer_types")
        if not types:
            interval = text.get("full_attention_interval")
            if interval:
                types = [FULL if (i + 1) % interval == 0 else LINEAR for i in range(n_layers)]
            else:
                types = [FULL] * n_layers
        if len(types) != n_layers:
            raise ValueError(f"config has {len(types)} layer_types for num_hidden_layers={n_layers}")
        head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
        return cls(
            name=name,
            layer_types=tuple(types),
            num_kv_heads=text.get("num_key_value_heads") or text["num_attention_heads"],
            head_dim=head_dim,
            sliding_window=text.get("sliding_window"),
            linear_num_key_heads=text.get("linear_num_key_heads", 0),
            linear_num_value_heads=text.get("linear_num_value_heads", 0),
            linear_key_head_dim=text.get("linear_key_head_dim", 0),
            linear_value_head_dim=text.get("linear_value_head_dim", 0),
            linear_conv_kernel_dim=text.get("linear_conv_kernel_dim", 0),
            raw=dict(text),
        )

    @property
    def n_full(self) -> int:
        return sum(t == FULL for t in self.layer_types)

    @property
    def n_linear(self) -> int:
        return sum(t == LINEAR for t in self.layer_types)

    @property
    def n_sliding(self) -> int:
        return sum(t == SLIDING for t in self.layer_types)

    def kv_bytes(self, tokens: int, bits: float = 16, batch: int = 1, metadata_bits_per_vector: float = 0) -> float:
        """Bytes of the growing KV cache: full layers at T tokens, sliding layers at min(T, window)."""
        per_token_layer = 2 * self.num_kv_heads * (self.head_dim * bits + metadata_bits_per_vector) / 8
        sliding_tokens = min(tokens, self.sliding_window or tokens)
        return batch * per_token_layer * (self.n_full * tokens + self.n_sliding * sliding_tokens)

    def linear_state_bytes(self, batch: int = 1, recurrent_bytes: int = 4, conv_bytes: int = 2) -> float:
        """Fixed Gated-DeltaNet state: recurrent [H_v, d_k, d_v] (float32) + conv [conv_dim, kernel]."""
        recurrent = self.linear_num_value_heads * self.linear_key_head_dim * self.linear_value_head_dim
        conv_dim = 2 * self.linear_num_key_heads * self.linear_key_head_dim
        conv_dim += self.linear_num_value_heads * self.linear_value_head_dim
        conv = conv_dim * self.linear_conv_kernel_dim
        return batch * self.n_linear * (recurrent * recurrent_bytes + conv * conv_bytes)


def count_parameters(config: dict | str | Path) -> int:
    """Parameters of the text model built from the config by transformers (on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(config, (str, Path)):
        config = json.loads(Path(config).read_text())
    text = dict(config.get("text_config") or config)
    text = {k: v for k, v in text.items() if not k.startswith("_") and k != "architectures"}
    if text.get("layer_types") is None:
        text.pop("layer_types", None)
    cfg = AutoConfig.for_model(text.pop("model_type"), **text)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class MemoryRow:
    tokens: int
    kv_full_gib: float
    kv_quant_gib: float
    kv_ratio: float
    total_full_gib: float
    total_quant_gib: float
    total_ratio: float


def code_layout_bits(code_layout: Any, head_dim: int) -> tuple[float, float]:
    """``(bits, metadata_bits_per_vector)`` of one stored vector read from a code layout: its
    code bits a coordinate and its float16 norms (``turboquant.layout.CodeLayout``; a name or
    bits is built at ``head_dim``). Outlier indices are per (layer, head), not per token."""
    from turboquant.layout import CodeLayout, build_layout

    lay = code_layout if isinstance(code_layout, CodeLayout) else build_layout(code_layout, head_dim, rotation="dense")
    if lay.d != head_dim:
        raise ValueError(f"`code_layout` is for d={lay.d}, the model's head_dim is {head_dim}")
    return lay.code_bits, 8 * lay.norm_nbytes


def memory_table(layout: KVLayout, contexts: list[int], bits: float | None, weights_gib: float,
                 base_bits: float = 16, metadata_bits_per_vector: float = 0, batch: int = 1,
                 code_layout: Any = None) -> list[MemoryRow]:
    """KV and model+KV memory at each context, full precision vs ``bits`` (the seed's C06 table),
    or vs the bytes of ``code_layout`` (codes + norms of one vector, :func:`code_layout_bits`)."""
    if code_layout is not None:
        if bits is not None or metadata_bits_per_vector:
            raise ValueError("give `bits` (and `metadata_bits_per_vector`) or `code_layout`, not both")
        bits, metadata_bits_per_vector = code_layout_bits(code_layout, layout.head_dim)
    elif bits is None:
        raise ValueError("`bits` or `code_layout` is required")
    rows = []
    for t in contexts:
        full = layout.kv_bytes(t, base_bits, batch) / GIB
        quant = layout.kv_bytes(t, bits, batch, metadata_bits_per_vector) / GIB
        rows.append(
            MemoryRow(t, full, quant, full / quant, weights_gib + full, weights_gib + quant,
                      (weights_gib + full) / (weights_gib + quant))
        )
    return rows
