"""``TurboQuantCache``: a transformers ``Cache`` whose resident KV storage is packed TurboQuant codes.

Per full-attention layer, keys and values live in a :class:`PackedStore` (bit-plane codes in the
rotated domain + float16 norms; prod mode adds a 1-bit QJL plane and float16 residual norms, see
``docs/ARCHITECTURE.md``) plus a full-precision *residual window* of fewer than
``residual_length`` newest tokens. When the window fills up it is flushed into codes as one block
(block boundaries are aligned to absolute positions: a 2048-token prompt with the default 16-token window is
stored fully compressed). No full-precision copy of the compressed history is ever kept.

* prefill (the first ``update`` of a layer) returns the exact keys/values, so the prompt attends to
  itself in full precision (as KIVI / transformers' ``QuantizedCache``); what is stored is compressed;
* later updates: with ``attn_implementation="turboquant"`` (see :func:`turboquant_attention`) the
  attention scores the codes directly (``turboquant.attention``); with any other attention the
  layer returns a transient dequantized copy (exact same math, slower) so results stay correct;
* layers that are not full attention (linear attention / Gated DeltaNet, sliding window) keep
  transformers' own exact layer classes; ``protected_layers`` keep exact ``DynamicLayer`` storage;
* ``key_bits = value_bits = 16`` is a passthrough: every attention layer is exact, logits equal
  ``DynamicCache``'s bit for bit (a guard against silent corruption in hybrid models).

Memory: :func:`cache_nbytes` reports what any cache (ours or ``DynamicCache``) really pins.

One module a concept: ``settings`` (:class:`TurboQuantCacheConfig`), ``codec`` (one tensor's
quantizer, :class:`TensorCodec`), ``backends`` (torch / Triton encode-decode objects), ``store``
(:class:`PackedStore`), ``layers`` (:class:`TurboQuantLayer`, :class:`ExactLayer`),
``model_cache`` (:class:`TurboQuantCache`, :func:`turboquant_attention`), ``memory``
(:func:`cache_nbytes`, :func:`ideal_kv_nbytes`). The code format itself is the layer's
``turboquant.layout.CodeLayout``; ``turboquant.attention`` reads stores through
``turboquant.store_protocol``, not through this package.
"""

from turboquant.cache.backends import TorchCodes, TritonCodes, select_backend
from turboquant.cache.codec import TensorCodec, codec_seed
from turboquant.cache.layers import ExactLayer, TurboQuantLayer
from turboquant.cache.memory import MemoryReport, cache_nbytes, ideal_kv_nbytes
from turboquant.cache.model_cache import (
    AttentionShape,
    TurboQuantCache,
    attention_shape,
    turboquant_attention,
)
from turboquant.cache.settings import (
    APPEND_BACKENDS,
    COMPRESSED_LAYER_TYPES,
    MODES,
    PASSTHROUGH_BITS,
    TurboQuantCacheConfig,
    check_head_dim,
)
from turboquant.cache.store import PackedStore

__all__ = [
    "APPEND_BACKENDS",
    "COMPRESSED_LAYER_TYPES",
    "MODES",
    "PASSTHROUGH_BITS",
    "AttentionShape",
    "ExactLayer",
    "MemoryReport",
    "PackedStore",
    "TensorCodec",
    "TorchCodes",
    "TritonCodes",
    "TurboQuantCache",
    "TurboQuantCacheConfig",
    "TurboQuantLayer",
    "attention_shape",
    "cache_nbytes",
    "check_head_dim",
    "codec_seed",
    "ideal_kv_nbytes",
    "select_backend",
    "turboquant_attention",
]
