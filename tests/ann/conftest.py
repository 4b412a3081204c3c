"""Fixtures for the ANN tests: seed-sized data sets and one benchmark grid per data set, built once.

* ``synthetic_seed_ds`` — anisotropic clustered unit vectors, db 1024 x 128 queries, d=256 (the
  seed's shape), seed 0.
* ``lm_seed_ds`` — the seed's setting: mean-pooled last-layer hidden states of the selected LM over
  the shipped corpus (texts 0..1023 = database, 1024..1151 = queries), projected to 256 dims with a
  seeded Gaussian matrix, unit-normalised. Embeddings are cached on disk (turboquant.embeddings).
* ``*_grid`` — every ANN method at 1..4 bits on that data set (``run_grid``), shared by the claims.
"""

from __future__ import annotations

import pytest
import torch

from turboquant.ann import ANNDataset, run_grid, synthetic_dataset
from turboquant.ann.faiss_indexes import faiss_available

SEED_DB, SEED_NQ, SEED_DIM, SEED_K = 1024, 128, 256, 10
BITS = [1, 2, 3, 4]
# FAISS IndexPQ is left out of the seed-sized grids: training 256-centroid sub-codebooks takes
# tens of seconds here; it is measured in benchmarks/ann_bench.py.
GRID_METHODS = ["turboquant-mse", "turboquant-prod", "scalar", "pq-kmeans"]
FAISS_METHODS = ["faiss-tqmse", "faiss-tq", "faiss-sq", "faiss-rabitq"]


def grid_methods() -> list[str]:
    return GRID_METHODS + (FAISS_METHODS if faiss_available() else [])


@pytest.fixture(scope="session")
def synthetic_seed_ds() -> ANNDataset:
    return synthetic_dataset("anisotropic", SEED_DB, SEED_NQ, SEED_DIM, seed=0)


@pytest.fixture(scope="session")
def synthetic_grid(synthetic_seed_ds):
    torch.manual_seed(0)
    return run_grid(synthetic_seed_ds, grid_methods(), BITS, k=SEED_K)


@pytest.fixture(scope="session")
def ann_lm(request):
    """The selected LM: the session ``lm`` fixture (tests/conftest.py) when present, else loaded here."""
    try:
        return request.getfixturevalue("lm")
    except pytest.FixtureLookupError:
        from turboquant.models import ModelNotAvailable, load_model

        opts = request.getfixturevalue("tq_options")
        try:
            return load_model(opts.model_id, "float32", "sdpa", local_files_only=True)
        except ModelNotAvailable as exc:
            pytest.skip(str(exc))


def _model_and_tokenizer(lm):
    if isinstance(lm, tuple):
        return lm[0], lm[1], "lm"
    return lm.model, lm.tokenizer, getattr(lm, "name", "lm")


@pytest.fixture(scope="session")
def lm_seed_ds(ann_lm) -> ANNDataset:
    from turboquant.embeddings import lm_hidden_embeddings, load_corpus

    model, tok, name = _model_and_tokenizer(ann_lm)
    texts = load_corpus(n=SEED_DB + SEED_NQ)
    x = lm_hidden_embeddings(model, tok, texts, dim=SEED_DIM, seed=0)
    return ANNDataset.from_vectors(
        "lm-hidden-meanpool-256",
        x[:SEED_DB],
        x[SEED_DB:],
        meta={"source": f"{name} last-layer mean-pooled hidden states, Gaussian projection to 256 (seed 0), unit norm",
              "corpus": "data/ann/corpus.txt", "db": SEED_DB, "queries": SEED_NQ},
    )


@pytest.fixture(scope="session")
def lm_grid(lm_seed_ds):
    torch.manual_seed(0)
    return run_grid(lm_seed_ds, grid_methods(), BITS, k=SEED_K)
