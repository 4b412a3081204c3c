"""TurboQuant index (online, no training) plus the scalar no-rotation and exact baselines.

Asymmetric inner-product search over packed TurboQuant codes. For TurboQuant-mse a stored vector is
``x̃ = ||x|| Π^T c[idx]``, so for a full-precision query ``q``

    <q, x̃> = ||x|| · Σ_j (Π q)_j · c[idx_j]                                   (1)

The query is rotated once (``Π q``); the stored codes are never rotated back. (1) is a
per-coordinate table lookup: ``LUT_q[j, k] = (Π q)_j c_k`` summed over ``j`` at ``k = idx_j``.
Because the table factorises (query part times a 2^b-entry centroid table shared by every query),
the lookup is done once per database block for all queries — unpack the bit planes, gather
``c[idx]`` — and the sum over ``j`` becomes one ``[nq, d] x [d, B]`` matrix product (BLAS), followed
by a running top-k. Memory per block is ``B · d`` floats; the codes stay packed in storage.

TurboQuant-prod adds the QJL term ``√(π/2)/d · ||r|| · S^T z`` (``z = sign(S r)``), so

    <q, x̃> = <q, x̃_mse> + √(π/2)/d · ||r|| · Σ_j (S q)_j z_j                   (2)

with ``S q`` computed once per query and ``z ∈ {±1}^d`` read from one bit plane.
"""

from __future__ import annotations

import torch

from turboquant.ann.base import ANNIndex, SearchResult, UnsupportedConfig, blockwise_topk
from turboquant.packing import unpack_bits
from turboquant.quantizer import PackedMSE, ScalarQuantizer, TurboQuantMSE, TurboQuantProd

DEFAULT_BLOCK = 16384


def _auto_rotation(d: int, rotation: str) -> str:
    if rotation != "auto":
        return rotation
    return "hadamard" if d & (d - 1) == 0 else "dense"


class TurboQuantIndex(ANNIndex):
    """Online TurboQuant index: ``add`` quantizes and packs, ``search`` scores packed codes by (1)/(2).

    Args:
        d: dimension.
        bits: bits per coordinate (1, 1.5, 2, 2.5, 3, 3.5, 4; prod: 1, 2, 2.5, 3, 3.5, 4).
        variant: ``"mse"`` (TurboQuant-mse) or ``"prod"`` (mse at b-1 bits + 1-bit QJL residual).
        rotation: ``"hadamard"``, ``"dense"`` or ``"auto"`` (Hadamard when d is a power of two).
        seed: seeds the rotation (and the QJL matrix for prod).
        block: database rows scored per matrix product.

    Nothing is learned from the data: ``train`` is a no-op and ``add`` can be called any time.
    """

    requires_training = False

    def __init__(
        self,
        d: int,
        bits: float,
        variant: str = "mse",
        rotation: str = "auto",
        seed: int = 0,
        law: str = "beta",
        block: int = DEFAULT_BLOCK,
    ) -> None:
        super().__init__(d, bits)
        if variant not in ("mse", "prod"):
            raise ValueError(f"`variant` must be one of ('mse', 'prod'), got {variant!r}")
        self.variant = variant
        self.name = f"turboquant-{variant}"
        self.block = int(block)
        rot = _auto_rotation(d, rotation)
        if variant == "mse":
            self.quantizer: TurboQuantMSE | TurboQuantProd = TurboQuantMSE(d, bits, rot, seed, law)
            self.mse: TurboQuantMSE | None = self.quantizer
        else:
            self.quantizer = TurboQuantProd(d, bits, rot, seed, law)
            self.mse = self.quantizer.mse
        empty8 = torch.empty(0, dtype=torch.uint8)
        empty16 = torch.empty(0, dtype=torch.float16)
        self._codes = empty8.reshape(0, self.mse.code_nbytes if self.mse else 0)
        self._norms = empty16
        self._qjl = empty8.reshape(0, d // 8)
        self._rnorms = empty16

    def _add(self, x: torch.Tensor) -> None:
        p = self.quantizer.encode(x)
        if self.variant == "mse":
            codes, norms = p.codes, p.norms
        else:
            self._qjl = torch.cat([self._qjl, p.qjl])
            self._rnorms = torch.cat([self._rnorms, p.rnorms])
            codes, norms = (p.mse.codes, p.mse.norms) if p.mse is not None else (None, None)
        if codes is not None:
            self._codes = torch.cat([self._codes, codes])
            self._norms = torch.cat([self._norms, norms])

    def nbytes(self) -> int:
        """Bytes of packed codes + float16 norms actually held (prod: + QJL plane + residual norms)."""
        tensors = [self._codes, self._norms, self._qjl, self._rnorms] if self.variant == "prod" else [
            self._codes,
            self._norms,
        ]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _mse_block(self, qrot: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """(1) for database rows [start, stop): ``(Π q) · c[idx]ᵀ · ||x||`` -> [nq, B]."""
        assert self.mse is not None
        q = self.mse.unpack(PackedMSE(self._codes[start:stop], self._norms[start:stop]))
        vals = self.mse.centroid_values(q.idx)  # [B, d] unit-scale centroids, rotated domain
        return (qrot @ vals.T) * q.norms.unsqueeze(0)

    def _qjl_block(self, qs: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """QJL term of (2) for rows [start, stop): ``√(π/2)/d · ||r|| · (S q) · z`` -> [nq, B]."""
        z = unpack_bits(self._qjl[start:stop], 1, self.d).to(torch.float32) * 2 - 1
        rn = self._rnorms[start:stop].to(torch.float32)
        return (qs @ z.T) * (self.quantizer.qjl_scale * rn).unsqueeze(0)

    def _search(self, q: torch.Tensor, k: int) -> SearchResult:
        qrot = self.mse.rotation.apply(q) if self.mse is not None else None
        qs = q @ self.quantizer.S.T if self.variant == "prod" else None

        def score(start: int, stop: int) -> torch.Tensor:
            s = self._mse_block(qrot, start, stop) if qrot is not None else 0.0
            if qs is not None:
                s = s + self._qjl_block(qs, start, stop)
            return s

        return blockwise_topk(score, self.ntotal, k, self.block)


class ScalarIndex(ANNIndex):
    """The seed's baseline: per-vector min/max uniform scalar quantizer, no rotation (core ScalarQuantizer).

    ``x̃_j = lo + scale · idx_j``, so ``<q, x̃> = lo · Σ_j q_j + scale · Σ_j q_j idx_j``: one matrix
    product with the unpacked integer codes per block, no rotation of the query.
    """

    name = "scalar"
    requires_training = False

    def __init__(self, d: int, bits: float, block: int = DEFAULT_BLOCK) -> None:
        super().__init__(d, bits)
        if float(bits) not in (1, 2, 3, 4):
            raise UnsupportedConfig(f"`bits` for the scalar baseline must be one of (1, 2, 3, 4), got {bits!r}")
        self.quantizer = ScalarQuantizer(d, int(bits))
        self.block = int(block)
        self._codes = torch.empty(0, self.quantizer.code_nbytes, dtype=torch.uint8)
        self._lo = torch.empty(0, dtype=torch.float16)
        self._scale = torch.empty(0, dtype=torch.float16)

    def _add(self, x: torch.Tensor) -> None:
        codes, lo, scale = self.quantizer.pack(self.quantizer.quantize(x))
        self._codes = torch.cat([self._codes, codes])
        self._lo = torch.cat([self._lo, lo])
        self._scale = torch.cat([self._scale, scale])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self._codes, self._lo, self._scale))

    def _search(self, q: torch.Tensor, k: int) -> SearchResult:
        qsum = q.sum(dim=1, keepdim=True)

        def score(start: int, stop: int) -> torch.Tensor:
            idx = unpack_bits(self._codes[start:stop], self.quantizer.bits, self.d).to(torch.float32)
            lo = self._lo[start:stop].to(torch.float32).unsqueeze(0)
            sc = self._scale[start:stop].to(torch.float32).unsqueeze(0)
            return qsum * lo + (q @ idx.T) * sc

        return blockwise_topk(score, self.ntotal, k, self.block)


class FlatIndex(ANNIndex):
    """Exact float32 inner-product search (ground truth and the uncompressed reference)."""

    name = "flat"
    requires_training = False

    def __init__(self, d: int, block: int = DEFAULT_BLOCK) -> None:
        super().__init__(d, 32)
        self.block = int(block)
        self._x = torch.empty(0, d, dtype=torch.float32)

    def _add(self, x: torch.Tensor) -> None:
        self._x = torch.cat([self._x, x])

    def nbytes(self) -> int:
        return self._x.numel() * 4

    def _search(self, q: torch.Tensor, k: int) -> SearchResult:
        return blockwise_topk(lambda a, b: q @ self._x[a:b].T, self.ntotal, k, self.block)
