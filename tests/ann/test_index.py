"""Unit tests of the ANN indexes: scoring math against the core's dequantize, packed storage,
one contract for every method, metrics, and bad input."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from tests.claim_checks import check_recall_on_hand_case
from turboquant import ScalarQuantizer, TurboQuantMSE, TurboQuantProd
from turboquant.ann import (
    METHODS,
    FlatIndex,
    PQKMeansIndex,
    ScalarIndex,
    TurboQuantIndex,
    UnsupportedConfig,
    exact_topk,
    gaussian,
    make_index,
    pq_layout,
    recall_1_at_k,
    recall_at_k,
    synthetic_dataset,
)
from turboquant.ann.faiss_indexes import faiss_available

pytestmark = pytest.mark.synthetic

BITS = [1, 2, 3, 4]
needs_faiss = pytest.mark.skipif(not faiss_available(), reason="FAISS baselines need faiss-cpu (pip install faiss-cpu)")


@pytest.fixture(scope="module")
def small():
    base, queries = gaussian(512, 16, 64, seed=3)
    return base, queries


def _built(method: str, base: torch.Tensor, bits: float = 4) -> object:
    index = make_index(method, base.shape[1], bits, seed=0)
    if index.requires_training:
        index.train(base)
    index.add(base)
    return index


# -- scoring math ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 1.5, 2, 2.5, 3, 3.5, 4], ids=lambda b: f"b{b}")
def test_mse_index_scores_equal_dequantized_inner_products(small, bits):
    """Search over packed codes returns <q, x̃> with x̃ = the core quantizer's decode, and its top-k."""
    base, queries = small
    index = TurboQuantIndex(64, bits, "mse", seed=5)
    index.add(base)
    res = index.search(queries, 20)
    xt = TurboQuantMSE(64, bits, "hadamard", seed=5).decode(TurboQuantMSE(64, bits, "hadamard", seed=5).encode(base))
    ref = queries @ xt.T
    torch.testing.assert_close(res.scores, torch.gather(ref, 1, res.ids), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(res.scores, torch.topk(ref, 20, dim=1).values, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits", [1, 2, 3, 4], ids=lambda b: f"b{b}")
def test_prod_index_scores_equal_dequantized_inner_products(small, bits):
    base, queries = small
    index = TurboQuantIndex(64, bits, "prod", seed=5)
    index.add(base)
    res = index.search(queries, 20)
    qz = TurboQuantProd(64, bits, "hadamard", seed=5)
    ref = queries @ qz.decode(qz.encode(base)).T
    torch.testing.assert_close(res.scores, torch.gather(ref, 1, res.ids), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(res.scores, torch.topk(ref, 20, dim=1).values, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"b{b}")
def test_scalar_index_scores_equal_dequantized_inner_products(small, bits):
    base, queries = small
    index = ScalarIndex(64, bits)
    index.add(base)
    res = index.search(queries, 20)
    sq = ScalarQuantizer(64, bits)
    ref = queries @ sq.dequantize(sq.unpack(sq.pack(sq.quantize(base)))).T
    torch.testing.assert_close(res.scores, torch.gather(ref, 1, res.ids), rtol=1e-4, atol=1e-5)


def test_pq_index_scores_equal_reconstruction_inner_products(small):
    base, queries = small
    index = PQKMeansIndex(64, 2, seed=0)
    index.train(base)
    index.add(base)
    res = index.search(queries, 10)
    codes = index.encode(base)  # [n, M]
    recon = torch.stack([index.centroids[m][codes[:, m]] for m in range(index.M)], dim=1).reshape(len(base), 64)
    ref = queries @ recon.T
    torch.testing.assert_close(res.scores, torch.gather(ref, 1, res.ids), rtol=1e-4, atol=1e-5)


def test_flat_index_is_exact(small):
    base, queries = small
    flat = FlatIndex(64)
    flat.add(base)
    res = flat.search(queries, 5)
    torch.testing.assert_close(res.scores, torch.topk(queries @ base.T, 5, dim=1).values)


def test_blockwise_search_equals_one_block(small):
    """The running top-k over database blocks gives the same answer as one big block."""
    base, queries = small
    a = TurboQuantIndex(64, 3, block=37)
    b = TurboQuantIndex(64, 3, block=1 << 20)
    a.add(base)
    b.add(base)
    ra, rb = a.search(queries, 10), b.search(queries, 10)
    torch.testing.assert_close(ra.scores, rb.scores)
    assert recall_at_k(ra.ids, rb.ids, 10) == 1.0


def test_add_in_chunks_equals_add_once(small):
    base, queries = small
    a, b = TurboQuantIndex(64, 2, "prod"), TurboQuantIndex(64, 2, "prod")
    a.add(base)
    b.add(base[:100])
    b.add(base[100:])
    assert b.ntotal == a.ntotal == len(base)
    ra, rb = a.search(queries, 10), b.search(queries, 10)
    assert torch.equal(ra.ids, rb.ids)


def test_non_power_of_two_dimension_uses_dense_rotation():
    base, queries = gaussian(300, 8, 96, seed=1)
    index = TurboQuantIndex(96, 4)
    assert index.quantizer.rotation.kind == "dense"
    index.add(base)
    truth = exact_topk(base, queries, 10)
    r = recall_at_k(index.search(queries, 10).ids, truth, 10)
    assert r > 0.7, f"4-bit TurboQuant recall@10 at d=96 is {r:.3f}, expected > 0.7"


# -- storage ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 1.5, 2, 2.5, 3, 3.5, 4], ids=lambda b: f"b{b}")
def test_tq_codes_are_stored_packed(bits):
    base, _ = gaussian(100, 1, 256, seed=0)
    mse = TurboQuantIndex(256, bits, "mse")
    mse.add(base)
    assert mse._codes.dtype == torch.uint8 and mse._codes.shape == (100, int(256 * bits / 8))
    assert mse.bytes_per_vector() == 256 * bits / 8 + 2, f"TQ-mse bytes/vector {mse.bytes_per_vector()}"
    if bits in (1, 2, 2.5, 3, 3.5, 4):
        prod = TurboQuantIndex(256, bits, "prod")
        prod.add(base)
        expected = 256 * bits / 8 + (4 if bits > 1 else 2)  # + norm (b>1) + residual norm, float16
        assert prod.bytes_per_vector() == expected, f"TQ-prod bytes/vector {prod.bytes_per_vector()} != {expected}"


@pytest.mark.parametrize(
    "d,bits,expected", [(256, 1, (32, 8)), (256, 2, (64, 8)), (256, 3, (128, 6)), (256, 4, (128, 8)), (384, 3, (192, 6))]
)
def test_pq_layout_spends_the_same_bits(d, bits, expected):
    m, nbits = pq_layout(d, bits)
    assert (m, nbits) == expected and m * nbits == d * bits


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"b{b}")
def test_pq_kmeans_bytes_per_vector(bits):
    base, _ = gaussian(600, 1, 64, seed=0)
    index = PQKMeansIndex(64, bits)
    index.train(base)
    index.add(base)
    assert index.bytes_per_vector() == 64 * bits / 8


@needs_faiss
@pytest.mark.parametrize(
    "method,bits,expected",
    [("faiss-tqmse", 1, 32), ("faiss-tqmse", 4, 128), ("faiss-tq", 2, 72), ("faiss-sq", 4, 128), ("faiss-pq", 2, 64)],
)
def test_faiss_code_sizes(method, bits, expected):
    """FAISS's own code size per vector at d=256 (SQtq stores 8 more bytes a vector)."""
    index = make_index(method, 256, bits)
    assert index.code_size() == expected, f"{method} at {bits} bits: {index.code_size()} bytes, expected {expected}"


@needs_faiss
def test_faiss_pq_pads_when_m_does_not_divide_d():
    index = make_index("faiss-pq", 384, 3)
    assert index.factory == "PQ144x8np" and index.pad_to == 432 and index.code_size() == 144


# -- quality smoke: recall rises with bits -----------------------------------------------------------
@pytest.mark.parametrize("variant", ["mse", "prod"])
def test_recall_rises_with_bits(variant):
    ds = synthetic_dataset("anisotropic", 2000, 64, 128, seed=1)
    recalls = []
    for b in BITS:
        idx = TurboQuantIndex(128, b, variant)
        idx.add(ds.base)
        recalls.append(recall_at_k(idx.search(ds.queries, 10).ids, ds.gt, 10))
    assert all(b > a for a, b in itertools.pairwise(recalls)), f"TQ-{variant} recall@10 by bits 1..4: {recalls}"
    assert recalls[-1] > 0.8, f"TQ-{variant} 4-bit recall@10 {recalls[-1]:.3f} <= 0.8"


# -- metrics -----------------------------------------------------------------------------------------
def test_recall_metrics_on_known_ids():
    truth = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    found = torch.tensor([[1, 0, 9, 8], [9, 8, 7, 4]])
    assert recall_at_k(found, truth, 2) == 0.5  # {1,0} vs {0,1} = 1; {9,8} vs {4,5} = 0
    assert recall_at_k(found, truth, 4) == (2 / 4 + 2 / 4) / 2
    assert recall_1_at_k(found, truth, [1, 2, 4]) == {1: 0.0, 2: 0.5, 4: 1.0}


def test_recall_metrics_on_a_hand_computed_database():
    """Ground truth and recall@k known by hand (tests/claim_checks.py): the k+1-th approximate
    neighbour is a true one, so counting it would read 1.0 instead of 2/3."""
    check_recall_on_hand_case(recall_at_k, recall_1_at_k, exact_topk)


def test_recall_metric_rejects_k_wider_than_results():
    with pytest.raises(ValueError, match="`k`=5"):
        recall_at_k(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 10, dtype=torch.long), 5)


# -- bad input: same errors for every method ---------------------------------------------------------
ALL_METHODS = [m for m in METHODS if faiss_available() or not m.startswith("faiss")]
FAST_METHODS = [m for m in ALL_METHODS if m != "faiss-pq"]  # IndexPQ trains for tens of seconds


@pytest.mark.parametrize("method", FAST_METHODS)
def test_k_larger_than_database_names_k(method):
    base, queries = gaussian(300, 4, 64, seed=0)
    index = _built(method, base)
    with pytest.raises(ValueError, match=r"`k`=301 is larger than the database size ntotal=300"):
        index.search(queries, 301)


@pytest.mark.parametrize("method", FAST_METHODS)
def test_query_dimension_mismatch_names_queries(method):
    base, _ = gaussian(300, 4, 64, seed=0)
    index = _built(method, base)
    with pytest.raises(ValueError, match=r"`queries` has dimension 32 but the index was built for d=64"):
        index.search(torch.randn(4, 32), 5)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_add_dimension_mismatch_names_x(method):
    index = make_index(method, 64, 4)
    index.is_trained = True  # reach the add() check without training
    with pytest.raises(ValueError, match=r"`x` has dimension 65 but the index was built for d=64"):
        index.add(torch.randn(10, 65))


@pytest.mark.parametrize("method", ALL_METHODS)
def test_search_on_empty_database(method):
    index = make_index(method, 64, 4)
    with pytest.raises(ValueError, match=r"index is empty \(ntotal=0\)"):
        index.search(torch.randn(2, 64), 1)


@pytest.mark.parametrize("method", FAST_METHODS)
def test_nan_queries_name_queries(method):
    base, queries = gaussian(300, 4, 64, seed=0)
    index = _built(method, base)
    queries = queries.clone()
    queries[1, 3] = math.nan
    with pytest.raises(ValueError, match=r"`queries` contains 1 NaN/Inf"):
        index.search(queries, 5)


@pytest.mark.parametrize("k", [0, -1, 2.5, True])
def test_non_positive_or_non_int_k(k):
    index = TurboQuantIndex(64, 2)
    index.add(gaussian(20, 1, 64)[0])
    with pytest.raises(ValueError, match="`k` must be a positive int"):
        index.search(torch.randn(1, 64), k)


def test_add_before_train_is_refused():
    with pytest.raises(RuntimeError, match=r"call train\(x\) before add\(x\)"):
        PQKMeansIndex(64, 2).add(torch.randn(10, 64))


def test_empty_add_is_refused():
    with pytest.raises(ValueError, match="`x` is empty"):
        TurboQuantIndex(64, 2).add(torch.empty(0, 64))


def test_integer_queries_are_refused():
    index = TurboQuantIndex(64, 2)
    index.add(gaussian(20, 1, 64)[0])
    with pytest.raises(TypeError, match="`queries` must have a floating dtype"):
        index.search(torch.ones(2, 64, dtype=torch.int64), 1)


def test_unsupported_bit_widths_say_why():
    with pytest.raises(UnsupportedConfig, match="scalar baseline must be one of"):
        ScalarIndex(64, 2.5)
    if faiss_available():
        with pytest.raises(UnsupportedConfig, match="SQ1..3 rejected"):
            make_index("faiss-sq", 64, 2)
        with pytest.raises(UnsupportedConfig, match="SQtq1 is rejected"):
            make_index("faiss-tq", 64, 1)


def test_unknown_method_lists_available():
    with pytest.raises(KeyError, match="available:.*turboquant-mse"):
        make_index("hnsw", 64, 4)


def test_bad_variant_names_allowed():
    with pytest.raises(ValueError, match=r"`variant` must be one of \('mse', 'prod'\)"):
        TurboQuantIndex(64, 2, variant="qjl")
