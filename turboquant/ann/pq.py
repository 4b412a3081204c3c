"""Product quantization with k-means codebooks trained by scipy (the seed's PQ-kmeans baseline).

The vector is cut into ``M`` sub-vectors of ``dsub = d / M`` coordinates; each sub-space gets a
codebook of ``K = 2^nbits`` centroids from k-means (``scipy.cluster.vq.kmeans2``, k-means++ init,
seeded per sub-space). A vector is stored as ``M`` codes of ``nbits`` bits, so it costs
``M · nbits = d · b`` bits at ``b = nbits / dsub`` bits per coordinate.

Search is asymmetric distance computation (ADC): per query and sub-space a table
``LUT[m, k] = <q_m, C_m[k]>`` (``M x K`` entries), then ``<q, x̃> = Σ_m LUT[m, code_m(x)]``.
"""

from __future__ import annotations

import warnings
from fractions import Fraction

import numpy as np
import torch

from turboquant.ann.base import ANNIndex, SearchResult, UnsupportedConfig, blockwise_topk
from turboquant.packing import pack_bits, unpack_bits


def pq_layout(d: int, bits: float, max_nbits: int = 8) -> tuple[int, int]:
    """``(M, nbits)`` for ``bits`` per coordinate: the largest sub-vector ``dsub`` dividing ``d`` with
    ``nbits = bits · dsub`` a whole number ``<= max_nbits`` (8-bit sub-codebooks when possible).

    d=256: 1 bit -> (32, 8); 2 -> (64, 8); 3 -> (128, 6); 4 -> (128, 8).
    """
    b = Fraction(bits).limit_denominator(8)
    for dsub in range(max_nbits, 0, -1):
        nb = b * dsub
        if d % dsub == 0 and nb.denominator == 1 and 1 <= nb <= max_nbits:
            return d // dsub, int(nb)
    raise UnsupportedConfig(f"no PQ layout with <= {max_nbits}-bit sub-codebooks gives {bits} bits/coord at d={d}")


class PQKMeansIndex(ANNIndex):
    """PQ with scipy k-means codebooks (``kmeans2``: ``minit`` init, ``iters`` Lloyd steps, seeded per sub-space).

    Codes are stored bit-packed (``nbits`` bit planes over the ``M`` codes) when ``nbits < 8``, as
    bytes when ``nbits = 8``: exactly ``M · nbits / 8`` bytes per vector either way.
    """

    name = "pq-kmeans"
    requires_training = True

    def __init__(
        self, d: int, bits: float, seed: int = 0, iters: int = 10, minit: str = "points", block: int = 8192
    ) -> None:
        super().__init__(d, bits)
        self.M, self.nbits = pq_layout(d, bits)
        if self.nbits < 8 and self.M % 8:
            raise UnsupportedConfig(f"PQ with {self.nbits}-bit codes needs M % 8 == 0 to pack, got M={self.M}")
        self.dsub = d // self.M
        self.K = 2**self.nbits
        self.seed = seed
        self.iters = iters
        self.minit = minit
        self.block = block
        self.centroids = torch.empty(0)  # [M, K, dsub]
        self._codes = torch.empty(0, self.M * self.nbits // 8, dtype=torch.uint8)

    def _train(self, x: torch.Tensor) -> None:
        from scipy.cluster.vq import kmeans2

        if x.shape[0] < self.K:
            raise ValueError(f"`x` has {x.shape[0]} training vectors, PQ needs at least K={self.K}")
        xs = x.numpy().astype(np.float64).reshape(-1, self.M, self.dsub)
        cents = np.empty((self.M, self.K, self.dsub), dtype=np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "One of the clusters is empty": kept as k-means left it
            for m in range(self.M):
                rng = np.random.default_rng(self.seed * 100_003 + m)
                c, _ = kmeans2(xs[:, m, :], self.K, iter=self.iters, minit=self.minit, seed=rng)
                cents[m] = c
        self.centroids = torch.from_numpy(cents)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest centroid per sub-space: codes int64 [n, M]."""
        xs = x.reshape(-1, self.M, self.dsub).transpose(0, 1)  # [M, n, dsub]
        d2 = torch.cdist(xs, self.centroids)  # [M, n, K]
        return d2.argmin(dim=2).T.contiguous()

    def _add(self, x: torch.Tensor) -> None:
        codes = self.encode(x)
        packed = codes.to(torch.uint8) if self.nbits == 8 else pack_bits(codes.to(torch.uint8), self.nbits)
        self._codes = torch.cat([self._codes, packed])

    def nbytes(self) -> int:
        return self._codes.numel()

    def _search(self, q: torch.Tensor, k: int) -> SearchResult:
        qs = q.reshape(-1, self.M, self.dsub)
        nq = q.shape[0]
        lut = torch.einsum("qmd,mkd->qmk", qs, self.centroids).reshape(nq, self.M * self.K)  # [nq, M·K]
        offsets = torch.arange(self.M) * self.K
        # gathered scores are [nq, B, M]: keep a block at <= 2^24 floats (64 MiB)
        block = max(1, min(self.block, (1 << 24) // max(1, nq * self.M)))

        def score(start: int, stop: int) -> torch.Tensor:
            raw = self._codes[start:stop]
            codes = (raw if self.nbits == 8 else unpack_bits(raw, self.nbits, self.M)).long()
            return lut[:, codes + offsets].sum(dim=2)  # Σ_m LUT[m, code_m]

        return blockwise_topk(score, self.ntotal, k, block)
