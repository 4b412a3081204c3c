"""``StaticTurboQuantCache``: a fixed-shape TurboQuant cache for CUDA graphs and ``torch.compile``.

Like transformers' ``StaticLayer``, every buffer of a compressed layer is allocated once, at
``max_cache_len`` tokens, and written in place, so tensor addresses never change and a decode step
can be captured in a CUDA graph. Valid lengths live on the device (``cumulative_length``, an int64
0-dim tensor); nothing in ``update`` or ``attend`` reads them on the host.

Storage of one compressed layer (``N = max_cache_len``, ``R = residual_length``):

* codes / norms (and outlier channels for grouped layouts) of **every** token, written at its
  absolute position ``p`` when it arrives (TurboQuant quantizes each vector on its own, so a
  token's codes do not depend on the block it would be flushed with); slot ``N`` is a trash slot
  that writes past the end land in (and a sticky device flag records);
* a ring of the last ``R`` tokens in full precision, token ``p`` in slot ``p mod R``.

With ``L`` tokens held, the attention reads codes for positions ``p < F = floor(L / R) R`` and the
ring for ``F <= p < L``: exactly what the dynamic ``TurboQuantLayer`` holds after its block
flushes (codes of ``[0, F)``, a window of ``L - F < R`` exact tokens), so both caches give the
same numbers. Since ``F`` is a multiple of ``R``, slot ``p mod R = p - F`` for the window: the
valid slots are the prefix ``[0, L - F)`` of the ring, in chronological order.

The ``"turboquant"`` attention reaches the layer through the cache's hand-off and calls
:meth:`StaticTurboQuantLayer.attend` (see ``turboquant.attention``): on CPU / torch the codes of
all ``N`` positions are scored with a device-side validity mask; on CUDA the device-length decode
kernel runs when ``turboquant.kernels`` offers it (``DEVICE_LENGTH``). Any other attention gets
the dequantized history + window (``[B, H, N, D]``, correct, slower). Prefill returns the exact
keys/values, at their positions of an ``N``-token tensor (transformers' static mask convention).
"""

from __future__ import annotations

import inspect
from dataclasses import asdict
from typing import Any

import torch
from transformers.cache_utils import (
    CacheLayerMixin,
    DynamicSlidingWindowLayer,
    StaticLayer,
    StaticSlidingWindowLayer,
)

from turboquant.attention import (
    HANDOFF_ATTENTIONS,
    SCORE_CHUNK_TOKENS,
    _expand_mask,
    _store_scores,
    _store_values,
    handoff,
    run_eagerly,
)
from turboquant.cache import (
    ExactLayer,
    MemoryReport,
    PackedStore,
    TensorCodec,
    TurboQuantCache,
    TurboQuantCacheConfig,
    TurboQuantLayer,
    cache_nbytes,
)
from turboquant.quantizer import NORM_DTYPE


def _query_length(args: tuple, kwargs: dict) -> int | None:
    """New tokens of a ``get_mask_sizes`` call: ``query_length`` (transformers >= 5.2x) or the
    length of ``cache_position`` (earlier 5.x); None where neither is given."""
    value = kwargs.get("query_length", kwargs.get("cache_position", args[0] if args else None))
    if isinstance(value, torch.Tensor):
        return int(value.shape[-1]) if value.dim() else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _positive_int(value: object, name: str, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be an int >= 1{' or None' if allow_none else ''}, got {value!r}")
    return value


def _mark_static(*tensors: torch.Tensor | None) -> None:
    """Fixed data pointers for dynamo / cudagraphs (not while tracing, as transformers does)."""
    if torch.compiler.is_compiling():
        return
    for t in tensors:
        if t is not None:
            torch._dynamo.mark_static_address(t)


class StaticStore(PackedStore):
    """Packed codes of one (layer, K|V) at fixed addresses: ``[B, H, N + 1, ...]`` (slot ``N``:
    trash). ``length = N`` is the number of *readable* slots (what ``turboquant.attention``'s store
    readers slice); which slots hold valid tokens is the owning layer's device-side length."""

    def __init__(self, codec: TensorCodec, backend: str, batch: int, heads: int, max_cache_len: int,
                 device: torch.device) -> None:
        super().__init__(codec, chunk_tokens=1, backend=backend)
        n = max_cache_len
        if codec.grouped:
            lay = codec.layout
            self.outliers = torch.arange(lay.n_out, device=device).expand(heads, lay.n_out).to(lay.index_dtype)
            self.outliers = self.outliers.contiguous()
        probe = torch.zeros(batch, heads, 1, codec.d, device=device)
        for f, part in zip(self.FIELDS, codec.encode(probe, self.outliers)):
            if part is not None:  # the layout's own shapes and dtypes, one token long
                setattr(self, f, torch.zeros((batch, heads, n + 1, *part.shape[3:]), dtype=part.dtype, device=device))
        self.length = self.capacity = n
        self._kernel: dict = {}
        _mark_static(self.outliers, *self._buffers().values())

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x`` [B, H, T, D] -> the stored fields of its T tokens, plus a device flag ``"ok"``
        (every norm inside float16's normal range). Torch path: raises at once instead (host sync;
        CPU). Triton ``quantize_pack`` (CUDA): no host sync, the flag is checked later."""
        engine = self._engine(x.device, "encode this update")  # PackedStore's backend choice
        tables = getattr(engine, "tables", None)
        if tables is None:
            parts = {f: p for f, p in zip(self.FIELDS, self.codec.encode(x, self.outliers)) if p is not None}
            parts["ok"] = None
            return parts
        from turboquant.kernels import quantize_pack

        self.kernel_appends += 1
        kw = {"outliers": self.outliers} if self.codec.grouped else {}
        codes, norms = quantize_pack(x, tables, check_range=False, **kw)
        ok = torch.isfinite(norms).all() & ~((norms > 0) & (norms < torch.finfo(NORM_DTYPE).tiny)).any()
        return {"codes": codes, "norms": norms, "ok": ok}

    def write(self, parts: dict[str, torch.Tensor], slots: torch.Tensor) -> None:
        """Store encoded tokens at absolute positions ``slots`` (int64 device tensor [T])."""
        for f in self.FIELDS:
            if f in parts:
                getattr(self, f).index_copy_(2, slots, parts[f])

    def append(self, x: torch.Tensor) -> None:  # the layer writes by position
        raise NotImplementedError("StaticStore is written at absolute positions by StaticTurboQuantLayer.update")

    def clear(self) -> None:
        """Zero the norms (stale codes then score 0 and are masked anyway); addresses unchanged."""
        for f in ("norms", "rnorms"):
            if getattr(self, f) is not None:
                getattr(self, f).zero_()


class StaticTurboQuantLayer(CacheLayerMixin):
    """Compressed full-attention layer of fixed shape (see the module docstring).

    ``base``: the dynamic :class:`TurboQuantLayer` of the same index; its settings, shape and
    codecs (the same seeds and layouts, so both caches hold the same codes) are reused."""

    is_compileable = True
    is_sliding = False
    is_croppable = False

    def __init__(self, base: TurboQuantLayer, max_cache_len: int, max_batch_size: int | None = None,
                 unpadded_decode: bool = False) -> None:
        super().__init__()
        self._base = base
        self.layer_idx, self.settings = base.layer_idx, base.settings
        self.num_heads, self.head_dim = base.num_heads, base.head_dim
        self._decoder_config = base._decoder_config
        self.max_cache_len = _positive_int(max_cache_len, "max_cache_len")
        self.max_batch_size = _positive_int(max_batch_size, "max_batch_size", allow_none=True)
        self.unpadded_decode = bool(unpadded_decode)
        self.cumulative_length = torch.tensor(0, dtype=torch.int64)
        self.key_store: StaticStore | None = None
        self.value_store: StaticStore | None = None
        self._tokens = 0  # host shadow of cumulative_length (exact except under CUDA graph replay)
        self._kernel_why: dict[tuple, str | None] = {}  # kernel_unsupported per call kind
        self._outliers_fixed = False

    # -- allocation -------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocate every buffer for ``max_batch_size`` (default: this batch) x ``max_cache_len``."""
        self.device, self.dtype = key_states.device, key_states.dtype
        if self.max_batch_size is None:
            self.max_batch_size = key_states.shape[0]
        b, h, n, d, dev = self.max_batch_size, self.num_heads, self.max_cache_len, self.head_dim, self.device
        self.batch_size = b
        s = self.settings
        self.key_store = StaticStore(self._base._codec("k", dev), s.append_backend, b, h, n, dev)
        self.value_store = StaticStore(self._base._codec("v", dev), s.append_backend, b, h, n, dev)
        r = max(s.residual_length, 1)
        self._rk = torch.zeros(b, h, r, d, dtype=self.dtype, device=dev)
        self._rv = torch.zeros(b, h, r, d, dtype=self.dtype, device=dev)
        self._ring_pos = torch.full((r,), -1, dtype=torch.int64, device=dev)  # absolute position per slot
        self._positions = torch.arange(n, device=dev)
        self.cumulative_length = self.cumulative_length.to(dev)
        self._overflow = torch.zeros((), dtype=torch.bool, device=dev)  # a write went past max_cache_len
        self._norms_ok = torch.ones((), dtype=torch.bool, device=dev)  # kernel-encoded norms fit float16
        _mark_static(self._rk, self._rv, self._ring_pos, self.cumulative_length, self._overflow, self._norms_ok)
        self.is_initialized = True

    # -- lengths (device) -------------------------------------------------------------------------
    def flushed_length(self, length: torch.Tensor | None = None) -> torch.Tensor:
        """``F = floor(L / R) R``: tokens read from codes (``L`` itself when ``R = 0``)."""
        length = self.cumulative_length if length is None else length
        r = self.settings.residual_length
        return length if r == 0 else torch.div(length, r, rounding_mode="floor") * r

    def residual_keys(self) -> torch.Tensor:
        """The ring ``[B, H, R, D]``; slots ``[0, L - F)`` hold the window in chronological order."""
        return self._rk

    def residual_values(self) -> torch.Tensor:
        return self._rv

    # -- update -----------------------------------------------------------------------------------
    def _check(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Host-side checks of static shapes before anything is written."""
        for name, t in (("key_states", key_states), ("value_states", value_states)):
            if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
                raise TypeError(f"`{name}` must be a floating torch.Tensor, got {getattr(t, 'dtype', type(t).__name__)}")
            if t.dim() != 4 or t.shape[1] != self.num_heads or t.shape[-1] != self.head_dim:
                raise ValueError(f"`{name}` of shape {tuple(t.shape)} does not match the layer: expected "
                                 f"[batch, num_key_value_heads={self.num_heads}, seq, head_dim={self.head_dim}]")
        if key_states.shape != value_states.shape:
            raise ValueError(f"`key_states` {tuple(key_states.shape)} and `value_states` "
                             f"{tuple(value_states.shape)} differ in shape")
        b, t = key_states.shape[0], key_states.shape[-2]
        if self.max_batch_size is not None and b != self.max_batch_size:
            raise ValueError(f"`key_states` has batch {b}, but this StaticTurboQuantCache was built for "
                             f"max_batch_size={self.max_batch_size}; build the cache for this batch size")
        self._check_room(t)
        if self.is_initialized and key_states.device != self.device:
            raise ValueError(f"`key_states` on {key_states.device}, but the layer's buffers are on {self.device}")

    def _check_room(self, t: int) -> None:
        if self._tokens + t > self.max_cache_len:
            raise ValueError(f"layer {self.layer_idx}: {t} new tokens after {self._tokens} held exceed "
                             f"max_cache_len={self.max_cache_len}; build the cache with a larger max_cache_len")

    @run_eagerly
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``[B, H, T, D]`` keys/values at positions ``[L, L + T)``; return what the attention
        receives: the exact prompt on the first update (``[B, H, N, D]``, zeros after it); later,
        under the ``"turboquant"`` attention, the ring (placeholders: the attention reads the codes
        through the hand-off); under any other attention the dequantized history + window."""
        handoff(None)
        self._check(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        first = self._tokens == 0
        slots = self._write(key_states, value_states, first)
        if first:
            return self._placed(key_states, slots), self._placed(value_states, slots)
        if getattr(self._decoder_config, "_attn_implementation", None) in HANDOFF_ATTENTIONS:
            handoff(self, self.layer_idx, self._rk)
            return self._rk, self._rv
        return self.dequantized()

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Write keys/values ``[B, H, T, D]`` through the normal path without preparing an
        attention call (``update`` minus its return value), e.g. to fill a cache with synthetic
        history."""
        self._check(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._write(key_states, value_states, self._tokens == 0)

    def _write(self, k: torch.Tensor, v: torch.Tensor, first: bool) -> torch.Tensor:
        """Encode both tensors (may raise: nothing written yet), then write codes, ring and length.
        Returns the absolute positions ``[T]`` of the new tokens (device)."""
        t, n, r = k.shape[-2], self.max_cache_len, self.settings.residual_length
        pos = self.cumulative_length + torch.arange(t, device=self.device)
        if t == 0:
            return pos
        if first and not self._outliers_fixed:  # outlier layouts: channels from the prompt, then fixed
            for store, x in ((self.key_store, k), (self.value_store, v)):
                if store.codec.grouped:  # selected into the existing buffer: its address stays
                    buf, store.outliers = store.outliers, None
                    store.set_outliers(x)
                    store.outliers = buf.copy_(store.outliers)
        enc = []
        for store, x, name in ((self.key_store, k, "key_states"), (self.value_store, v, "value_states")):
            try:
                enc.append(store.encode(x))
            except ValueError as err:
                raise ValueError(f"`{name}` of layer {self.layer_idx}: {err}") from None
        self._outliers_fixed = True
        slots = pos.clamp(max=n)  # past the end: the trash slot (flagged below)
        for store, parts in zip((self.key_store, self.value_store), enc):
            ok = parts.pop("ok")
            if ok is not None:
                self._norms_ok &= ok
            store.write(parts, slots)
        if r:
            m = min(t, r)  # the ring keeps the newest tokens: distinct slots
            ring = torch.remainder(pos[t - m:], r)
            self._rk.index_copy_(2, ring, k[:, :, t - m:].to(self.dtype))
            self._rv.index_copy_(2, ring, v[:, :, t - m:].to(self.dtype))
            self._ring_pos.index_copy_(0, ring, pos[t - m:])
        self._overflow |= pos[-1] >= n
        self.cumulative_length.add_(t)
        self._tokens += t
        return slots

    def _placed(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """``x`` [B, H, T, D] at its positions of a zero ``[B, H, N, D]`` tensor (transient)."""
        out = x.new_zeros((*x.shape[:2], self.max_cache_len + 1, x.shape[-1]))
        return out.index_copy_(2, slots, x)[:, :, : self.max_cache_len]

    # -- reading ----------------------------------------------------------------------------------
    def _window_slots(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(L, F, ring position per slot)`` on the device."""
        length = self.cumulative_length
        return length, self.flushed_length(length), self._ring_pos

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values ``[B, H, N, D]``: dequantized codes for ``p < F``, the ring for
        ``F <= p < L`` (positions past ``L`` are whatever the mask hides)."""
        length, flushed, _ = self._window_slots()
        pos = self._positions
        r = self.settings.residual_length
        in_window = ((pos >= flushed) & (pos < length))[:, None]
        out = []
        for store, ring in ((self.key_store, self._rk), (self.value_store, self._rv)):
            x = store.dequantize(self.dtype)
            if r:
                x = torch.where(in_window, ring.index_select(2, torch.remainder(pos, r)), x)
            out.append(x)
        return out[0], out[1]

    def attend(self, query: torch.Tensor, scaling: float, attention_mask: torch.Tensor | None,
               **kwargs: Any) -> torch.Tensor:
        """Attention of ``query`` [B, H_q, T_q, D] over this layer (the ``"turboquant"`` attention
        calls it through the hand-off). Returns ``[B, T_q, H_q, D]`` in the query dtype."""
        out = self._attend_kernel(query, scaling, attention_mask) if query.is_cuda else None
        return self._attend_torch(query, scaling, attention_mask) if out is None else out

    def kernel_unsupported(self, query: torch.Tensor, attention_mask: torch.Tensor | None) -> str | None:
        """Why the device-length CUDA decode kernel cannot serve this call (``None``: it can).

        The answer depends only on the query's token count and device and whether a mask comes, so
        it is worked out once per such call kind and kept (a decode step asks it every layer)."""
        key = (int(query.shape[2]), query.device, attention_mask is None)
        if key not in self._kernel_why:
            self._kernel_why[key] = self._kernel_unsupported(query, attention_mask)
        return self._kernel_why[key]

    def _kernel_unsupported(self, query: torch.Tensor, attention_mask: torch.Tensor | None) -> str | None:
        try:
            import turboquant.kernels as tk
        except ImportError as err:  # pragma: no cover - the package imports without Triton
            return f"turboquant.kernels does not import ({err})"
        if not getattr(tk, "DEVICE_LENGTH", False):
            return "turboquant.kernels has no device-length decode (DEVICE_LENGTH)"
        params = inspect.signature(tk.decode_attention).parameters
        if not {"max_length", "residual_length"} <= set(params):
            return "decode_attention takes no `max_length` / `residual_length` (the window's device length)"
        if query.shape[2] != 1:
            return f"{query.shape[2]} query tokens (the kernel decodes one)"
        if attention_mask is not None and not self.unpadded_decode:
            return "an attention mask (the kernel reads lengths; build the cache with unpadded_decode=True " \
                   "when no batch row is padded)"
        for store in (self.key_store, self.value_store):
            if store.codec.mode != "mse":
                return f"mode {store.codec.mode!r} (the device-length path decodes mse codes)"
            why = tk.layout_unsupported(store.codec.layout, query.device)
            if why is not None:
                return why
        return None

    def _attend_kernel(self, query: torch.Tensor, scaling: float, attention_mask) -> torch.Tensor | None:
        """``decode_attention`` with device lengths: codes ``[0, F)``, ring slots ``[0, L - F)``,
        grid sized by ``max_cache_len``, one workspace a layer (no host sync, no allocation).

        The call is bound once per query shape (:class:`~turboquant.kernels.DecodeAttentionCall`:
        stores, ring and two int32 length buffers never move), so an eager step validates and
        plans nothing; the lengths are written into their buffers each step on the device."""
        if self.kernel_unsupported(query, attention_mask) is not None:
            return None
        from turboquant.kernels import DecodeAttentionCall, KernelTables
        from turboquant.kernels.workspace import DecodeWorkspace

        ks, vs = self.key_store, self.value_store
        kern = ks._kernel
        if not kern:
            for st in (ks, vs):
                st._kernel["tables"] = KernelTables.from_quantizer(st.codec.quantizer, query.device)
            kern["workspace"] = DecodeWorkspace()
            lshape = self.cumulative_length.shape
            kern["flushed"] = torch.zeros(lshape, dtype=torch.int32, device=query.device)
            kern["window"] = torch.zeros(lshape, dtype=torch.int32, device=query.device)
            kern["calls"] = {}
        length, flushed, _ = self._window_slots()
        kern["flushed"].copy_(flushed)
        kern["window"].copy_(length - flushed)
        qkey = (query.shape, query.stride(), query.dtype, scaling)
        call = kern["calls"].get(qkey)
        if call is None:
            call = kern["calls"][qkey] = DecodeAttentionCall(
                ks.codes, ks.norms, vs.codes, vs.norms, kern["flushed"], kern["tables"], vs._kernel["tables"],
                scaling, self._rk, self._rv, k_outliers=ks.outliers if ks.codec.grouped else None,
                v_outliers=vs.outliers if vs.codec.grouped else None, max_length=self.max_cache_len,
                residual_length=kern["window"], workspace=kern["workspace"])
        return call(query)

    def _attend_torch(self, query: torch.Tensor, scaling: float, attention_mask) -> torch.Tensor:
        """Scores over all ``N`` code slots and ``R`` ring slots; a device-side validity mask keeps
        codes of ``p < F`` and ring slots of ``F <= p < L`` (and causality for ``T_q > 1``)."""
        b, hq, tq, d = query.shape
        h, n = self.num_heads, self.max_cache_len
        n_rep = hq // h
        q = query.float().reshape(b, h, n_rep * tq, d)
        length, flushed, ring_pos = self._window_slots()
        q_pos = (length - tq + torch.arange(tq, device=q.device)).repeat(n_rep)  # [M]
        pos = self._positions
        code_ok = (pos < flushed)[None, :] & (pos[None, :] <= q_pos[:, None])
        ring_ok = ((ring_pos >= flushed) & (ring_pos < length))[None, :] & (ring_pos[None, :] <= q_pos[:, None])
        ks, vs = self.key_store, self.value_store
        chunks = [(s, min(s + SCORE_CHUNK_TOKENS, n)) for s in range(0, n, SCORE_CHUNK_TOKENS)]
        qr = ks.codec.rotate(q, ks.outliers).contiguous() if ks.codes is not None else None
        scores = [_store_scores(q, qr, ks, s, e) for s, e in chunks]
        scores.append(torch.matmul(q, self._rk.float().transpose(-1, -2)))
        logits = torch.cat(scores, dim=-1) * scaling
        mask = _expand_mask(attention_mask, n_rep, n, tq)
        if mask is not None:  # additive [B|1, 1, M, N]; ring slots read their position's column
            logits = logits + torch.cat([mask, mask.index_select(-1, ring_pos.clamp(0, n - 1))], dim=-1)
        logits = logits.masked_fill(~torch.cat([code_ok, ring_ok], dim=-1), float("-inf"))
        probs = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)  # fully masked rows -> 0
        out = torch.matmul(probs[..., n:], self._rv.float())
        for s, e in chunks:
            out = out + _store_values(probs[..., s:e], vs, s, e)
        out = out.reshape(b, h, n_rep, tq, d).reshape(b, hq, tq, d)
        return out.transpose(1, 2).to(query.dtype).contiguous()

    # -- CacheLayerMixin API ----------------------------------------------------------------------
    def get_seq_length(self) -> torch.Tensor | int:
        """Tokens held, as the device tensor (transformers' static convention), 0 before the first update."""
        return self.cumulative_length if self.is_initialized else 0

    def get_mask_sizes(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        """Static convention: the mask spans all ``max_cache_len`` positions, offset 0.

        The model asks for the mask before its first layer runs, so a forward that would pass
        ``max_cache_len`` is refused here, before a hybrid model's linear-attention layers (which
        come before the first full-attention layer) update their states. (Not while compiling:
        the host count would become a guard; ``update`` still refuses there.)"""
        new = _query_length(args, kwargs)
        if new is not None and not torch.compiler.is_compiling():
            self._check_room(new)
        return self.max_cache_len, 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        """Zero the lengths, the ring positions and the norms; no buffer is reallocated. The next
        update is a prompt again (outlier layouts select their channels from it)."""
        self._tokens = 0
        self._outliers_fixed = False
        self.cumulative_length.zero_()
        if self.is_initialized:
            self._ring_pos.fill_(-1)
            self._overflow.zero_()
            self._norms_ok.fill_(True)
            self.key_store.clear()
            self.value_store.clear()

    def check(self) -> None:
        """Host check of the device flags (one sync): a write past ``max_cache_len`` (possible
        only where the host shadow count cannot see it: CUDA graph replay) or a kernel-encoded
        norm outside float16's range raises ``ValueError``."""
        if not self.is_initialized:
            return
        if bool(self._overflow):
            raise ValueError(f"layer {self.layer_idx}: a token was written past max_cache_len={self.max_cache_len} "
                             "(dropped into the trash slot); results after it are not valid")
        if not bool(self._norms_ok):
            raise ValueError(f"layer {self.layer_idx}: an appended vector norm lies outside the float16 norm "
                             "storage range (or is not finite); results after it are not valid")

    def offload(self) -> None:
        raise NotImplementedError("StaticTurboQuantCache does not support offloading; it is already compressed")

    prefetch = offload

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("StaticTurboQuantLayer cannot crop: the ring window no longer holds the "
                                  "tokens a crop would expose; use TurboQuantCache for assisted decoding")

    def _no_reindex(self, *args: Any) -> None:
        raise NotImplementedError("StaticTurboQuantCache has a fixed batch: reorder / expand the batch with "
                                  "TurboQuantCache (beam search) or build the cache for the expanded batch")

    reorder_cache = batch_repeat_interleave = batch_select_indices = _no_reindex

    def nbytes(self) -> dict[str, int]:
        """Pinned bytes per category (every buffer is allocated for ``max_cache_len``)."""
        out: dict[str, int] = {}
        if not self.is_initialized:
            return out
        for store in (self.key_store, self.value_store):
            for cat, t in (("codes", store.codes), ("codes", store.qjl), ("norms", store.norms),
                           ("norms", store.rnorms), ("outlier_index", store.outliers)):
                if t is not None:
                    out[cat] = out.get(cat, 0) + t.untyped_storage().nbytes()
        out["residual"] = self._rk.untyped_storage().nbytes() + self._rv.untyped_storage().nbytes()
        return out


class StaticTurboQuantCache(TurboQuantCache):
    """A :class:`TurboQuantCache` of fixed shape: compressed layers are
    :class:`StaticTurboQuantLayer`, exact full-attention layers transformers' ``StaticLayer``,
    sliding-window layers ``StaticSlidingWindowLayer``; linear-attention layers (hybrid models)
    keep transformers' own classes.

    Args:
        config: the model's ``PreTrainedConfig``.
        max_cache_len: tokens every layer holds at most (prompt + new tokens).
        max_batch_size: the batch every update must have (default: the first update's).
        settings: a :class:`TurboQuantCacheConfig` (keyword overrides also work).
        unpadded_decode: promise that no batch row is padded, so that the CUDA device-length
            kernel (which reads lengths, not masks) may serve decode steps that carry a mask.

    Example::

        cache = StaticTurboQuantCache(model.config, max_cache_len=4096, max_batch_size=1,
                                      settings=TurboQuantCacheConfig(key_bits=3.5, value_bits=3.5))
        with turboquant_attention(model):
            out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)
    """

    def __init__(self, config: Any, max_cache_len: int, max_batch_size: int | None = None,
                 settings: TurboQuantCacheConfig | None = None, *, tp_size: int | None = None,
                 unpadded_decode: bool = False, **overrides: Any) -> None:
        _positive_int(max_cache_len, "max_cache_len")
        _positive_int(max_batch_size, "max_batch_size", allow_none=True)
        if overrides:
            settings = TurboQuantCacheConfig(**{**asdict(settings or TurboQuantCacheConfig()), **overrides})
        super().__init__(config, settings, tp_size=tp_size)
        # transformers 5.17's Cache has read-only max_cache_len / max_batch_size properties: ours below
        self._max_len, self._max_batch = max_cache_len, max_batch_size
        for i, layer in enumerate(self.layers):
            if isinstance(layer, TurboQuantLayer):
                self.layers[i] = StaticTurboQuantLayer(layer, max_cache_len, max_batch_size, unpadded_decode)
            elif isinstance(layer, ExactLayer):
                self.layers[i] = StaticLayer(max_cache_len)
            elif type(layer) is DynamicSlidingWindowLayer:
                self.layers[i] = StaticSlidingWindowLayer(max_cache_len, layer.sliding_window)


    @property
    def max_cache_len(self) -> int:
        """Tokens every layer holds at most (fixed at construction)."""
        return self._max_len

    @property
    def max_batch_size(self) -> int | None:
        """The batch every update must have (``None``: the first update's)."""
        return self._max_batch

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_cache_len

    def check(self) -> None:
        """:meth:`StaticTurboQuantLayer.check` of every compressed layer (one host sync each)."""
        for layer in self.layers:
            if isinstance(layer, StaticTurboQuantLayer):
                layer.check()

    check_norms = check

    def nbytes(self) -> MemoryReport:
        """Pinned bytes: transformers' layers as :func:`cache_nbytes` counts them, plus the static
        buffers (allocated for ``max_cache_len``; ``used`` is reported equal to ``pinned`` for them)."""
        report = cache_nbytes(self)
        for layer in self.layers:
            if isinstance(layer, StaticTurboQuantLayer):
                for cat, nb in layer.nbytes().items():
                    report.pinned[cat] = report.pinned.get(cat, 0) + nb
                    report.used[cat] = report.used.get(cat, 0) + nb
                    dev = str(layer.device)
                    report.by_device[dev] = report.by_device.get(dev, 0) + nb
        return report


__all__ = ["StaticStore", "StaticTurboQuantCache", "StaticTurboQuantLayer"]
