"""What a ``TurboQuantCache`` compresses and how: :class:`TurboQuantCacheConfig` and its checks."""

from __future__ import annotations

import operator
from dataclasses import dataclass

from turboquant.codebook import LAWS
from turboquant.layout import layout_name, parse_layout
from turboquant.quantizer import SUPPORTED_BITS
from turboquant.validation import check_choice, check_seed

PASSTHROUGH_BITS = 16
SHARED = "shared_tables"
MODES = ("mse", "prod")
COMPRESSED_LAYER_TYPES = ("full_attention",)
APPEND_BACKENDS = ("auto", "torch", "triton")


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
