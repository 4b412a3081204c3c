"""FAISS baselines behind the same ``train / add / search`` contract (faiss-cpu, inner product).

* ``faiss-tqmse`` / ``faiss-tq``: FAISS's own TurboQuant scalar quantizers, ``RR{d},SQtqmse{b}``
  (b = 1..4) and ``RR{d},SQtq{b}`` (b = 2..4): the independent implementation to cross-check.
  They store no vector norm, so they score unit vectors correctly (our data sets are unit-norm).
* ``faiss-sq``: ``IndexScalarQuantizer`` ``SQ4`` (per-dimension trained min/max, 4 bits only:
  FAISS rejects SQ1..SQ3).
* ``faiss-rabitq``: ``RR{d},RaBitQ`` (1 bit) and ``RR{d},RaBitQ{b}`` (b = 2..4).
* ``faiss-pq``: ``IndexPQ`` with 8-bit sub-codebooks, ``M = d·b/8`` sub-quantizers (the paper's PQ
  baseline). When ``M`` does not divide ``d`` (d=384 at 3 bits: M=144) the vectors are padded with
  zero coordinates to the next multiple of ``M``; zeros change no inner product.

``faiss`` is imported lazily, so ``turboquant.ann`` imports without it.
"""

from __future__ import annotations

import numpy as np
import torch

from turboquant.ann.base import ANNIndex, SearchResult, UnsupportedConfig


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("FAISS baselines need faiss-cpu: pip install 'turboquant-verify[ann]'") from exc
    return faiss


def faiss_available() -> bool:
    try:
        _faiss()
    except ImportError:
        return False
    return True


class FaissIndex(ANNIndex):
    """A FAISS index built from a factory string with ``METRIC_INNER_PRODUCT``.

    Args:
        d: input dimension.
        bits: bits per coordinate this configuration spends (for reports).
        factory: FAISS factory string, e.g. ``"RR256,SQtqmse4"``.
        name: method name in reports.
        pad_to: pad vectors with zeros to this dimension before FAISS sees them (PQ layouts).
        max_train_points: if set, train on the first this-many rows only (FAISS PQ itself samples
            at most 256 points per centroid).
    """

    requires_training = True

    def __init__(
        self,
        d: int,
        bits: float,
        factory: str,
        name: str,
        pad_to: int | None = None,
        max_train_points: int | None = None,
    ) -> None:
        super().__init__(d, bits)
        faiss = _faiss()
        self.name = name
        self.factory = factory
        self.pad_to = pad_to or d
        self.max_train_points = max_train_points
        self.index = faiss.index_factory(self.pad_to, factory, faiss.METRIC_INNER_PRODUCT)
        self.is_trained = bool(self.index.is_trained) and not self.requires_training

    def _np(self, x: torch.Tensor) -> np.ndarray:
        a = x.detach().to(torch.float32).cpu().numpy()
        if self.pad_to != self.d:
            a = np.concatenate([a, np.zeros((a.shape[0], self.pad_to - self.d), np.float32)], axis=1)
        return np.ascontiguousarray(a)

    def _train(self, x: torch.Tensor) -> None:
        if self.max_train_points is not None:
            x = x[: self.max_train_points]
        self.index.train(self._np(x))

    def _add(self, x: torch.Tensor) -> None:
        self.index.add(self._np(x))

    def code_size(self) -> int:
        """FAISS's bytes per vector (``sa_code_size``): codes plus any per-vector factors."""
        return int(self.index.sa_code_size())

    def nbytes(self) -> int:
        return self.code_size() * self.index.ntotal

    def _search(self, q: torch.Tensor, k: int) -> SearchResult:
        scores, ids = self.index.search(self._np(q), k)
        return SearchResult(scores=torch.from_numpy(scores), ids=torch.from_numpy(ids).to(torch.int64))


def faiss_tqmse(d: int, bits: float) -> FaissIndex:
    if bits not in (1, 2, 3, 4):
        raise UnsupportedConfig(f"FAISS SQtqmse exists for bits 1..4 (integers), got {bits}")
    return FaissIndex(d, bits, f"RR{d},SQtqmse{int(bits)}", "faiss-tqmse")


def faiss_tq(d: int, bits: float) -> FaissIndex:
    if bits not in (2, 3, 4):
        raise UnsupportedConfig(f"FAISS SQtq (prod) exists for bits 2..5 (SQtq1 is rejected), got {bits}")
    return FaissIndex(d, bits, f"RR{d},SQtq{int(bits)}", "faiss-tq")


def faiss_sq(d: int, bits: float) -> FaissIndex:
    if bits != 4:
        raise UnsupportedConfig(f"FAISS IndexScalarQuantizer has SQ4/SQ6/SQ8 only (SQ1..3 rejected), got {bits}")
    return FaissIndex(d, bits, "SQ4", "faiss-sq")


def faiss_rabitq(d: int, bits: float) -> FaissIndex:
    if bits not in (1, 2, 3, 4):
        raise UnsupportedConfig(f"FAISS RaBitQ exists for bits 1..4 here, got {bits}")
    factory = f"RR{d},RaBitQ" if bits == 1 else f"RR{d},RaBitQ{int(bits)}"
    return FaissIndex(d, bits, factory, "faiss-rabitq")


def faiss_pq(d: int, bits: float, max_train_points: int | None = None) -> FaissIndex:
    """IndexPQ, 8-bit sub-codebooks, ``M = d · bits / 8`` (zero-padded when M does not divide d).

    ``np``: plain PQ k-means training. The bare factory string ``PQ{M}x8`` also runs FAISS's
    polysemous training (code re-ordering by annealing), which multiplies the train time ~5x here
    and is not part of the PQ baseline the paper compares against.
    """
    total_bits = d * bits
    if total_bits % 8:
        raise UnsupportedConfig(f"IndexPQ with 8-bit codes needs d·bits divisible by 8, got {total_bits}")
    m = int(total_bits // 8)
    pad = -(-d // m) * m
    return FaissIndex(d, bits, f"PQ{m}x8np", "faiss-pq", pad_to=pad, max_train_points=max_train_points)
