"""Approximate nearest-neighbour search over TurboQuant codes, and the baselines it is measured against.

Every index obeys one contract (FAISS style): ``train(x)`` (a no-op for online methods), ``add(x)``,
``search(queries, k) -> SearchResult(scores, ids)`` by inner product, ``bytes_per_vector()``.

* ours: :class:`TurboQuantIndex` (``variant="mse"`` or ``"prod"``; online, packed codes)
* baselines: :class:`ScalarIndex` (no rotation, the seed's), :class:`PQKMeansIndex` (scipy k-means),
  :class:`FaissIndex` (IndexPQ, IndexScalarQuantizer, IndexRaBitQ, FAISS's own TurboQuant SQ),
  :class:`FlatIndex` (exact)
* harness: :data:`METHODS`, :func:`make_index`, :func:`evaluate`, :func:`run_grid`
* metrics: :func:`recall_at_k` (overlap@k), :func:`recall_1_at_k` (Recall@1@k), :func:`exact_topk`
* data: :class:`ANNDataset`, :func:`synthetic_dataset`
"""

from turboquant.ann import plot as _plot  # noqa: F401  (registers the C12 plot)
from turboquant.ann.base import ANNIndex, SearchResult, UnsupportedConfig
from turboquant.ann.bench import (
    METHODS,
    RECALL_1_KS,
    MethodResult,
    evaluate,
    make_index,
    run_grid,
    table,
)
from turboquant.ann.datasets import ANNDataset, anisotropic, gaussian, synthetic_dataset
from turboquant.ann.faiss_indexes import FaissIndex, faiss_available
from turboquant.ann.metrics import exact_topk, recall_1_at_k, recall_at_k
from turboquant.ann.pq import PQKMeansIndex, pq_layout
from turboquant.ann.tq_index import FlatIndex, ScalarIndex, TurboQuantIndex

__all__ = [
    # harness
    "METHODS",
    "RECALL_1_KS",
    # data
    "ANNDataset",
    # contract
    "ANNIndex",
    "FaissIndex",
    "FlatIndex",
    "MethodResult",
    "PQKMeansIndex",
    "ScalarIndex",
    "SearchResult",
    # indexes
    "TurboQuantIndex",
    "UnsupportedConfig",
    "anisotropic",
    "evaluate",
    # metrics
    "exact_topk",
    "faiss_available",
    "gaussian",
    "make_index",
    "pq_layout",
    "recall_1_at_k",
    "recall_at_k",
    "run_grid",
    "synthetic_dataset",
    "table",
]
