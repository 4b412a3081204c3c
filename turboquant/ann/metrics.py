"""Retrieval metrics against exact maximum-inner-product ground truth.

* ``recall_at_k`` — the seed's overlap@k: ``|approx top-k ∩ exact top-k| / k``, averaged over queries.
* ``recall_1_at_k`` — the paper's Recall@1@k: the fraction of queries whose exact nearest neighbour
  (top-1 by inner product) appears among the approximate top-k.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def exact_topk(base: torch.Tensor, queries: torch.Tensor, k: int, block: int = 16384) -> torch.Tensor:
    """Exact top-``k`` ids [nq, k] by inner product (float32, blockwise)."""
    from turboquant.ann.tq_index import FlatIndex

    flat = FlatIndex(base.shape[1], block=block)
    flat.add(base)
    return flat.search(queries, k).ids


def recall_at_k_per_query(found: torch.Tensor, truth: torch.Tensor, k: int) -> torch.Tensor:
    """``|found[q, :k] ∩ truth[q, :k]| / k`` per query (float64 ``[nq]``), the paired cases of C12."""
    if found.shape[1] < k or truth.shape[1] < k:
        raise ValueError(f"`k`={k} exceeds the result width (found {found.shape[1]}, truth {truth.shape[1]})")
    f, t = found[:, :k], truth[:, :k]
    hits = (f.unsqueeze(2) == t.unsqueeze(1)).any(dim=2).sum(dim=1)
    return hits.to(torch.float64) / k


def recall_at_k(found: torch.Tensor, truth: torch.Tensor, k: int) -> float:
    """Mean over queries of ``|found[:, :k] ∩ truth[:, :k]| / k`` (the seed's overlap@k)."""
    return float(recall_at_k_per_query(found, truth, k).mean())


def recall_1_at_k(found: torch.Tensor, truth: torch.Tensor, ks: Iterable[int]) -> dict[int, float]:
    """Paper's Recall@1@k: ``P[exact top-1 ∈ approx top-k]`` for each ``k`` in ``ks``."""
    top1 = truth[:, :1]
    out = {}
    for k in ks:
        if k > found.shape[1]:
            continue
        out[int(k)] = float((found[:, :k] == top1).any(dim=1).to(torch.float64).mean())
    return out
