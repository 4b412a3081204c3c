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
"""

from __future__ import annotations

import contextlib
import math
import operator
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterator

import torch
from transformers.cache_utils import (
    DYNAMIC_LAYER_TYPE_MAPPING,
    Cache,
    CacheLayerMixin,
    DynamicLayer,
    LinearAttentionCacheLayerMixin,
    get_layer_types_and_kwargs,
)

from turboquant.attention import (
    ATTENTION_NAME,
    HANDOFF_ATTENTIONS,
    CentroidTable,
    handoff,
    qjl_signs,
    register_attention,
    run_eagerly,
)
from turboquant.codebook import LAWS
from turboquant.layout import CodeLayout, build_layout, group_layout, layout_name, parse_layout, select_outliers
from turboquant.layout_quantizer import TurboQuantLayout
from turboquant.rotation import fwht
from turboquant.quantizer import NORM_DTYPE, SUPPORTED_BITS, TurboQuantMSE, TurboQuantProd
from turboquant.validation import check_choice, check_seed

PASSTHROUGH_BITS = 16
SHARED = "shared_tables"
MODES = ("mse", "prod")
COMPRESSED_LAYER_TYPES = ("full_attention",)
APPEND_BACKENDS = ("auto", "torch", "triton")


# ------------------------------------------------------------------------------------------------
# settings
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TurboQuantCacheConfig:
    """What the cache compresses and how.

    Args:
        key_bits, value_bits: bits a coordinate, one of ``SUPPORTED_BITS`` (1 ... 4, halves
            included), or 16 for both (passthrough: nothing compressed).
        key_mode, value_mode: ``"mse"`` (TurboQuant-mse) or ``"prod"`` (mse at b-1 bits + 1-bit QJL).
        key_layout, value_layout: the code layout (``turboquant.layout``): ``"halves-3.5"``,
            ``"halves-2.5"``, ``"paper-3.5"``, ``"paper-2.5"``, ``"int-<b>"``,
            ``"outliers-<n_out>-<b_hi>-<b_lo>"`` or ``(n_out, b_hi, b_lo)``. ``None``: from the
            bits (``b + 0.5`` -> halves, integer -> one segment). A one-group layout sets the bits;
            a preset sets them to its nominal width (``paper-3.5`` -> 3.5). Outlier layouts pick, per
            layer and KV head, the ``n_out`` channels of largest L2 norm over the first update
            (the prompt) and keep them; mse mode only.
        residual_length: full-precision window; flushed into codes as one block when it fills.
            0 compresses every token immediately.
        protected_layers: layer indices kept exact (negative indices count from the end).
        rotation: ``"hadamard"`` (head_dim a power of two) or ``"dense"``.
        seed: the quantizer of layer ``l``, tensor ``k|v`` is seeded from ``(seed, l, k|v)``;
            the QJL matrix ``S`` is one per cache (seeded from ``seed``).
        reserve_tokens: the first allocation of every code buffer holds at least this many tokens
            (0: exactly the first append). Growing a buffer allocates the larger one and copies the
            old one in, so at large batch x context the transient copy of one store can be what
            runs out of memory; reserving the expected length up front avoids every growth copy.
        chunk_tokens: code buffers grow by this many tokens (not by doubling), so the bytes pinned
            exceed the bytes used by less than one chunk.
        append_backend: how the stores encode appended keys/values and decode them back (the
            dequantized history a non-fused attention, e.g. sdpa during a chunked prefill, reads).
            ``"auto"``: the Triton ``quantize_pack`` kernel writing straight into the code buffers
            and the Triton ``dequantize`` kernel, on CUDA wherever they apply (mse mode, Hadamard
            rotation, head_dim 64/128/256, Triton installed), else the pure-torch quantizer;
            ``"torch"``: always the pure-torch quantizer (the reference; e.g. to measure the
            kernels' share of a prefill); ``"triton"``: always the kernels (raises where they do
            not apply; on CPU it needs ``TRITON_INTERPRET=1``). Both write the same
            layout; codes may differ for coordinates within float32 rounding of a codebook boundary
            (the kernel rotates with butterflies, the torch path with a GEMM) and norms by one
            float16 ulp (summation order).
    """

    key_bits: float = 3.5
    value_bits: float = 3.5
    key_mode: str = "mse"
    value_mode: str = "mse"
    residual_length: int = 16
    protected_layers: tuple[int, ...] = ()
    rotation: str = "hadamard"
    seed: int = 0
    law: str = "beta"
    chunk_tokens: int = 256
    reserve_tokens: int = 0
    append_backend: str = "auto"
    key_layout: str | tuple[int, int, int] | None = None
    value_layout: str | tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        self._set_layouts()
        allowed = (*SUPPORTED_BITS, PASSTHROUGH_BITS)
        for name in ("key_bits", "value_bits"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or float(v) not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}, got {v!r}")
        if (float(self.key_bits) == PASSTHROUGH_BITS) != (float(self.value_bits) == PASSTHROUGH_BITS):
            raise ValueError(
                f"`key_bits`={self.key_bits} and `value_bits`={self.value_bits}: the {PASSTHROUGH_BITS}-bit passthrough "
                "applies to both tensors or neither; protect whole layers with `protected_layers` instead"
            )
        for name in ("key_mode", "value_mode"):
            if getattr(self, name) not in MODES:
                raise ValueError(f"`{name}` must be one of {MODES}, got {getattr(self, name)!r}")
        for name, mode, bits in (("key", self.key_mode, self.key_bits), ("value", self.value_mode, self.value_bits)):
            if mode == "prod" and float(bits) in (1.5,):
                raise ValueError(f"`{name}_bits`={bits} with `{name}_mode`='prod' is not supported: prod needs 1 or >= 2 bits")
        if not isinstance(self.residual_length, int) or self.residual_length < 0:
            raise ValueError(f"`residual_length` must be an int >= 0, got {self.residual_length!r}")
        if not isinstance(self.chunk_tokens, int) or self.chunk_tokens < 1:
            raise ValueError(f"`chunk_tokens` must be an int >= 1, got {self.chunk_tokens!r}")
        if isinstance(self.reserve_tokens, bool) or not isinstance(self.reserve_tokens, int) or self.reserve_tokens < 0:
            raise ValueError(f"`reserve_tokens` must be an int >= 0, got {self.reserve_tokens!r}")
        if self.append_backend not in APPEND_BACKENDS:
            raise ValueError(f"`append_backend` must be one of {APPEND_BACKENDS}, got {self.append_backend!r}")
        if self.rotation not in ("hadamard", "dense"):
            raise ValueError(f"`rotation` must be one of ('hadamard', 'dense'), got {self.rotation!r}")
        object.__setattr__(self, "seed", check_seed(self.seed))
        check_choice(self.law, "law", LAWS)
        object.__setattr__(self, "protected_layers", _layer_indices(self.protected_layers))

    def _set_layouts(self) -> None:
        """Canonical layout names; one-group layouts and presets fix ``*_bits``."""
        for kind in ("key", "value"):
            spec = getattr(self, f"{kind}_layout")
            if spec is None:
                continue
            if float(getattr(self, f"{kind}_bits")) == PASSTHROUGH_BITS:
                raise ValueError(f"`{kind}_layout`={spec!r} with `{kind}_bits`={PASSTHROUGH_BITS} (passthrough): "
                                 f"give one or the other")
            p = parse_layout(spec, f"{kind}_layout")
            object.__setattr__(self, f"{kind}_layout", layout_name(p))
            if isinstance(p, float):
                object.__setattr__(self, f"{kind}_bits", p)
                continue
            if getattr(self, f"{kind}_mode") != "mse":
                raise ValueError(f"`{kind}_layout`={spec!r} is an outlier layout; it needs `{kind}_mode`='mse', "
                                 f"got {getattr(self, f'{kind}_mode')!r}")
            if isinstance(p, str):
                object.__setattr__(self, f"{kind}_bits", float(p.split("-")[1]))

    def layout_spec(self, kind: str) -> str | float:
        """What :func:`turboquant.layout.build_layout` builds for ``"k"`` / ``"v"``."""
        spec = self.key_layout if kind == "k" else self.value_layout
        return spec if spec is not None else float(self.key_bits if kind == "k" else self.value_bits)

    def recipe(self) -> str:
        """``K<layout>/V<layout>`` names, e.g. ``Kpaper-3.5/Vhalves-2.5``."""
        if self.passthrough:
            return "passthrough-16"
        return f"K{layout_name(self.layout_spec('k'))}/V{layout_name(self.layout_spec('v'))}"

    @property
    def passthrough(self) -> bool:
        return float(self.key_bits) == PASSTHROUGH_BITS


def _layer_indices(value: object) -> tuple[int, ...]:
    """``protected_layers``: one int or an iterable of ints (``1.7`` or ``True`` are not layer indices)."""
    items = (value,) if isinstance(value, int) and not isinstance(value, bool) else value
    try:
        items = tuple(items)
    except TypeError:
        raise TypeError(f"`protected_layers` must be an int or a tuple of ints, got {value!r}") from None
    for i in items:
        if isinstance(i, bool) or not hasattr(type(i), "__index__"):
            raise TypeError(f"`protected_layers` entries must be ints (layer indices), got {i!r} in {value!r}")
    return tuple(operator.index(i) for i in items)


def check_head_dim(head_dim: int, rotation: str) -> int:
    """The cache packs ``head_dim`` coordinates into bytes (fractional bits: two halves)."""
    if rotation == "hadamard":
        ok = head_dim >= 16 and head_dim & (head_dim - 1) == 0
        allowed = "a power of two >= 16 (16, 32, 64, 128, 256, ...) for rotation='hadamard'"
    else:
        ok = head_dim >= 16 and head_dim % 16 == 0
        allowed = "a multiple of 16 for rotation='dense'"
    if not ok:
        raise ValueError(f"`head_dim`={head_dim} is not supported by TurboQuantCache: head_dim must be {allowed}")
    return head_dim


# ------------------------------------------------------------------------------------------------
# one tensor's quantizer, in the form the attention reads
# ------------------------------------------------------------------------------------------------
_SHARED_S: dict = {}


def _shared_qjl_matrix(d: int, seed: int, device: torch.device) -> torch.Tensor:
    key = (d, seed, str(device))
    if key not in _SHARED_S:
        gen = torch.Generator().manual_seed(seed + 1_000_003)
        _SHARED_S[key] = torch.randn(d, d, generator=gen, dtype=torch.float32).to(device)
    return _SHARED_S[key]


_SHARED_H: dict = {}


def _shared_hadamard(d: int, device: torch.device) -> torch.Tensor:
    """Sylvester ``H_d / sqrt(d)`` (symmetric), shared by every layer: ``Π = H diag(s) / sqrt(d)``."""
    key = (d, str(device))
    if key not in _SHARED_H:
        h = fwht(torch.eye(d, dtype=torch.float32)) / math.sqrt(d)
        _SHARED_H[key] = h.to(device).contiguous()
    return _SHARED_H[key]


class TensorCodec:
    """TurboQuant quantizer of one (layer, K|V) plus its centroid table and rotation on ``device``.

    ``layout``: a spec for :func:`turboquant.layout.build_layout` (default: ``bits``). An outlier
    layout (two channel groups) runs :class:`TurboQuantLayout`: ``rotate``/``unrotate``/``encode``
    then take the store's per-head outlier channels."""

    def __init__(self, d: int, bits: float, mode: str, rotation: str, seed: int, qjl_seed: int, law: str,
                 device: torch.device, layout: object = None) -> None:
        self.d, self.bits, self.mode = d, float(bits), mode
        self.grouped = False
        if layout is not None and not isinstance(parse_layout(layout), float):
            if mode != "mse":
                raise ValueError(f"layout {layout_name(layout)!r} needs mode 'mse', got {mode!r}")
            self.grouped = True
            # dense group rotations: one per cache seed, shared by every layer (shared_tables)
            self.quantizer = TurboQuantLayout(
                build_layout(layout, d, rotation=rotation, seed=seed, law=law, shared_seed=qjl_seed), law=law)
            self.mse = self.quantizer
            self.layout: CodeLayout = self.quantizer.layout
            self.S, self.qjl_scale = None, 0.0
            segs = [(sg.start, sg.stop, sg.bits, sg.codebook) for sg in self.layout.segments]
            self.table = CentroidTable.shared(d, segs, device)
            # per group: code-space coords [a, b), norm slot, code bytes [b0, b1), a table at the
            # group's own dimension (what the CPU C kernel scores one group at a time with)
            self.group_tables = []
            for i, g in enumerate(self.layout.groups):
                local = [(sg.start, sg.stop, sg.bits, sg.codebook) for sg in group_layout(self.layout, i).segments]
                self.group_tables.append((g.start, g.start + g.size, g.norm_slot, g.byte_start,
                                          g.byte_start + g.code_nbytes, CentroidTable.shared(g.size, local, device)))
            self.rotation = None
            self.code_nbytes = self.layout.code_nbytes
            self._signs = self._h = self._pi = self._pi_t = None
            # what the groups' rotations hold: Hadamard signs s, or the dense Π (turboquant.rotation)
            self._group_rot = [g.rotation.signs if g.rotation.kind == "hadamard" else g.rotation._q
                               for g in self.layout.groups]
            return
        if mode == "prod":
            self.quantizer: TurboQuantMSE | TurboQuantProd = TurboQuantProd(d, bits, rotation, seed, law, qjl_seed=qjl_seed)
            # one S per cache: identical values for every layer, stored once (C04: the bias of one fixed S)
            self.quantizer.S = _shared_qjl_matrix(d, qjl_seed, torch.device("cpu"))
            self.quantizer._s_cache = {}
            self.mse = self.quantizer.mse
            self.S = _shared_qjl_matrix(d, qjl_seed, device)
            self.qjl_scale = self.quantizer.qjl_scale
        else:
            self.quantizer = TurboQuantMSE(d, bits, rotation, seed, law)
            self.mse = self.quantizer
            self.S = None
            self.qjl_scale = 0.0
        self.layout = self.mse.layout if self.mse is not None else None
        self.table = CentroidTable.shared(d, self.mse.segments, device) if self.mse is not None else None
        self.rotation = self.mse.rotation if self.mse is not None else None
        self.code_nbytes = self.mse.code_nbytes if self.mse is not None else 0
        self._signs = self._h = self._pi = self._pi_t = None
        if self.rotation is not None and self.rotation.kind == "hadamard":
            self._signs = self.rotation.signs.to(device)
            self._h = _shared_hadamard(d, device)
        elif self.rotation is not None:
            self._pi = self.rotation.matrix().to(device).contiguous()  # Π, [d, d]
            self._pi_t = self._pi.T.contiguous()

    @property
    def nbytes_per_vector(self) -> int:
        """Ideal stored bytes a vector: packed codes + float16 norm(s) (+ QJL plane)."""
        return self.quantizer.nbytes_per_vector

    def rotate(self, x: torch.Tensor, outliers: torch.Tensor | None = None) -> torch.Tensor:
        """``Π x``; Hadamard: ``(x ⊙ s) H / sqrt(d)`` (one small matmul with the shared ``H``).
        Outlier layouts: ``x`` [B, H, M, D] gathered into code order (``outliers`` [H, n_out]) and
        rotated per group."""
        if self.grouped:
            return self.quantizer.rotate(x, _per_head(outliers))
        if self._signs is None:
            return torch.matmul(x, self._pi_t)
        return torch.matmul(x * self._signs, self._h)

    def unrotate(self, y: torch.Tensor, outliers: torch.Tensor | None = None) -> torch.Tensor:
        """``Π^T y``; Hadamard: ``s ⊙ (y H / sqrt(d))``. Outlier layouts: per group, then
        scattered back to the raw channels."""
        if self.grouped:
            return self.quantizer.unrotate(y, _per_head(outliers))
        if self._signs is None:
            return torch.matmul(y, self._pi)
        return torch.matmul(y, self._h) * self._signs

    def scale_norms(self, cents: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """``||x|| c[idx]`` (code space) from centroids [..., n, D] and stored norms [..., n]
        (outlier layouts: [..., n, groups], each group's coordinates times its own norm)."""
        if not self.grouped:
            return cents * norms.float().unsqueeze(-1)
        sizes = [g.size for g in self.layout.groups]
        return cents * torch.repeat_interleave(norms.float(), torch.tensor(sizes, device=norms.device), dim=-1)

    def group_slices(self) -> list[tuple[int, int, int]]:
        """``(start, stop, norm slot)`` of every group in code space."""
        if not self.grouped:
            return [(0, self.d, -1)]
        return [(g.start, g.start + g.size, g.norm_slot) for g in self.layout.groups]

    def encode(self, x: torch.Tensor, outliers: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """``x`` [..., d] -> (codes, norms, qjl, rnorms) as stored (``None`` where the mode has none)."""
        if self.grouped:
            packed = self.quantizer.pack(self.quantizer.quantize(x, _per_head(outliers)))
            return packed.codes, packed.norms, None, None
        packed = self.quantizer.pack(self.quantizer.quantize(x))
        if self.mode == "mse":
            return packed.codes, packed.norms, None, None
        mse = packed.mse
        return (mse.codes if mse else None), (mse.norms if mse else None), packed.qjl, packed.rnorms


def _per_head(outliers: torch.Tensor | None) -> torch.Tensor | None:
    """Outlier channels [H, n_out] -> [H, 1, n_out]: broadcast over a store's [B, H, T, D]."""
    return None if outliers is None else outliers.long().unsqueeze(-2)


def _codec_seed(seed: int, layer_idx: int, kind: str) -> int:
    return (seed * 100_003 + layer_idx) * 2 + (0 if kind == "k" else 1)


# ------------------------------------------------------------------------------------------------
# storage
# ------------------------------------------------------------------------------------------------
_WARNED_LAYOUTS: set = set()


def _warn_layout_fallback(name: str, why: str) -> None:
    """``append_backend='auto'``: one ``RuntimeWarning`` a layout whose codes the kernels cannot run."""
    if name not in _WARNED_LAYOUTS:
        _WARNED_LAYOUTS.add(name)
        warnings.warn(f"append_backend='auto': the Triton kernels cannot run {why}; encoding and decoding with "
                      "the pure-torch quantizer instead", RuntimeWarning, stacklevel=4)


def _norm_range_message(start: int, stop: int, kept: int) -> str:
    f16 = torch.finfo(NORM_DTYPE)
    return (f"a vector norm appended at tokens [{start}, {stop}) lies outside the float16 norm storage range "
            f"[{f16.tiny:.3g}, {f16.max:.0f}] (or is not finite); the store keeps its first {kept} tokens")


class PackedStore:
    """Packed codes of one (layer, K|V): tokens ``[0, length)`` of buffers of ``capacity`` tokens.

    ``codes`` uint8 [B, H, cap, code_nbytes] (bit planes, rotated domain); ``norms`` float16
    [B, H, cap]; prod mode: ``qjl`` uint8 [B, H, cap, D/8], ``rnorms`` float16 [B, H, cap].
    Outlier layouts: ``norms`` float16 [B, H, cap, groups] and ``outliers`` [H, n_out] (the
    layout's index dtype), the raw channels of the outlier group of each head, fixed at the first
    update (:meth:`set_outliers`).
    """

    FIELDS = ("codes", "norms", "qjl", "rnorms")
    # CUDA kernel appends check the float16 norm range without a host sync (see append / check_norms);
    # False: a blocking check at every append (benchmarks compare the two)
    defer_norm_check = True

    def __init__(self, codec: TensorCodec, chunk_tokens: int, backend: str = "auto", reserve_tokens: int = 0) -> None:
        if backend not in APPEND_BACKENDS:
            raise ValueError(f"`backend` must be one of {APPEND_BACKENDS}, got {backend!r}")
        self.codec = codec
        self.chunk_tokens = chunk_tokens
        self.reserve_tokens = reserve_tokens
        self.backend = backend
        self.codes: torch.Tensor | None = None
        self.norms: torch.Tensor | None = None
        self.qjl: torch.Tensor | None = None
        self.rnorms: torch.Tensor | None = None
        self.outliers: torch.Tensor | None = None
        self.length = 0
        self.capacity = 0
        self.kernel_appends = 0  # appends encoded by the Triton kernel (the rest: pure torch)
        self.kernel_dequantizes = 0  # dequantize calls served by the Triton kernel
        self._pending_checks: list = []  # (event, pinned bool, start, stop) of deferred norm checks
        self._tables: dict = {}  # (device, dtype, dim) -> KernelTables, or None where the kernel does not apply

    def _buffers(self) -> dict[str, torch.Tensor]:
        return {f: getattr(self, f) for f in self.FIELDS if getattr(self, f) is not None}

    # -- encoding backends ------------------------------------------------------------------------
    def kernel_unsupported(self, x: torch.Tensor) -> str | None:
        """Why the Triton ``quantize_pack`` kernel cannot encode ``x`` into this store (``None``: it can)."""
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"dtype {x.dtype} (the kernel reads float32/float16/bfloat16)"
        if x.dim() != 4:
            return f"a {x.dim()}-dim input (the store appends [B, H, T, D])"
        return self._codec_unsupported(x.device)

    def _codec_unsupported(self, device: torch.device) -> str | None:
        """Why the Triton kernels (``quantize_pack``, ``dequantize``) cannot serve this store's
        codec on ``device`` (``None``: they can)."""
        c = self.codec
        if c.grouped:
            return (f"layout {c.layout.name!r} ({len(c.layout.groups)} channel groups; the kernels run "
                    "one-group layouts: halves-* and int-*)")
        if c.mode != "mse":
            return f"mode {c.mode!r} (the kernels handle 'mse' codes only, no QJL plane)"
        if c.rotation is None or c.rotation.kind != "hadamard":
            return f"rotation {getattr(c.rotation, 'kind', None)!r} (the kernels rotate with the Hadamard transform only)"
        from turboquant.kernels import SUPPORTED_HEAD_DIMS, SUPPORTED_KERNEL_BITS, kernels_available

        if c.d not in SUPPORTED_HEAD_DIMS:
            return f"head_dim {c.d} (the kernels support {SUPPORTED_HEAD_DIMS})"
        if c.bits not in SUPPORTED_KERNEL_BITS:
            return f"{c.bits} bits (the kernels support {SUPPORTED_KERNEL_BITS})"
        if not kernels_available(device):
            return f"device {device} (the kernels need Triton with CUDA, or the CPU under TRITON_INTERPRET=1)"
        return None

    def _kernel_tables(self, x: torch.Tensor):
        """The kernel's tables when this append goes through the Triton kernel, else ``None``."""
        if self.backend == "torch" or (self.backend == "auto" and not x.is_cuda):
            return None
        return self._tables_for((x.device, x.dtype, x.dim()), x.device, lambda: self.kernel_unsupported(x),
                                "encode this append")

    def _tables_for(self, key, device: torch.device, unsupported, action: str):
        """Cached per ``key``: the quantizer's ``KernelTables`` on ``device`` when ``unsupported()``
        finds no reason against the kernel, else ``None`` (``backend='triton'`` raises instead)."""
        if key not in self._tables:
            why = unsupported()
            if why is not None and self.backend == "triton":
                raise ValueError(
                    f"`append_backend`='triton' cannot {action}: {why}; use append_backend='auto' "
                    "(kernel where it applies, pure torch elsewhere) or 'torch'"
                )
            if why is not None and self.codec.grouped:
                _warn_layout_fallback(self.codec.layout.name, why)
            if why is None:
                from turboquant.kernels import KernelTables

                self._tables[key] = KernelTables.from_quantizer(self.codec.quantizer, device)
            else:
                self._tables[key] = None
        return self._tables[key]

    def _reserve(self, need: int, specs: dict[str, tuple[tuple[int, ...], tuple[int, ...], torch.dtype, torch.device]]) -> None:
        """Grow the buffers named in ``specs`` (field -> (lead dims, trailing dims, dtype, device)) to hold
        ``need`` tokens: the first allocation exact (at least ``reserve_tokens``), later growth in whole
        chunks (a new buffer, the old tokens copied in)."""
        if need <= self.capacity:
            return
        t = need - self.length
        cap = max(need, self.reserve_tokens) if self.capacity == 0 else \
            self.length + math.ceil(t / self.chunk_tokens) * self.chunk_tokens
        cap = max(cap, need)
        for f, (lead, trail, dtype, device) in specs.items():
            buf = torch.empty((*lead, cap, *trail), dtype=dtype, device=device)
            old = getattr(self, f)
            if old is not None and self.length:
                buf[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, f, buf)
        self.capacity = cap

    def check_norms(self, wait: bool = False) -> None:
        """Read the deferred float16 norm-range checks of CUDA kernel appends whose verdict has
        landed (all of them with ``wait=True``, which waits for the GPU). A failed one crops the
        store to the tokens before that append and raises ``ValueError``."""
        while self._pending_checks:
            done, flag, start, stop = self._pending_checks[0]
            if not done.query():
                if not wait:
                    return
                done.synchronize()
            self._pending_checks.pop(0)
            if not bool(flag):
                self._pending_checks.clear()
                self.length = min(self.length, start)
                raise ValueError(_norm_range_message(start, stop, self.length))

    def set_outliers(self, x: torch.Tensor) -> None:
        """Outlier layouts: fix each head's outlier channels from ``x`` [B, H, T, D] (the first
        update: the prompt), the ``n_out`` of largest L2 norm over batch and tokens. Once."""
        if self.codec.grouped and self.outliers is None:
            lay = self.codec.layout
            self.outliers = select_outliers(x, lay.n_out).to(device=x.device, dtype=lay.index_dtype)

    def append(self, x: torch.Tensor) -> None:
        """Quantize and pack ``x`` [B, H, T, D] after the stored tokens.

        On CUDA (``backend`` ``"auto"``) the Triton ``quantize_pack`` kernel writes the codes and
        norms straight into ``codes[:, :, L:L+T]`` / ``norms[:, :, L:L+T]`` (one pass over ``x``, no
        intermediate tensors); elsewhere the pure-torch quantizer encodes and the result is copied in.
        """
        self.check_norms()
        t = x.shape[-2]
        if t == 0:
            return
        need = self.length + t
        tables = self._kernel_tables(x)
        if tables is not None:
            from turboquant.kernels import quantize_pack

            lead = tuple(x.shape[:2])
            self._reserve(need, {"codes": (lead, (tables.code_nbytes,), torch.uint8, x.device),
                                 "norms": (lead, (), NORM_DTYPE, x.device)})
            codes, norms = self.codes[:, :, self.length : need], self.norms[:, :, self.length : need]
            quantize_pack(x, tables, out_codes=codes, out_norms=norms, check_range=False)
            # a norm beyond float16 (or a non-finite input) is stored as inf/nan: the stored norms
            # are checked instead of re-reading x. On CUDA the verdict is copied to pinned memory
            # without stalling the host (a blocking check is a host sync at every append: it drains
            # the launch queue 2x a full-attention layer a prefill chunk) and read by check_norms()
            # once it has landed: at the latest at the next update/append/read of this store.
            # also refused, like the torch path: a stored float16 subnormal norm (0 < n < 6.1e-5); a norm
            # that underflowed to an exact 0 cannot be told from a zero vector here
            ok = torch.isfinite(norms).all() & ~((norms > 0) & (norms < torch.finfo(NORM_DTYPE).tiny)).any()
            start, self.length = self.length, need
            self.kernel_appends += 1
            if x.is_cuda and self.defer_norm_check:
                flag = torch.empty((), dtype=torch.bool, pin_memory=True)
                flag.copy_(ok, non_blocking=True)
                done = torch.cuda.Event()
                done.record(torch.cuda.current_stream(x.device))
                self._pending_checks.append((done, flag, start, need))
            elif not bool(ok):
                self.length = start  # not committed
                raise ValueError(_norm_range_message(start, need, start))
            return
        self.set_outliers(x)
        parts = {f: p for f, p in zip(self.FIELDS, self.codec.encode(x, self.outliers)) if p is not None}
        self._reserve(need, {f: (tuple(p.shape[:2]), tuple(p.shape[3:]), p.dtype, p.device) for f, p in parts.items()})
        for f, p in parts.items():
            getattr(self, f)[:, :, self.length : need] = p
        self.length = need

    def _dequantize_tables(self):
        """The kernel's tables when ``dequantize`` goes through the Triton kernel, else ``None``."""
        if self.codes is None or self.backend == "torch" or (self.backend == "auto" and not self.codes.is_cuda):
            return None
        dev = self.codes.device
        return self._tables_for(("dequantize", dev), dev, lambda: self._codec_unsupported(dev), "dequantize this store")

    def dequantize(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction ``x̃`` [B, H, length, D] (transient; for the non-fused attention path and tests).

        On CUDA (``backend`` ``"auto"``) the Triton ``dequantize`` kernel writes ``x̃`` in one pass;
        elsewhere the pure-torch path (centroid gather + ``Π^T`` GEMM). ``out``: optional
        [B, H, >= length, D] destination whose first ``length`` rows are written (no extra copy on
        the kernel path); returns those rows.
        """
        self.check_norms()
        c, n = self.codec, self.length
        tables = self._dequantize_tables()
        if tables is not None:
            from turboquant.kernels.dequantize import dequantize

            self.kernel_dequantizes += 1
            return dequantize(self.codes, self.norms, n, tables, dtype, out=out)
        res = None
        if self.codes is not None:
            y = c.scale_norms(c.table.gather(self.codes[:, :, :n]), self.norms[:, :, :n])
            res = c.unrotate(y, self.outliers)
        if self.qjl is not None:
            z = qjl_signs(self.qjl[:, :, :n], c.d)
            o = c.qjl_scale * self.rnorms[:, :, :n].float().unsqueeze(-1) * (z @ c.S)
            res = o if res is None else res + o
        if out is None:
            return res.to(dtype)
        out[:, :, :n] = res
        return out[:, :, :n]

    def snapshot(self) -> tuple:
        """The store's state before a write (buffers by reference, length, capacity, pending checks):
        :meth:`restore` puts it back exactly, bytes included (a grown buffer is dropped)."""
        return self.length, self.capacity, self._buffers(), list(self._pending_checks), self.outliers

    def restore(self, state: tuple) -> None:
        self.length, self.capacity, buffers, pending, self.outliers = state
        for f in self.FIELDS:
            setattr(self, f, buffers.get(f))
        self._pending_checks = pending

    def crop(self, n_keep: int) -> None:
        self.length = min(self.length, max(0, n_keep))
        self._pending_checks = [p for p in self._pending_checks if p[2] < self.length]

    def index_batch(self, fn) -> None:
        for f, buf in self._buffers().items():
            setattr(self, f, fn(buf))

    def used_nbytes(self) -> dict[str, int]:
        out = {}
        for f, buf in self._buffers().items():
            per_token = buf[:, :, :1].numel() * buf.element_size()
            out[f] = per_token * self.length
        return out


# ------------------------------------------------------------------------------------------------
# layers
# ------------------------------------------------------------------------------------------------
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
        return TensorCodec(self.head_dim, bits, mode, s.rotation, _codec_seed(s.seed, self.layer_idx, kind), s.seed, s.law, device,
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


# ------------------------------------------------------------------------------------------------
# the cache
# ------------------------------------------------------------------------------------------------
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

    def nbytes(self) -> "MemoryReport":
        return cache_nbytes(self)


# ------------------------------------------------------------------------------------------------
# memory accounting
# ------------------------------------------------------------------------------------------------
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
                for t in _held_tensors((store.codec, store._tables)):
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


# ------------------------------------------------------------------------------------------------
# switching a model's attention
# ------------------------------------------------------------------------------------------------
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


__all__ = [
    "TurboQuantCacheConfig",
    "TurboQuantCache",
    "TurboQuantLayer",
    "ExactLayer",
    "PackedStore",
    "TensorCodec",
    "MemoryReport",
    "cache_nbytes",
    "ideal_kv_nbytes",
    "check_head_dim",
    "attention_shape",
    "turboquant_attention",
]
