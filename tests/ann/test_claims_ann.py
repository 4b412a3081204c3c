"""Claims C12 and C13 (ANN retrieval) of ../shared/DESIGN.md, plus an ANN cross-check for C14.

* C12: TurboQuant recall@10 > scalar no-rotation at the required bits (``--ann_required_scalar_bits``,
  default 2,3,4); 1 bit reported. The asserted TurboQuant variant is TurboQuant-mse (it ranks
  better than prod at equal bits, as FAISS's own SQtq vs SQtqmse also shows); prod is reported.
* C13: index build time (train + add) speedup over PQ-kmeans >= ``--ann_pq_index_speedup_threshold``
  (default 10), measured in the same run; the recall gap to PQ and to FAISS is reported, whatever it is.
* The LM data follows the seed's recipe as written (mean-pool, Gaussian projection to 256, no
  normalisation or centering) for the asserted claims; unit-normalised and database-centred
  variants are measured and reported (C12 WARNs if TurboQuant loses to scalar on one of them).
* C14 (ANN part): our TurboQuant-mse index's recall@10 within 0.01 of FAISS ``RR{d},SQtqmse{b}`` on
  the same vectors and bits.

Each claim is settled twice: on synthetic anisotropic data of the seed's shape (``synthetic``) and
on the seed's setting, mean-pooled LM hidden states projected to 256 dims (``model``).
"""

from __future__ import annotations

import time

import pytest
import torch

from tests.claim_checks import C14_ANN_TOL, check_c14_ann
from turboquant.ann import MethodResult, make_index, synthetic_dataset, table
from turboquant.ann.faiss_indexes import faiss_available

BITS = [1, 2, 3, 4]
SEED_K = 10

SEED_TQ = {1: 0.184, 2: 0.393, 3: 0.666, 4: 0.795}
SEED_SCALAR = {1: 0.238, 2: 0.298, 3: 0.546, 4: 0.754}
SEED_PQ = {1: 0.331, 2: 0.707, 3: 0.766, 4: 0.880}
SEED_SPEEDUP = {1: 121.8, 2: 149.5, 3: 357.4, 4: 460.3}


def required_bits(tq_options) -> list[int]:
    """``--ann-required-scalar-bits``: parsed and checked against 1..4 at configure time
    (turboquant/options.py), so a bad value never reaches the ANN grid."""
    return list(tq_options.ann_required_scalar_bits)


def _cell(grid: list[MethodResult], method: str, bits: int) -> MethodResult | None:
    for r in grid:
        if r.method == method and r.bits == bits and r.skipped is None:
            return r
    return None


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


# -- C12 -----------------------------------------------------------------------------------------------
def check_c12(claim, grid, ds, tq_options, source: str, compare_seed: bool) -> None:
    req = required_bits(tq_options)
    recall = table(grid, "recall_at_k")
    tq, sc = recall["turboquant-mse"], recall["scalar"]
    margin = {b: round(tq[f"{b}"] - sc[f"{b}"], 4) for b in BITS}
    claim.setting(**{source: {**ds.meta, "d": ds.d, "k": SEED_K, "bits": BITS, "metric": "inner product",
                              "tq_variant_asserted": "mse", "rotation": "hadamard", "seed": 0}})
    claim.measured(**{source: {
        "recall_vs_bits": {m: {b: _r(v) for b, v in s.items()} for m, s in recall.items()},
        "recall_1_at_10": {m: {b: _r(v.get(10)) for b, v in s.items()} for m, s in table(grid, "recall_1_at").items()},
        "tq_minus_scalar": margin,
        "bytes_per_vector": {m: {b: v for b, v in s.items()} for m, s in table(grid, "bytes_per_vector").items()},
    }})
    claim.threshold(rule="turboquant-mse recall@10 > scalar (no rotation) recall@10: paired bootstrap 95% interval of "
                    "the per-query difference; PASS above 0, FAIL below, WARN inconclusive", required_bits=req,
                    seed_tq=SEED_TQ, seed_scalar=SEED_SCALAR)
    if 1 not in req:
        claim.note(f"{source}: 1 bit reported only: TQ {tq['1']:.3f} vs scalar {sc['1']:.3f} (seed 0.184 vs 0.238)")
    # decision rule (turboquant.verdicts, margin 0 = superiority) on the per-query paired recall@10
    verdicts = {}
    for b in BITS:
        t_cell, s_cell = _cell(grid, "turboquant-mse", b), _cell(grid, "scalar", b)
        if t_cell is not None and s_cell is not None and t_cell.recall_per_query:
            verdicts[b] = claim.decide(f"{source}: turboquant-mse vs scalar, {b} bit", t_cell.recall_per_query,
                                       s_cell.recall_per_query, 0.0, kind="continuous", primary=False)
    failed = [b for b in req if verdicts[b].status == "FAIL"]
    unresolved = [b for b in req if verdicts[b].status == "WARN"]
    if unresolved:
        claim.warn(f"{source}: TQ vs scalar inconclusive at bits {unresolved}: "
                   + "; ".join(verdicts[b].reason for b in unresolved))
    if compare_seed:
        seed_margin = {b: round(SEED_TQ[b] - SEED_SCALAR[b], 4) for b in BITS}
        worse = [b for b in req if b not in failed and margin[b] < seed_margin[b]]
        if worse:
            claim.warn(f"{source}: TQ-scalar margin at bits {worse} ({[margin[b] for b in worse]}) is below the "
                       f"seed's ({[seed_margin[b] for b in worse]})")
    assert not failed, (
        f"{source}: TurboQuant-mse recall@10 is below scalar no-rotation (95% interval of the per-query paired "
        f"difference wholly < 0) at bits {failed}: "
        + ", ".join(f"{b} bit: TQ {tq[f'{b}']:.3f} vs scalar {sc[f'{b}']:.3f}" for b in req)
    )


@pytest.mark.synthetic
@pytest.mark.claim("C12", "ANN: TurboQuant beats scalar no-rotation")
def test_c12_tq_beats_scalar_synthetic(claim, synthetic_grid, synthetic_seed_ds, tq_options):
    check_c12(claim, synthetic_grid, synthetic_seed_ds, tq_options, "synthetic", compare_seed=False)


@pytest.mark.model
@pytest.mark.claim("C12", "ANN: TurboQuant beats scalar no-rotation")
def test_c12_tq_beats_scalar_lm_embeddings(claim, lm_grid, lm_seed_ds, lm_variant_grids, tq_options):
    """Asserted on the seed's recipe as written (pool, project; raw). Variants reported, WARN if TQ loses."""
    req = required_bits(tq_options)
    variants = {}
    for name, grid in lm_variant_grids.items():
        rec = table(grid, "recall_at_k")
        variants[name] = {m: {b: _r(v) for b, v in s.items()} for m, s in rec.items()}
        lost = [b for b in req if not rec["turboquant-mse"][f"{b}"] > rec["scalar"][f"{b}"]]
        if lost:
            claim.warn(f"lm variant {name}: TQ-mse does not beat scalar at bits {lost} ("
                       + ", ".join(f"{rec['turboquant-mse'][f'{b}']:.3f} vs {rec['scalar'][f'{b}']:.3f}" for b in lost) + ")")
    claim.measured(lm_variants=variants)
    check_c12(claim, lm_grid, lm_seed_ds, tq_options, "lm", compare_seed=True)


# -- C13 -----------------------------------------------------------------------------------------------
def build_seconds(method: str, ds, bits: int, repeats: int) -> tuple[list[float], list[float]]:
    """Wall and process-CPU seconds of building ``method`` (construct + train + add the database), repeated.

    The claim uses the minimum wall time of each method (timeit's convention: the least-disturbed
    run). Both methods get the same estimator; on a shared 2-core machine a 10 ms build can be
    stretched many times by preemption, a 1 s build much less, so a single run biases the ratio.
    """
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        index = make_index(method, ds.d, bits, seed=0)
        if index.requires_training:
            index.train(ds.base)
        index.add(ds.base)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


TQ_REPEATS, PQ_REPEATS = 7, 2


def check_c13(claim, grid, ds, tq_options, source: str) -> None:
    # Both builds are timed on one thread: scipy's k-means is single-threaded, and on a shared
    # machine a 2-thread torch op can stall a whole scheduler slice in an OpenMP barrier (a 3 ms
    # build measured 0.2-0.3 s that way), which says nothing about the method.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check_c13(claim, grid, ds, tq_options, source)
    finally:
        torch.set_num_threads(threads)


def _check_c13(claim, grid, ds, tq_options, source: str) -> None:
    threshold = float(tq_options.ann_pq_index_speedup_threshold)
    # The first builds in a process are slower (allocator, thread-pool and kernel warm-up): report
    # the cold run, then time warm builds (the steady cost of an online index).
    tq_cold = {b: build_seconds("turboquant-mse", ds, b, 2)[0][0] for b in BITS}
    tq = {b: build_seconds("turboquant-mse", ds, b, TQ_REPEATS) for b in BITS}
    pq = {b: build_seconds("pq-kmeans", ds, b, PQ_REPEATS) for b in BITS}
    tq_min = {b: min(tq[b][0]) for b in BITS}
    pq_min = {b: min(pq[b][0]) for b in BITS}
    speedup = {b: pq_min[b] / tq_min[b] for b in BITS}
    cpu_speedup = {b: min(pq[b][1]) / max(min(tq[b][1]), 1e-9) for b in BITS}  # CPU time: this run only
    recall = table(grid, "recall_at_k")
    gaps = {
        other: {f"{b}": _r(recall["turboquant-mse"][f"{b}"] - recall[other][f"{b}"]) for b in BITS if f"{b}" in recall[other]}
        for other in ("pq-kmeans", "faiss-tqmse", "faiss-rabitq", "faiss-sq", "turboquant-prod", "faiss-tq")
        if other in recall
    }
    # recall vs PQ is reported, not asserted: with its 95% interval (paired bootstrap over queries)
    for b in BITS:
        t_cell, p_cell = _cell(grid, "turboquant-mse", b), _cell(grid, "pq-kmeans", b)
        if t_cell is not None and p_cell is not None and t_cell.recall_per_query:
            claim.decide(f"{source}: turboquant-mse vs pq-kmeans, {b} bit", t_cell.recall_per_query,
                         p_cell.recall_per_query, 0.0, kind="continuous", primary=False)
    claim.setting(**{source: {**ds.meta, "d": ds.d, "k": SEED_K,
                              "build": f"construct + train + add; min wall of {TQ_REPEATS} warm (TQ, after 2 untimed) / "
                                       f"{PQ_REPEATS} (PQ) runs, 1 torch thread",
                              "pq": "scipy kmeans2 per sub-space (minit=points, 10 iters, 8-bit codebooks where possible)",
                              "threads": torch.get_num_threads()}})
    claim.measured(**{source: {
        "tq_build_s_min": {b: round(v, 5) for b, v in tq_min.items()},
        "tq_build_s_cold_first_run": {b: round(v, 5) for b, v in tq_cold.items()},
        "pq_build_s_min": {b: round(v, 4) for b, v in pq_min.items()},
        "tq_build_s_runs": {b: [round(x, 5) for x in tq[b][0]] for b in BITS},
        "pq_build_s_runs": {b: [round(x, 4) for x in pq[b][0]] for b in BITS},
        "speedup_pq_over_tq": {b: round(v, 1) for b, v in speedup.items()},
        "cpu_time_speedup_pq_over_tq": {b: round(v, 1) for b, v in cpu_speedup.items()},
        "recall_tq_minus_other": gaps,
        "recall_pq_kmeans": {b: _r(recall["pq-kmeans"][f"{b}"]) for b in BITS},
        "recall_tq_mse": {b: _r(recall["turboquant-mse"][f"{b}"]) for b in BITS},
    }})
    claim.threshold(min_build_speedup=threshold, seed_speedup=SEED_SPEEDUP, seed_pq_recall=SEED_PQ)
    claim.note(f"{source}: recall TQ-mse minus PQ-kmeans by bits: {gaps.get('pq-kmeans')} (reported, not asserted)")
    low = [b for b in BITS if speedup[b] < threshold]
    assert not low, (
        f"{source}: TQ build speedup over PQ-kmeans below {threshold:g}x at bits {low}: "
        + ", ".join(f"{b} bit: PQ {pq_min[b]:.4f}s / TQ {tq_min[b]:.5f}s = {speedup[b]:.1f}x" for b in BITS)
    )


@pytest.mark.synthetic
@pytest.mark.claim("C13", "ANN: indexing far cheaper than PQ")
def test_c13_build_speedup_over_pq_synthetic(claim, synthetic_grid, synthetic_seed_ds, tq_options):
    check_c13(claim, synthetic_grid, synthetic_seed_ds, tq_options, "synthetic")


@pytest.mark.model
@pytest.mark.claim("C13", "ANN: indexing far cheaper than PQ")
def test_c13_build_speedup_over_pq_lm_embeddings(claim, lm_grid, lm_seed_ds, tq_options):
    check_c13(claim, lm_grid, lm_seed_ds, tq_options, "lm")


# -- C14 (ANN part): recall matches FAISS's own TurboQuant ----------------------------------------------
C14_TOL = C14_ANN_TOL
C14_SEEDS = (0, 1, 2)


@pytest.mark.synthetic
@pytest.mark.skipif(not faiss_available(), reason="the FAISS cross-check needs faiss-cpu (pip install faiss-cpu)")
@pytest.mark.claim("C14", "cross-check with FAISS's TurboQuant")
def test_c14_ann_recall_matches_faiss_sqtqmse(claim):
    """Mean recall@10 of our index over 3 rotation seeds vs FAISS RR256,SQtqmse{b}, 1000 queries;
    FAISS's side is scored by FAISS's own search and a set intersection, not our metric."""
    ds = synthetic_dataset("gaussian", 4096, 1000, 256, seed=0)
    check_c14_ann(claim, ds, BITS, SEED_K, C14_SEEDS, C14_TOL)


@pytest.mark.model
@pytest.mark.skipif(not faiss_available(), reason="the FAISS cross-check needs faiss-cpu (pip install faiss-cpu)")
@pytest.mark.claim("C14", "cross-check with FAISS's TurboQuant")
def test_c14_ann_recall_vs_faiss_on_lm_embeddings_reported(claim, lm_variant_grids):
    """Same comparison on the seed's 128 LM-embedding queries, unit rows (FAISS's TurboQuant stores no
    norm): reported, not asserted (1280 query-neighbour pairs are too few to resolve 0.01)."""
    recall = table(lm_variant_grids["unit"], "recall_at_k")
    diff = {b: _r(recall["turboquant-mse"][b] - recall["faiss-tqmse"][b]) for b in recall["faiss-tqmse"]}
    diff_prod = {b: _r(recall["turboquant-prod"][b] - recall["faiss-tq"][b]) for b in recall.get("faiss-tq", {})}
    claim.measured(ann_lm_recall_diff_mse_vs_sqtqmse=diff, ann_lm_recall_diff_prod_vs_sqtq=diff_prod)
    claim.note(f"LM embeddings (128 queries): TQ-mse minus FAISS SQtqmse recall@10 = {diff}; prod minus SQtq = {diff_prod}")
