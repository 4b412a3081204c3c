"""TurboQuant quantizers (Zandieh et al., arXiv 2504.19874) and the scalar no-rotation baseline.

* :class:`TurboQuantMSE` — ``Q(x) = (||x||, idx)``, ``idx_j = argmin_k |(Π x/||x||)_j - c_k|``;
  ``x̃ = ||x|| Π^T c[idx]``. E||x - x̃||² = D_mse(b) ||x||² (Theorem 1: ≤ (√3π/2) 4^-b).
* :class:`TurboQuantProd` — MSE at b-1 bits, then QJL on the residual ``r = x - x̃_mse``:
  ``z = sign(S r)``, ``x̃ = x̃_mse + √(π/2)/d · ||r|| · S^T z``; unbiased: E_S <y, x̃> = <y, x>.
* :class:`ScalarQuantizer` — per-vector min/max uniform grid, no rotation (the seed's baseline).

Fractional widths b + 0.5 (1.5, 2.5, 3.5) split the rotated coordinates: the first d/2 use b+1
bits, the rest b bits. After the rotation every coordinate has the same law, so the split needs no
calibration; it costs exactly (b + 0.5)·d bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from turboquant.codebook import LAWS, Codebook
from turboquant.layout import CodeLayout, build_layout
from turboquant.packing import pack_bits, packed_nbytes, unpack_bits
from turboquant.validation import (
    check_choice,
    check_float_dtype,
    check_float_tensor,
    check_packed,
    check_seed,
)

SUPPORTED_BITS = (1, 1.5, 2, 2.5, 3, 3.5, 4)
NORM_DTYPE = torch.float16
_NORM_MAX = torch.finfo(NORM_DTYPE).max


def parse_bits(bits: float, name: str = "bits", allowed: tuple = SUPPORTED_BITS) -> float:
    """Validate a bit width; return it as a float (1, 1.5, ..., 4)."""
    if isinstance(bits, bool) or not isinstance(bits, (int, float)):
        raise TypeError(f"`{name}` must be a number in {allowed}, got {type(bits).__name__}")
    if float(bits) not in allowed:
        raise ValueError(f"`{name}` must be one of {allowed}, got {bits!r}")
    return float(bits)


_NORM_TINY = torch.finfo(NORM_DTYPE).tiny  # smallest normal float16, 6.1e-5


def _round_norms(norms: torch.Tensor, name: str, refuse_tiny: bool = True) -> torch.Tensor:
    """Norms are stored as float16: round now so quantize->dequantize equals pack->unpack->dequantize.

    A norm above the float16 range is refused; so is a nonzero vector norm below float16's normal
    range (``refuse_tiny``): stored, it would lose relative precision (subnormal) or decode to an
    exact zero vector (below ~6e-8). Exact zero vectors are stored exactly."""
    if norms.numel() and float(norms.max()) > _NORM_MAX:
        raise ValueError(f"{name} {float(norms.max()):.4g} exceeds the float16 norm storage range ({_NORM_MAX:.0f})")
    if refuse_tiny and norms.numel():
        tiny = (norms > 0) & (norms < _NORM_TINY)
        if bool(tiny.any()):
            raise ValueError(
                f"{int(tiny.sum())} nonzero {name}(s) (smallest {float(norms[tiny].min()):.3g}) lie below the "
                f"float16 norm storage range [{_NORM_TINY:.3g}, {_NORM_MAX:.0f}] (or exactly 0): they would be "
                "stored imprecisely or as exact zeros; scale the input"
            )
    return norms.to(NORM_DTYPE).to(torch.float32)


@dataclass
class MSEQuantized:
    """Unpacked TurboQuant-mse codes: ``idx`` uint8 [..., d] (rotated domain), ``norms`` float32 [...]."""

    idx: torch.Tensor
    norms: torch.Tensor


@dataclass
class PackedMSE:
    """Stored form: ``codes`` uint8 [..., d·b/8] (bit planes), ``norms`` float16 [...]."""

    codes: torch.Tensor
    norms: torch.Tensor

    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.norms.numel() * self.norms.element_size()


@dataclass
class ProdQuantized:
    """TurboQuant-prod codes: MSE part (None at 1 bit), QJL signs (bool [..., d]), residual norms."""

    mse: MSEQuantized | None
    signs: torch.Tensor
    rnorms: torch.Tensor


@dataclass
class PackedProd:
    """Stored form: MSE codes + norms (absent at 1 bit), 1-bit QJL plane uint8 [..., d/8], rnorms float16."""

    mse: PackedMSE | None
    qjl: torch.Tensor
    rnorms: torch.Tensor

    def nbytes(self) -> int:
        n = self.qjl.numel() + self.rnorms.numel() * self.rnorms.element_size()
        return n + (self.mse.nbytes() if self.mse is not None else 0)


class TurboQuantMSE:
    """TurboQuant-mse: rotate, Lloyd-Max scalar-quantize every coordinate, keep the norm.

    Args:
        d: vector dimension (a power of two for ``rotation='hadamard'``; a multiple of 8, or of 16
            for fractional bits, so codes pack into whole bytes).
        bits: 1, 1.5, 2, 2.5, 3, 3.5 or 4 bits per coordinate.
        rotation: ``'hadamard'`` (signed FWHT, O(d log d)) or ``'dense'`` (Haar QR, O(d²)).
        seed: seeds the rotation.
        law: codebook law, ``'beta'`` (exact at d) or ``'gaussian'`` (N(0, 1/d) limit).
    """

    def __init__(self, d: int, bits: float, rotation: str = "hadamard", seed: int = 0, law: str = "beta") -> None:
        self.bits = parse_bits(bits)
        if not isinstance(d, int) or isinstance(d, bool) or d < 8:
            raise ValueError(f"`d` must be an int >= 8, got {d!r}")
        whole = math.floor(self.bits)
        if self.bits != whole and d % 16:
            raise ValueError(f"fractional `bits`={self.bits} needs d to be a multiple of 16, got d={d}")
        if self.bits == whole and d % 8:
            raise ValueError(f"`d` must be a multiple of 8 so codes pack into bytes, got d={d}")
        self.d = d
        self.seed = check_seed(seed)
        self.law = check_choice(law, "law", LAWS)
        self._init_from_group(build_layout(self.bits, d, rotation=rotation, seed=seed, law=law))

    def _init_from_group(self, layout: CodeLayout) -> None:
        """Take rotation and segments from a one-group layout (the halves / integer formats)."""
        if layout.is_grouped:
            raise ValueError(f"TurboQuantMSE runs one channel group; layout {layout.name!r} has "
                             f"{len(layout.groups)} (use TurboQuantLayout)")
        self.layout = layout
        group = layout.groups[0]
        self.rotation = group.rotation
        self.segments: list[tuple[int, int, int, Codebook]] = [
            (s.start, s.stop, s.bits, s.codebook) for s in group.segments
        ]
        self._tables: dict = {}

    @classmethod
    def from_layout(cls, layout: CodeLayout, law: str = "beta", seed: int = 0) -> TurboQuantMSE:
        """The quantizer of a one-group layout (e.g. :func:`turboquant.layout.group_layout`)."""
        q = cls.__new__(cls)
        q.bits = layout.code_bits
        q.d, q.seed, q.law = layout.d, seed, law
        q._init_from_group(layout)
        return q

    # -- sizes -------------------------------------------------------------------------------
    @property
    def code_nbytes(self) -> int:
        """Packed code bytes per vector: d · bits / 8 (the layout's)."""
        return self.layout.code_nbytes

    @property
    def nbytes_per_vector(self) -> int:
        """Stored bytes per vector: codes + one float16 norm (the layout's)."""
        return self.layout.nbytes_per_vector

    @property
    def distortion(self) -> float:
        """Expected D_mse for unit vectors: the d-weighted mean of the segments' Lloyd-Max values."""
        return sum((b - a) * cb.distortion for a, b, _, cb in self.segments) / self.d

    def _table(self, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if device not in self._tables:
            self._tables[device] = [
                (cb.boundaries_tensor(device), cb.centroids_tensor(device)) for _, _, _, cb in self.segments
            ]
        return self._tables[device]

    # -- quantize / dequantize ----------------------------------------------------------------
    def quantize(self, x: torch.Tensor) -> MSEQuantized:
        """``x`` [..., d] float -> codes (rotated domain) and norms."""
        check_float_tensor(x, "x", self.d)
        xf = x.to(torch.float32)
        norms = torch.linalg.vector_norm(xf, dim=-1)
        y = self.rotation.apply(xf / norms.clamp_min(1e-30).unsqueeze(-1))
        parts = [
            torch.bucketize(y[..., a:b].contiguous(), bounds).to(torch.uint8)
            for (a, b, _, _), (bounds, _) in zip(self.segments, self._table(y.device))
        ]
        return MSEQuantized(idx=torch.cat(parts, dim=-1), norms=_round_norms(norms, "vector norm"))

    def centroid_values(self, idx: torch.Tensor) -> torch.Tensor:
        """``c[idx]`` in the rotated domain, float32 [..., d] (unit scale)."""
        parts = [
            cents[idx[..., a:b].long()]
            for (a, b, _, _), (_, cents) in zip(self.segments, self._table(idx.device))
        ]
        return torch.cat(parts, dim=-1)

    def dequantize_rotated(self, q: MSEQuantized) -> torch.Tensor:
        """``||x|| c[idx]``: the reconstruction in the rotated domain (``Π x̃``)."""
        return self.centroid_values(q.idx) * q.norms.unsqueeze(-1)

    def dequantize(self, q: MSEQuantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``x̃ = ||x|| Π^T c[idx]``."""
        check_float_dtype(dtype)
        return self.rotation.invert(self.dequantize_rotated(q)).to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize and reconstruct (convenience for measurements)."""
        return self.dequantize(self.quantize(x), dtype=torch.float32)

    # -- storage -------------------------------------------------------------------------------
    def pack(self, q: MSEQuantized) -> PackedMSE:
        codes = torch.cat([pack_bits(q.idx[..., a:b], nb) for a, b, nb, _ in self.segments], dim=-1)
        return PackedMSE(codes=codes, norms=q.norms.to(NORM_DTYPE))

    def unpack(self, p: PackedMSE) -> MSEQuantized:
        if not isinstance(p, PackedMSE):
            raise TypeError(f"`p` must be a PackedMSE (from `pack`/`encode`), got {type(p).__name__}")
        check_packed(p.codes, "codes", torch.uint8, last=self.code_nbytes)
        check_packed(p.norms, "norms", NORM_DTYPE, lead=p.codes.shape[:-1])
        parts = [
            unpack_bits(p.codes[..., s.byte_start : s.byte_start + s.nbytes], s.bits, s.size)
            for s in self.layout.segments
        ]
        return MSEQuantized(idx=torch.cat(parts, dim=-1), norms=p.norms.to(torch.float32))

    def encode(self, x: torch.Tensor) -> PackedMSE:
        return self.pack(self.quantize(x))

    def decode(self, p: PackedMSE, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.dequantize(self.unpack(p), dtype)


class TurboQuantProd:
    """TurboQuant-prod: MSE at ``bits - 1`` plus a 1-bit QJL sketch of the residual (unbiased IPs).

    ``S ~ N(0, 1)^{d×d}`` is drawn from ``qjl_seed`` (default ``seed + 1_000_003``). At ``bits = 1``
    the MSE stage is empty and the whole vector is the residual.
    """

    def __init__(
        self,
        d: int,
        bits: float,
        rotation: str = "hadamard",
        seed: int = 0,
        law: str = "beta",
        qjl_seed: int | None = None,
    ) -> None:
        self.bits = parse_bits(bits)
        if self.bits < 2 and self.bits != 1:
            raise ValueError(f"`bits` for TurboQuantProd must be one of (1, 2, 2.5, 3, 3.5, 4), got {bits!r}")
        if not isinstance(d, int) or isinstance(d, bool) or d < 8 or d % 8:
            raise ValueError(f"`d` must be a multiple of 8 (>= 8), got {d!r}")
        if self.bits % 1 and d % 16:
            raise ValueError(
                f"fractional `bits`={bits} for TurboQuantProd (its MSE stage takes {self.bits - 1} bits) needs d "
                f"to be a multiple of 16, got d={d}"
            )
        self.d = d
        self.seed = check_seed(seed)
        self.mse = TurboQuantMSE(d, self.bits - 1, rotation, seed, law) if self.bits > 1 else None
        self.qjl_seed = seed + 1_000_003 if qjl_seed is None else check_seed(qjl_seed, "qjl_seed")
        gen = torch.Generator().manual_seed(self.qjl_seed)
        self.S = torch.randn(d, d, generator=gen, dtype=torch.float32)
        self._s_cache: dict = {}
        self.qjl_scale = math.sqrt(math.pi / 2) / d

    def _S_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._s_cache:
            self._s_cache[device] = self.S.to(device)
        return self._s_cache[device]

    @property
    def code_nbytes(self) -> int:
        return (self.mse.code_nbytes if self.mse else 0) + self.d // 8

    @property
    def nbytes_per_vector(self) -> int:
        """MSE codes + QJL plane + rnorm (+ the MSE norm when bits > 1), float16 norms."""
        return self.code_nbytes + NORM_DTYPE.itemsize * (2 if self.mse else 1)

    def quantize(self, x: torch.Tensor) -> ProdQuantized:
        check_float_tensor(x, "x", self.d)
        xf = x.to(torch.float32)
        if self.mse is not None:
            q_mse = self.mse.quantize(xf)
            r = xf - self.mse.dequantize(q_mse)
        else:
            q_mse, r = None, xf
        signs = (r @ self._S_on(r.device).T) >= 0
        if q_mse is None:  # 1 bit: the residual is the vector itself
            _round_norms(torch.linalg.vector_norm(xf, dim=-1), "vector norm")
        # the residual of a well-quantized vector may be tiny: its float16 rounding only scales the
        # QJL correction, so it is not refused
        rnorms = _round_norms(torch.linalg.vector_norm(r, dim=-1), "residual norm", refuse_tiny=False)
        return ProdQuantized(mse=q_mse, signs=signs, rnorms=rnorms)

    def qjl_dequantize(self, q: ProdQuantized) -> torch.Tensor:
        """``√(π/2)/d · ||r|| · S^T z`` with ``z = ±1``."""
        z = q.signs.to(torch.float32) * 2 - 1
        return self.qjl_scale * q.rnorms.unsqueeze(-1) * (z @ self._S_on(z.device))

    def dequantize(self, q: ProdQuantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        check_float_dtype(dtype)
        if (q.mse is None) != (self.mse is None):
            raise ValueError(f"`q.mse` is {'missing' if q.mse is None else 'present'}, but a {self.bits:g}-bit "
                             f"TurboQuantProd {'has' if self.mse is not None else 'has no'} MSE stage")
        out = self.qjl_dequantize(q)
        if q.mse is not None:
            out = out + self.mse.dequantize(q.mse)
        return out.to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequantize(self.quantize(x))

    def inner_product(self, y: torch.Tensor, q: ProdQuantized) -> torch.Tensor:
        """Estimate ``<y, x>`` for every pair: y [m, d], codes of [n, d] -> [m, n]."""
        check_float_tensor(y, "y", self.d)
        return y.to(torch.float32) @ self.dequantize(q).reshape(-1, self.d).T

    def pack(self, q: ProdQuantized) -> PackedProd:
        return PackedProd(
            mse=self.mse.pack(q.mse) if q.mse is not None else None,
            qjl=pack_bits(q.signs.to(torch.uint8), 1),
            rnorms=q.rnorms.to(NORM_DTYPE),
        )

    def unpack(self, p: PackedProd) -> ProdQuantized:
        if not isinstance(p, PackedProd):
            raise TypeError(f"`p` must be a PackedProd (from `pack`/`encode`), got {type(p).__name__}")
        if (p.mse is None) != (self.mse is None):
            raise ValueError(f"`p.mse` is {'missing' if p.mse is None else 'present'}, but a {self.bits:g}-bit "
                             f"TurboQuantProd {'stores' if self.mse is not None else 'stores no'} MSE codes "
                             "(decoding only the QJL part would be silently wrong)")
        check_packed(p.qjl, "qjl", torch.uint8, last=self.d // 8)
        check_packed(p.rnorms, "rnorms", NORM_DTYPE, lead=p.qjl.shape[:-1])
        if p.mse is not None and tuple(p.mse.codes.shape[:-1]) != tuple(p.qjl.shape[:-1]):
            raise ValueError(f"`p.mse.codes` cover vectors of shape {tuple(p.mse.codes.shape[:-1])}, "
                             f"but `p.qjl` covers {tuple(p.qjl.shape[:-1])}")
        return ProdQuantized(
            mse=self.mse.unpack(p.mse) if p.mse is not None else None,
            signs=unpack_bits(p.qjl, 1, self.d).bool(),
            rnorms=p.rnorms.to(torch.float32),
        )

    def encode(self, x: torch.Tensor) -> PackedProd:
        return self.pack(self.quantize(x))

    def decode(self, p: PackedProd, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.dequantize(self.unpack(p), dtype)


@dataclass
class ScalarQuantized:
    idx: torch.Tensor
    lo: torch.Tensor
    scale: torch.Tensor


class ScalarQuantizer:
    """Per-vector uniform grid on [min x, max x] with 2^b levels, no rotation (the seed's baseline).

    ``x̃_j = lo + scale · round((x_j - lo) / scale)``, ``scale = (max - min) / (2^b - 1)``; stores b
    bits a coordinate plus float16 ``lo`` and ``scale``.
    """

    def __init__(self, d: int, bits: int) -> None:
        parse_bits(bits, allowed=(1, 2, 3, 4))
        if not isinstance(d, int) or isinstance(d, bool) or d < 8 or d % 8:
            raise ValueError(f"`d` must be a multiple of 8 (>= 8), got {d!r}")
        self.d = d
        self.bits = int(bits)

    @property
    def code_nbytes(self) -> int:
        return packed_nbytes(self.d, self.bits)

    @property
    def nbytes_per_vector(self) -> int:
        return self.code_nbytes + 2 * NORM_DTYPE.itemsize

    def quantize(self, x: torch.Tensor) -> ScalarQuantized:
        check_float_tensor(x, "x", self.d)
        xf = x.to(torch.float32)
        lo = xf.amin(dim=-1).to(NORM_DTYPE).to(torch.float32)
        hi = xf.amax(dim=-1)
        scale = ((hi - lo) / (2**self.bits - 1)).to(NORM_DTYPE).to(torch.float32)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)
        idx = torch.round((xf - lo.unsqueeze(-1)) / safe).clamp(0, 2**self.bits - 1).to(torch.uint8)
        return ScalarQuantized(idx=idx, lo=lo, scale=scale)

    def dequantize(self, q: ScalarQuantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        check_float_dtype(dtype)
        return (q.lo.unsqueeze(-1) + q.idx.to(torch.float32) * q.scale.unsqueeze(-1)).to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequantize(self.quantize(x))

    def pack(self, q: ScalarQuantized) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return pack_bits(q.idx, self.bits), q.lo.to(NORM_DTYPE), q.scale.to(NORM_DTYPE)

    def unpack(self, packed: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> ScalarQuantized:
        codes, lo, scale = packed
        return ScalarQuantized(unpack_bits(codes, self.bits, self.d), lo.to(torch.float32), scale.to(torch.float32))
