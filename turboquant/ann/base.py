"""The one index contract every ANN method obeys (FAISS style): ``train`` / ``add`` / ``search``.

Search is *maximum inner product* search: for a query ``q`` the index returns the ``k`` stored
vectors with the largest estimated ``<q, x>``. Queries stay in full precision (asymmetric distance).
Input checks live here once, so every index fails the same way on bad input:

* ``k`` larger than the number of stored vectors -> ``ValueError`` naming ``k``;
* a query / vector dimension different from the index's ``d`` -> ``ValueError`` naming the parameter;
* searching an empty index -> ``ValueError`` ("index is empty");
* NaN / Inf in queries or vectors -> ``ValueError`` naming the parameter.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from turboquant.validation import check_float_tensor


@dataclass
class SearchResult:
    """Top-k answer: ``scores`` float32 [nq, k] (descending), ``ids`` int64 [nq, k] (row ids in add order)."""

    scores: torch.Tensor
    ids: torch.Tensor


class UnsupportedConfig(ValueError):
    """A method cannot run at the requested setting (e.g. FAISS has no 2-bit SQ); say why."""


def as_float_tensor(x: object, name: str) -> torch.Tensor:
    """Accept a torch tensor or a numpy array; return a torch tensor (no copy when possible)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    return x


def check_vectors(x: object, name: str, d: int, allow_empty: bool = False) -> torch.Tensor:
    """A finite float matrix [n, d] as float32; errors name ``name`` and the expected shape."""
    x = as_float_tensor(x, name)
    if x.dim() != 2:
        raise ValueError(f"`{name}` must be a 2-D matrix [n, d={d}], got shape {tuple(x.shape)}")
    if x.shape[1] != d:
        raise ValueError(f"`{name}` has dimension {x.shape[1]} but the index was built for d={d}")
    check_float_tensor(x, name, d, allow_empty=allow_empty)
    return x.to(torch.float32).contiguous()


def topk_merge(best: SearchResult | None, scores: torch.Tensor, offset: int, k: int) -> SearchResult:
    """Merge a block of scores [nq, B] (ids ``offset + j``) into the running top-k."""
    kb = min(k, scores.shape[1])
    s, i = torch.topk(scores, kb, dim=1)
    i = i + offset
    if best is not None:
        s = torch.cat([best.scores, s], dim=1)
        i = torch.cat([best.ids, i], dim=1)
        s, j = torch.topk(s, min(k, s.shape[1]), dim=1)
        i = torch.gather(i, 1, j)
    return SearchResult(scores=s, ids=i)


def blockwise_topk(
    score_block: Callable[[int, int], torch.Tensor], n: int, k: int, block: int = 16384
) -> SearchResult:
    """Top-k over ``n`` database rows scored block by block: ``score_block(start, stop) -> [nq, stop-start]``.

    Memory stays at ``nq · block`` scores however large ``n`` is.
    """
    best: SearchResult | None = None
    for start in range(0, n, block):
        stop = min(n, start + block)
        best = topk_merge(best, score_block(start, stop), start, k)
    assert best is not None
    return best


class ANNIndex(abc.ABC):
    """Base class: validation and bookkeeping; subclasses implement ``_train``, ``_add``, ``_search``.

    Attributes:
        name: method name used in reports (``"turboquant-mse"``, ``"faiss-pq"``, ...).
        d: vector dimension.
        bits: the bit budget per coordinate the index was configured for.
        requires_training: whether ``add`` needs a prior ``train`` (PQ, FAISS SQ, RaBitQ).
    """

    name: str = "index"
    requires_training: bool = False

    def __init__(self, d: int, bits: float | None) -> None:
        if not isinstance(d, int) or isinstance(d, bool) or d < 1:
            raise ValueError(f"`d` must be a positive int, got {d!r}")
        self.d = d
        self.bits = bits
        self.is_trained = not self.requires_training
        self.ntotal = 0

    # -- contract ------------------------------------------------------------------------------
    def train(self, x: object) -> None:
        """Fit any data-dependent parameters on ``x`` [n, d] (a no-op for online methods)."""
        xt = check_vectors(x, "x", self.d)
        self._train(xt)
        self.is_trained = True

    def add(self, x: object) -> None:
        """Encode and store ``x`` [n, d]; ids continue from ``ntotal``."""
        if not self.is_trained:
            raise RuntimeError(f"{self.name}: call train(x) before add(x) (this index learns codebooks)")
        xt = check_vectors(x, "x", self.d)
        self._add(xt)
        self.ntotal += xt.shape[0]

    def search(self, queries: object, k: int) -> SearchResult:
        """Top-``k`` stored vectors by estimated inner product for each query row [nq, d]."""
        if self.ntotal == 0:
            raise ValueError(f"{self.name}: the index is empty (ntotal=0): add vectors before search")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"`k` must be a positive int, got {k!r}")
        if k > self.ntotal:
            raise ValueError(f"`k`={k} is larger than the database size ntotal={self.ntotal}")
        q = check_vectors(queries, "queries", self.d)
        with torch.no_grad():
            return self._search(q, int(k))

    # -- sizes ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def nbytes(self) -> int:
        """Bytes the stored codes really occupy (codes + per-vector metadata, not the model)."""

    def bytes_per_vector(self) -> float:
        return self.nbytes() / max(self.ntotal, 1)

    # -- to implement --------------------------------------------------------------------------
    def _train(self, x: torch.Tensor) -> None:  # online methods: nothing to learn
        return None

    @abc.abstractmethod
    def _add(self, x: torch.Tensor) -> None: ...

    @abc.abstractmethod
    def _search(self, q: torch.Tensor, k: int) -> SearchResult: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, d={self.d}, bits={self.bits}, ntotal={self.ntotal})"
