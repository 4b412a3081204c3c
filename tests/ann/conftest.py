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
    """Our methods only (FAISS is cross-checked on synthetic data in the C14 test; keeps this < 10 s)."""
    torch.manual_seed(0)
    return run_grid(synthetic_seed_ds, GRID_METHODS, BITS, k=SEED_K)


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
def lm_pooled(ann_lm) -> tuple[torch.Tensor, str]:
    """Mean-pooled last-layer hidden states of the selected LM over texts 0..1151 of the corpus."""
    from turboquant.embeddings import lm_pooled_states, load_corpus

    model, tok, name = _model_and_tokenizer(ann_lm)
    return lm_pooled_states(model, tok, load_corpus(n=SEED_DB + SEED_NQ)), name


def _lm_meta(name: str, recipe: str) -> dict:
    return {"source": f"{name}: last-layer hidden states, mean-pooled, Gaussian projection to 256 (seed 0); {recipe}",
            "corpus": "data/ann/corpus.txt (texts 0..1023 database, 1024..1151 queries)", "db": SEED_DB,
            "queries": SEED_NQ}


@pytest.fixture(scope="session")
def lm_seed_ds(lm_pooled) -> ANNDataset:
    """The seed's recipe as written: pool, project to 256, nothing else (no normalisation, no centering)."""
    from turboquant.embeddings import project

    h, name = lm_pooled
    x = project(h, SEED_DIM, seed=0, normalize=False)
    return ANNDataset.from_vectors("lm-meanpool-256", x[:SEED_DB], x[SEED_DB:], meta=_lm_meta(name, "raw (seed recipe)"))


@pytest.fixture(scope="session")
def lm_variant_datasets(lm_pooled) -> dict[str, ANNDataset]:
    """Preprocessing variants, reported next to the seed recipe.

    * ``unit``: rows L2-normalised (cosine search); what FAISS's TurboQuant SQ (no norm) expects.
    * ``unit_centered_db``: the unit database minus its mean ``μ``, queries unchanged. For inner
      product ``<q, x - μ> = <q, x> - <q, μ>`` shifts every score of a query equally, so the exact
      ranking (ground truth) is the ``unit`` one; only what the quantizer sees changes.
    """
    from turboquant.embeddings import project

    h, name = lm_pooled
    x = project(h, SEED_DIM, seed=0, normalize=True)
    base, queries = x[:SEED_DB], x[SEED_DB:]
    unit = ANNDataset.from_vectors("lm-meanpool-256-unit", base, queries, meta=_lm_meta(name, "unit rows"))
    centered = ANNDataset("lm-meanpool-256-unit-centered-db", (base - base.mean(0)).contiguous(), queries, unit.gt,
                          _lm_meta(name, "unit rows, database mean subtracted (same ranking)"))
    return {"unit": unit, "unit_centered_db": centered}


@pytest.fixture(scope="session")
def lm_grid(lm_seed_ds):
    """All methods on the raw seed-recipe vectors, except FAISS SQtqmse: it stores no vector norm, so
    on rows of unequal norm its scores are not inner products (it is compared on the unit variant)."""
    torch.manual_seed(0)
    return run_grid(lm_seed_ds, [m for m in grid_methods() if m != "faiss-tqmse"], BITS, k=SEED_K)


@pytest.fixture(scope="session")
def lm_variant_grids(lm_variant_datasets):
    methods = ["turboquant-mse", "turboquant-prod", "scalar"]
    out = {}
    for name, ds in lm_variant_datasets.items():
        extra = ["faiss-tqmse", "faiss-tq"] if name == "unit" and faiss_available() else []
        out[name] = run_grid(ds, methods + extra, BITS, k=SEED_K)
    return out
