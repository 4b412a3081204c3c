"""Per-vector KV codecs of the baselines: fp8 e4m3 with a per-token scale, rotated uniform int-b.

A codec maps vectors ``x [..., d]`` to stored tensors (``encode``) and back (``decode``); every
stored tensor is counted by ``nbytes`` (codes + scales), so measured bits a coordinate come from
the bytes held, as for TurboQuant (codes + one float16 norm a vector).

* :class:`Fp8Codec`: ``s = max|x| / 448`` (float16), codes ``x / s`` as ``float8_e4m3fn``:
  8 bits a coordinate + 16 bits a vector.
* :class:`RotatedIntCodec`: ``y = Π x`` (signed Hadamard of :mod:`turboquant.rotation`), one scale
  ``a = max|y|`` (float16) a vector, and round-to-nearest on ``2^b`` uniform levels of ``[-a, a]``:
  ``q = round((y / a + 1)(2^b - 1) / 2)``, ``ŷ = a (2q / (2^b - 1) - 1)`` (the "rotation + plain int"
  ablation of TurboQuant: same rotation, same bytes, uniform grid instead of the Lloyd-Max
  codebook). Fractional ``b + 0.5`` splits the rotated coordinates as TurboQuant's ``halves``
  recipe: the first d/2 at ``b + 1`` bits, the rest at ``b`` bits, bit-packed (:mod:`packing`).
"""

from __future__ import annotations

import math

import torch

from turboquant.packing import pack_bits, unpack_bits
from turboquant.rotation import HadamardRotation

SCALE_DTYPE = torch.float16
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
ROTATED_INT_BITS = (2, 2.5, 3, 3.5, 4)
_TINY = float(torch.finfo(SCALE_DTYPE).tiny)


def _nbytes(parts: tuple[torch.Tensor, ...]) -> int:
    return sum(t.numel() * t.element_size() for t in parts)


class Fp8Codec:
    """fp8 e4m3 with one float16 scale a vector (token x head)."""

    name = "fp8-e4m3"

    def __init__(self, d: int) -> None:
        self.d = int(d)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xf = x.float()
        scale = (xf.abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=_TINY).to(SCALE_DTYPE)
        return (xf / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale

    def decode(self, parts: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
        codes, scale = parts
        return (codes.float() * scale.float()).to(dtype)

    nbytes = staticmethod(_nbytes)


class RotatedIntCodec:
    """Signed-Hadamard rotation + per-vector absmax round-to-nearest at ``bits`` (halves split)."""

    def __init__(self, d: int, bits: float, seed: int = 0) -> None:
        if float(bits) not in ROTATED_INT_BITS:
            raise ValueError(f"`bits` for the rotated int baseline must be one of {ROTATED_INT_BITS}, got {bits!r}")
        self.d, self.bits = int(d), float(bits)
        self.name = f"rot-int-{bits:g}"
        self.rotation = HadamardRotation(self.d, seed)
        hi, lo = math.ceil(self.bits), math.floor(self.bits)
        half = self.d // 2 if hi != lo else self.d
        self.segments = [(0, half, hi)] + ([(half, self.d, lo)] if hi != lo else [])

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = self.rotation.apply(x.float())
        scale = y.abs().amax(-1, keepdim=True).clamp(min=_TINY).to(SCALE_DTYPE)
        u = y / scale.float()
        parts = []
        for start, stop, b in self.segments:
            levels = 2**b - 1
            q = torch.round((u[..., start:stop] + 1) * (levels / 2)).clamp(0, levels).to(torch.uint8)
            parts.append(pack_bits(q, b))
        return (*parts, scale)

    def decode(self, parts: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
        *packed, scale = parts
        segs = []
        for p, (start, stop, b) in zip(packed, self.segments):
            levels = 2**b - 1
            q = unpack_bits(p, b, stop - start).float()
            segs.append(q * (2 / levels) - 1)
        y = torch.cat(segs, -1) * scale.float()
        return self.rotation.invert(y).to(dtype)

    nbytes = staticmethod(_nbytes)
