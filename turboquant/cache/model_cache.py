"""``TurboQuantCache``: the transformers ``Cache`` built of TurboQuant layers, and the context
manager that switches a model to the ``"turboquant"`` attention."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, get_layer_types_and_kwargs

from turboquant.attention import ATTENTION_NAME, register_attention
from turboquant.cache.layers import ExactLayer, TurboQuantLayer
from turboquant.cache.settings import COMPRESSED_LAYER_TYPES, TurboQuantCacheConfig, check_head_dim
from turboquant.layout import build_layout

if TYPE_CHECKING:
    from turboquant.cache.memory import MemoryReport

@dataclass(frozen=True)
class AttentionShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    layer_types: tuple[str, ...]


def attention_shape(config: Any) -> AttentionShape:
    """Layer count, KV heads, head dim and layer types of a (decoder) config."""
    cfg = config.get_text_config(decoder=True)
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    layer_types, _ = get_layer_types_and_kwargs(cfg)
    return AttentionShape(cfg.num_hidden_layers, int(heads), int(head_dim), tuple(layer_types))


class TurboQuantCache(Cache):
    """KV cache with TurboQuant-compressed full-attention layers (see the module docstring).

    Args:
        config: the model's ``PreTrainedConfig`` (layer types, KV heads, head dim are read from it).
        settings: a :class:`TurboQuantCacheConfig`; keyword overrides (``key_bits=...``) also work.
        tp_size: under transformers tensor parallelism (``tp_plan="auto"``), the model's
            ``tp_size``: each rank compresses its own ``num_key_value_heads / tp_size`` KV heads.

    Example::

        cache = TurboQuantCache(model.config, key_bits=3.5, value_bits=2.5)
        with turboquant_attention(model):
            out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)
    """

    def __init__(self, config: Any, settings: TurboQuantCacheConfig | None = None, *, tp_size: int | None = None,
                 **overrides: Any) -> None:
        if config is None or not hasattr(config, "get_text_config"):
            raise ValueError("`config` must be the model's PreTrainedConfig (TurboQuantCache reads its layer types)")
        settings = settings or TurboQuantCacheConfig()
        if overrides:
            settings = TurboQuantCacheConfig(**{**asdict(settings), **overrides})
        self.settings = settings
        shape = attention_shape(config)
        if tp_size is not None:  # tensor parallel: this rank holds num_kv_heads / tp_size heads
            if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1 or shape.num_kv_heads % tp_size:
                raise ValueError(f"`tp_size`={tp_size!r} must be an int >= 1 that divides num_key_value_heads="
                                 f"{shape.num_kv_heads} (pass the model's `tp_size`)")
            shape = replace(shape, num_kv_heads=shape.num_kv_heads // tp_size)
        self.tp_size = tp_size or 1
        self.shape = shape
        decoder_config = config.get_text_config(decoder=True)
        _, per_layer_kwargs = get_layer_types_and_kwargs(decoder_config)
        if isinstance(per_layer_kwargs, dict):  # transformers 5.17: one dict shared by every layer
            per_layer_kwargs = [dict(per_layer_kwargs) if t == "linear_attention" else {} for t in shape.layer_types]
        full = [i for i, t in enumerate(shape.layer_types) if t in COMPRESSED_LAYER_TYPES]
        if not full:
            raise ValueError(
                "TurboQuantCache compresses full-attention layers, but this model has none: layer_types = "
                f"{sorted(set(shape.layer_types))}; allowed compressed types: {COMPRESSED_LAYER_TYPES}"
            )
        protected = set()
        for i in settings.protected_layers:
            j = i + shape.num_layers if i < 0 else i
            if not 0 <= j < shape.num_layers:
                raise ValueError(f"`protected_layers` entry {i} is out of range for a model of {shape.num_layers} layers")
            protected.add(j)
        self.protected = tuple(sorted(protected))
        if not settings.passthrough:
            check_head_dim(shape.head_dim, settings.rotation)
            for kind in ("k", "v"):  # a layout that does not fit head_dim fails here, named
                build_layout(settings.layout_spec(kind), shape.head_dim, rotation="dense")
            register_attention()
        layers: list = []
        for i, (t, kw) in enumerate(zip(shape.layer_types, per_layer_kwargs)):
            if t in COMPRESSED_LAYER_TYPES and not settings.passthrough and i not in protected:
                layers.append(TurboQuantLayer(i, settings, shape.num_kv_heads, shape.head_dim, decoder_config))
            elif t in COMPRESSED_LAYER_TYPES:
                layers.append(ExactLayer())
            else:
                layers.append(DYNAMIC_LAYER_TYPE_MAPPING[t](**kw))
        self.compressed_layers = tuple(i for i, l in enumerate(layers) if isinstance(l, TurboQuantLayer))
        super().__init__(layers=layers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.layers)
        if not isinstance(layer_idx, int) or not 0 <= layer_idx < n:
            raise ValueError(
                f"`layer_idx`={layer_idx!r} is out of range: this TurboQuantCache was built for a model of {n} layers "
                "(was it built from another model's config?)"
            )
        if key_states.dim() != 4 or key_states.shape[1] != self.shape.num_kv_heads or key_states.shape[-1] != self.shape.head_dim:
            raise ValueError(
                f"key_states of shape {tuple(key_states.shape)} do not match the cache's config: expected "
                f"[batch, num_key_value_heads={self.shape.num_kv_heads}, seq, head_dim={self.shape.head_dim}] "
                "(was the cache built from another model's config? Under tensor parallelism pass "
                "`tp_size=model.tp_size`: each rank holds num_key_value_heads / tp_size heads)"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def check_norms(self) -> None:
        """Wait for and read every pending float16 norm-range check of the compressed layers
        (CUDA kernel appends check without a host sync; each update polls the landed ones).
        Raises ``ValueError`` naming the layer if an appended vector's norm did not fit."""
        for i, layer in enumerate(self.layers):
            if isinstance(layer, TurboQuantLayer):
                try:
                    layer.check_norms(wait=True)
                except ValueError as err:
                    raise ValueError(f"layer {i}: {err}") from None

    def nbytes(self) -> MemoryReport:
        from turboquant.cache.memory import cache_nbytes

        return cache_nbytes(self)



@contextlib.contextmanager
def turboquant_attention(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the block the model uses the ``"turboquant"`` attention (compressed decode; any layer
    without a compressed store runs ``sdpa``); the previous implementation is restored after."""
    register_attention()
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)
