"""Cache layers: :class:`TurboQuantLayer` (packed K/V stores + a residual window) and
:class:`ExactLayer` (protected / passthrough layers)."""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin, DynamicLayer

from turboquant.attention import HANDOFF_ATTENTIONS, handoff, run_eagerly
from turboquant.cache.codec import TensorCodec, codec_seed
from turboquant.cache.settings import TurboQuantCacheConfig
from turboquant.cache.store import PackedStore


class TurboQuantLayer(CacheLayerMixin):
    """Compressed cache of one full-attention layer: packed K/V stores + a residual window."""

    is_sliding = False
    is_croppable = True
    is_compileable = False

    def __init__(self, layer_idx: int, settings: TurboQuantCacheConfig, num_heads: int, head_dim: int, decoder_config: Any) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.settings = settings
        self.num_heads = num_heads
        self.head_dim = head_dim
        self._decoder_config = decoder_config
        self.key_store: PackedStore | None = None
        self.value_store: PackedStore | None = None
        self._rk: torch.Tensor | None = None  # residual buffers [B, H, max(R, 1), D]
        self._rv: torch.Tensor | None = None
        self._r = 0

    # -- helpers ---------------------------------------------------------------------------
    def _codec(self, kind: str, device: torch.device) -> TensorCodec:
        s = self.settings
        bits, mode = (s.key_bits, s.key_mode) if kind == "k" else (s.value_bits, s.value_mode)
        return TensorCodec(self.head_dim, bits, mode, s.rotation, codec_seed(s.seed, self.layer_idx, kind), s.seed, s.law, device,
                           layout=s.layout_spec(kind))

    def residual_keys(self) -> torch.Tensor | None:
        return None if self._rk is None or self._r == 0 else self._rk[:, :, : self._r]

    def residual_values(self) -> torch.Tensor | None:
        return None if self._rv is None or self._r == 0 else self._rv[:, :, : self._r]

    def _fused(self) -> bool:
        return getattr(self._decoder_config, "_attn_implementation", None) in HANDOFF_ATTENTIONS

    # -- CacheLayerMixin API -----------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        s = self.settings
        self.key_store = PackedStore(self._codec("k", self.device), s.chunk_tokens, s.append_backend, s.reserve_tokens)
        self.value_store = PackedStore(self._codec("v", self.device), s.chunk_tokens, s.append_backend, s.reserve_tokens)
        self._rk = self._rv = None  # the window buffer exists only while it holds tokens
        self._r = 0
        self.is_initialized = True

    def _window(self, like: torch.Tensor) -> None:
        """Allocate the residual window buffers ``[B, H, residual_length, D]`` if absent."""
        if self._rk is None:
            shape = (like.shape[0], self.num_heads, max(self.settings.residual_length, 1), self.head_dim)
            self._rk = like.new_empty(shape)
            self._rv = like.new_empty(shape)

    @run_eagerly
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``[B, H, T, D]`` keys/values; return what the attention function should receive.

        First call (prefill): the exact inputs. Later, under the ``"turboquant"`` attention: the
        residual window (placeholders; the attention reads the codes via the hand-off); under any
        other attention: the full dequantized history + window (transient).
        """
        handoff(None)  # a record left by an earlier call that never reached its attention
        self._check_pair(key_states, value_states)
        first = not self.is_initialized
        if first:
            self.lazy_initialization(key_states, value_states)
        self._append(key_states, value_states)
        self.keys, self.values = self.residual_keys(), self.residual_values()
        if first:
            return key_states, value_states
        if self._fused():
            k = self._rk[:, :, : self._r] if self._r else key_states[:, :, :0]
            handoff(self, self.layer_idx, k)
            return k, (self._rv[:, :, : self._r] if self._r else value_states[:, :, :0])
        return self.dequantized()

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Append keys/values ``[B, H, T, D]`` through the normal compression path without preparing
        an attention call (``update`` minus its return value), e.g. to fill a cache with synthetic
        history; the first call initialises the layer."""
        self._check_pair(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._append(key_states, value_states)
        self.keys, self.values = self.residual_keys(), self.residual_values()

    def _check_pair(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Keys and values are checked together before anything is written (no host sync: values
        are checked by the encoder, and a failed write is rolled back, see ``_append``)."""
        for name, t in (("key_states", key_states), ("value_states", value_states)):
            if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
                raise TypeError(f"`{name}` must be a floating torch.Tensor, got "
                                f"{getattr(t, 'dtype', type(t).__name__)}")
            if t.dim() != 4 or t.shape[1] != self.num_heads or t.shape[-1] != self.head_dim:
                raise ValueError(
                    f"`{name}` of shape {tuple(t.shape)} does not match the layer: expected "
                    f"[batch, num_key_value_heads={self.num_heads}, seq, head_dim={self.head_dim}]"
                )
        if key_states.shape != value_states.shape:
            raise ValueError(f"`key_states` {tuple(key_states.shape)} and `value_states` {tuple(value_states.shape)} differ in shape")
        if self.is_initialized and self.get_seq_length() and key_states.shape[0] != self._batch():
            raise ValueError(f"`key_states` has batch {key_states.shape[0]}, but the layer holds a batch of "
                             f"{self._batch()} (use reorder_cache / batch_select_indices to change it)")

    def _batch(self) -> int:
        held = [t for t in (self.key_store.norms, self.key_store.rnorms, self._rk) if t is not None]
        return held[0].shape[0] if held else -1

    def _select_outliers(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Outlier layouts: each store fixes its heads' outlier channels from the first update
        (undone with the rest of a failed write: see ``snapshot``)."""
        self.key_store.set_outliers(k)
        self.value_store.set_outliers(v)

    def check_norms(self, wait: bool = False) -> None:
        """:meth:`PackedStore.check_norms` of both stores (raises if an append stored a norm
        beyond float16); polled without waiting at every update/append. A failed check leaves keys
        and values aligned: both stores keep the tokens before the failed append, the window
        (later tokens) is dropped."""
        for store in (self.key_store, self.value_store):
            if store is None:
                continue
            try:
                store.check_norms(wait)
            except ValueError as err:
                keep = min(self.key_store.length, self.value_store.length)
                for st in (self.key_store, self.value_store):
                    st.crop(keep)
                    st._pending_checks.clear()
                self._r, self._rk, self._rv = 0, None, None
                raise ValueError(f"{err}; the layer keeps its first {keep} keys and values") from None

    def _append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append to the window / stores as one transaction: a failure (non-finite or out-of-range
        values in ``k`` or ``v``) leaves the layer exactly as it was, lengths and bytes included."""
        self.check_norms()
        state = (self.key_store.snapshot(), self.value_store.snapshot(), self._rk, self._rv, self._r)
        try:
            self._write(k, v)
        except BaseException:
            ks, vs, self._rk, self._rv, self._r = state
            self.key_store.restore(ks)
            self.value_store.restore(vs)
            raise

    def _write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self._select_outliers(k, v)  # outlier layouts: from the first update only (then fixed)
        R, t = self.settings.residual_length, k.shape[-2]
        total = self._r + t
        if R and total < R:  # fits in the window
            self._window(k)
            self._rk[:, :, self._r : total] = k
            self._rv[:, :, self._r : total] = v
            self._r = total
            return
        n_flush = total if R == 0 else (total // R) * R
        if self._r:
            k = torch.cat([self._rk[:, :, : self._r], k], dim=-2)
            v = torch.cat([self._rv[:, :, : self._r], v], dim=-2)
        for store, x, name in ((self.key_store, k, "key_states"), (self.value_store, v, "value_states")):
            try:
                store.append(x[:, :, :n_flush])
            except ValueError as err:
                raise ValueError(f"`{name}` of layer {self.layer_idx}: {err}") from None
        rest = total - n_flush
        if rest:
            self._window(k)
            self._rk[:, :, :rest] = k[:, :, n_flush:].clone()
            self._rv[:, :, :rest] = v[:, :, n_flush:].clone()
        else:  # empty window: release its buffer (no bytes pinned for nothing)
            self._rk = self._rv = None
        self._r = rest

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Full keys/values ``[B, H, L, D]``: dequantized codes then the window (transient).

        Each is written into one buffer (codes decoded into its front, the window copied after),
        not concatenated from pieces.
        """
        out = []
        for store, window in ((self.key_store, self._rk), (self.value_store, self._rv)):
            n = store.length
            if n == 0:
                out.append(window[:, :, : self._r])
                continue
            like = store.norms if store.norms is not None else store.rnorms
            buf = torch.empty((*like.shape[:2], n + self._r, self.head_dim), dtype=self.dtype, device=like.device)
            store.dequantize(self.dtype, out=buf)
            if self._r:
                buf[:, :, n:] = window[:, :, : self._r]
            out.append(buf)
        return out[0], out[1]

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.key_store.length + self._r

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.key_store = self.value_store = None
        self._rk = self._rv = None
        self._r = 0
        self.keys = self.values = None
        self.is_initialized = False

    def offload(self) -> None:
        raise NotImplementedError("TurboQuantCache does not support offloading; it is already compressed")

    prefetch = offload

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``|tokens_to_remove|`` tokens (negative int, as ``DynamicLayer.crop``)."""
        if tokens_to_remove > 0:
            raise ValueError(f"`crop` takes a negative number of tokens to remove, got {tokens_to_remove}")
        n = abs(tokens_to_remove)
        if n == 0 or not self.is_initialized:
            return
        from_window = min(n, self._r)
        self._r -= from_window
        if self._r == 0:
            self._rk = self._rv = None
        n -= from_window
        if n:
            self.key_store.crop(self.key_store.length - n)
            self.value_store.crop(self.value_store.length - n)

    def _index_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        self.key_store.index_batch(fn)
        self.value_store.index_batch(fn)
        if self._rk is not None:
            self._rk, self._rv = fn(self._rk), fn(self._rv)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: reorder the batch of codes, norms and window (exact: no requantization)."""
        idx = beam_idx.to(self.device) if self.is_initialized else beam_idx
        self._index_batch(lambda t: t.index_select(0, idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._index_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._index_batch(lambda t: t[indices, ...])


class ExactLayer(DynamicLayer):
    """Exact full-precision layer (protected layers, passthrough mode): ``DynamicLayer`` unchanged."""
