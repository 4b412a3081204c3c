"""ANN data sets: a base/query split with exact inner-product ground truth.

Synthetic generators (seeded, unit-norm rows, like sentence embeddings):

* ``gaussian``: isotropic ``N(0, I_d)`` rows, normalised — the easy case for every quantizer and
  the hard case for neighbour search (neighbours are barely closer than random points).
* ``anisotropic``: a Gaussian mixture with a power-law per-coordinate spectrum
  ``σ_j² ∝ (j+1)^-α`` (coordinates randomly permuted) plus a shared mean direction, normalised:
  clustered like real embeddings, with a few high-variance coordinates that a per-vector uniform
  scalar quantizer without rotation handles badly (what the random rotation is for).

Real-text embeddings come from :mod:`turboquant.embeddings`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from turboquant.ann.metrics import exact_topk


@dataclass
class ANNDataset:
    """``base`` [n, d] and ``queries`` [nq, d] float32, exact top-``gt_k`` ids ``gt`` [nq, gt_k]."""

    name: str
    base: torch.Tensor
    queries: torch.Tensor
    gt: torch.Tensor
    meta: dict = field(default_factory=dict)

    @property
    def d(self) -> int:
        return self.base.shape[1]

    @classmethod
    def from_vectors(
        cls, name: str, base: torch.Tensor, queries: torch.Tensor, gt_k: int = 100, meta: dict | None = None
    ) -> ANNDataset:
        base = base.to(torch.float32).contiguous()
        queries = queries.to(torch.float32).contiguous()
        gt = exact_topk(base, queries, min(gt_k, base.shape[0]))
        return cls(name, base, queries, gt, dict(meta or {}))


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-12)


def gaussian(n: int, nq: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Isotropic Gaussian rows, L2-normalised: base [n, d], queries [nq, d]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + nq, d, generator=g)
    x = _normalise(x)
    return x[:n].contiguous(), x[n:].contiguous()


def anisotropic(
    n: int,
    nq: int,
    d: int,
    seed: int = 0,
    alpha: float = 1.0,
    n_clusters: int = 256,
    spread: float = 0.6,
    mean_weight: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clustered anisotropic rows, L2-normalised (see the module docstring).

    ``x = μ · mean_weight + σ ⊙ (c_{k(x)} + spread · ε)``, ``c_k, ε ~ N(0, I)``, ``σ_j ∝ (j+1)^(-α/2)``
    in a random coordinate order, ``μ`` a fixed random direction scaled like one coordinate block.
    Queries are drawn from the same mixture (same clusters), independently of the base rows.
    """
    g = torch.Generator().manual_seed(seed)
    sigma = (torch.arange(d, dtype=torch.float32) + 1) ** (-alpha / 2)
    sigma = sigma[torch.randperm(d, generator=g)]
    sigma = sigma / torch.linalg.vector_norm(sigma) * d**0.5
    centers = torch.randn(n_clusters, d, generator=g)
    mu = torch.randn(d, generator=g).abs() * sigma * mean_weight
    assign = torch.randint(0, n_clusters, (n + nq,), generator=g)
    eps = torch.randn(n + nq, d, generator=g)
    x = mu + sigma * (centers[assign] + spread * eps)
    x = _normalise(x)
    return x[:n].contiguous(), x[n:].contiguous()


SYNTHETIC = {"gaussian": gaussian, "anisotropic": anisotropic}


def synthetic_dataset(kind: str, n: int, nq: int, d: int, seed: int = 0, gt_k: int = 100) -> ANNDataset:
    """A named synthetic data set with ground truth (``kind`` in ``SYNTHETIC``)."""
    if kind not in SYNTHETIC:
        raise ValueError(f"`kind` must be one of {sorted(SYNTHETIC)}, got {kind!r}")
    base, queries = SYNTHETIC[kind](n, nq, d, seed=seed)
    return ANNDataset.from_vectors(
        f"{kind}-{n}x{d}", base, queries, gt_k, {"source": f"synthetic {kind}", "seed": seed, "n": n, "nq": nq, "d": d}
    )
