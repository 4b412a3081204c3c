"""One harness for every method: build (train + add), search, score recall, time, count bytes.

Methods are registered by name in :data:`METHODS` as factories ``(d, bits, seed) -> ANNIndex``; a
factory raises :class:`~turboquant.ann.base.UnsupportedConfig` when the method has no such bit width
(FAISS has no 2-bit SQ), and the harness records that as a skipped cell with the reason.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch

from turboquant.ann.base import ANNIndex, UnsupportedConfig
from turboquant.ann.datasets import ANNDataset
from turboquant.ann.faiss_indexes import faiss_pq, faiss_rabitq, faiss_sq, faiss_tq, faiss_tqmse
from turboquant.ann.metrics import recall_1_at_k, recall_at_k_per_query
from turboquant.ann.pq import PQKMeansIndex
from turboquant.ann.tq_index import ScalarIndex, TurboQuantIndex

IndexFactory = Callable[[int, float, int], ANNIndex]

METHODS: dict[str, IndexFactory] = {
    "turboquant-mse": lambda d, b, s: TurboQuantIndex(d, b, "mse", seed=s),
    "turboquant-prod": lambda d, b, s: TurboQuantIndex(d, b, "prod", seed=s),
    "scalar": lambda d, b, s: ScalarIndex(d, b),
    "pq-kmeans": lambda d, b, s: PQKMeansIndex(d, b, seed=s),
    "faiss-tqmse": lambda d, b, s: faiss_tqmse(d, b),
    "faiss-tq": lambda d, b, s: faiss_tq(d, b),
    "faiss-sq": lambda d, b, s: faiss_sq(d, b),
    "faiss-rabitq": lambda d, b, s: faiss_rabitq(d, b),
    "faiss-pq": lambda d, b, s: faiss_pq(d, b),
}

RECALL_1_KS = (1, 2, 4, 8, 10, 16, 32, 64)


def make_index(method: str, d: int, bits: float, seed: int = 0) -> ANNIndex:
    """Build the index registered as ``method``; unknown names list the available ones."""
    if method not in METHODS:
        raise KeyError(f"unknown ANN method {method!r}; available: {sorted(METHODS)}")
    return METHODS[method](d, bits, seed)


@dataclass
class MethodResult:
    """One (method, bits) cell of a benchmark. Times in seconds; ``build_s = train_s + add_s``."""

    method: str
    bits: float
    dataset: str
    k: int
    recall_at_k: float | None = None
    recall_1_at: dict = field(default_factory=dict)
    train_s: float | None = None
    add_s: float | None = None
    build_s: float | None = None
    query_s: float | None = None
    bytes_per_vector: float | None = None
    code_bits_per_coord: float | None = None
    ntotal: int = 0
    nq: int = 0
    skipped: str | None = None
    recall_per_query: list | None = field(default=None, repr=False)  # paired cases for the verdict rule

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("recall_per_query")
        return out


def evaluate(
    index: ANNIndex, ds: ANNDataset, k: int = 10, r1_ks: Iterable[int] = RECALL_1_KS, train: torch.Tensor | None = None
) -> MethodResult:
    """Train (on ``train`` or the base), add the base, search all queries once, score and time it.

    One search at ``k_search = max(k, max(r1_ks))`` (capped at the database size) serves both
    metrics; ``query_s`` is the wall time of that one batched call for all queries.
    """
    res = MethodResult(index.name, float(index.bits), ds.name, k, ntotal=ds.base.shape[0], nq=ds.queries.shape[0])
    t0 = time.perf_counter()
    if index.requires_training:
        index.train(ds.base if train is None else train)
    t1 = time.perf_counter()
    index.add(ds.base)
    t2 = time.perf_counter()
    ks = [x for x in r1_ks if x <= ds.base.shape[0]]
    k_search = min(max([k, *ks]), ds.base.shape[0])
    out = index.search(ds.queries, k_search)
    t3 = time.perf_counter()
    res.train_s, res.add_s, res.build_s, res.query_s = t1 - t0, t2 - t1, t2 - t0, t3 - t2
    per_query = recall_at_k_per_query(out.ids, ds.gt, k)
    res.recall_at_k, res.recall_per_query = float(per_query.mean()), per_query.tolist()
    res.recall_1_at = recall_1_at_k(out.ids, ds.gt, ks)
    res.bytes_per_vector = index.bytes_per_vector()
    res.code_bits_per_coord = res.bytes_per_vector * 8 / ds.d
    return res


def run_grid(
    ds: ANNDataset,
    methods: Iterable[str],
    bits: Iterable[float],
    k: int = 10,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> list[MethodResult]:
    """Every (method, bits) cell on ``ds``; unsupported cells come back with ``skipped`` set."""
    results = []
    for b in bits:
        for m in methods:
            try:
                index = make_index(m, ds.d, b, seed)
            except UnsupportedConfig as exc:
                results.append(MethodResult(m, float(b), ds.name, k, skipped=str(exc)))
                continue
            r = evaluate(index, ds, k)
            results.append(r)
            if log:
                log(
                    f"{m:>16} b={b:<4} recall@{k}={r.recall_at_k:.3f} R1@{k}={r.recall_1_at.get(k, float('nan')):.3f} "
                    f"build={r.build_s:.4f}s query={r.query_s:.4f}s bytes/vec={r.bytes_per_vector:.1f}"
                )
    return results


def table(results: list[MethodResult], field_name: str = "recall_at_k") -> dict[str, dict[str, float]]:
    """``{method: {bits: value}}`` for one field, skipped cells left out (JSON-friendly keys)."""
    out: dict[str, dict[str, float]] = {}
    for r in results:
        if r.skipped is None:
            b = f"{r.bits:g}"
            out.setdefault(r.method, {})[b] = getattr(r, field_name)
    return out
