"""benchmarks/quality_merge.py joins quality files of one grid split by recipes (GPU tier)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.synthetic

_SPEC = importlib.util.spec_from_file_location(
    "quality_merge", Path(__file__).resolve().parents[2] / "benchmarks" / "quality_merge.py")
quality_merge = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(quality_merge)


def _part(recipe: str, full_acc: float = 0.9, seconds: float = 10.0) -> dict:
    meta = {"needle_grid": {"lengths": [1024], "depths": [0.5], "trials": 2}, "qa_set": {"per_cell": 1},
            "kl": {"prompts": 2}, "model": "m", "device": "d", "seed": 0, "seconds": seconds}
    return {"meta": meta, "n_needles": 2, "n_qa": 5, "skipped": {},
            "recipes": {"full": {"needle_acc": full_acc}, recipe: {"needle_acc": 0.5}},
            "needle_cells": {"full": {"1024": {"0.5": full_acc}}, recipe: {"1024": {"0.5": 0.5}}}}


def test_parts_with_disjoint_recipes_merge():
    out = quality_merge.merge([_part("a", seconds=3), _part("b", seconds=7)])
    assert set(out["recipes"]) == {"full", "a", "b"} and set(out["needle_cells"]) == {"full", "a", "b"}
    assert out["meta"]["parts"] == 2 and out["meta"]["seconds"] == 7


def test_parts_that_disagree_on_full_precision_are_refused():
    with pytest.raises(ValueError, match="full-precision row differs"):
        quality_merge.merge([_part("a"), _part("b", full_acc=0.8)])


def test_parts_of_another_grid_are_refused():
    other = _part("b")
    other["meta"]["needle_grid"] = {"lengths": [2048], "depths": [0.5], "trials": 2}
    with pytest.raises(ValueError, match="needle_grid"):
        quality_merge.merge([_part("a"), other])


def test_kl_and_top1_carry_a_bootstrap_interval_over_the_prompts():
    """KL / top-1 are means over prompts; their 95% interval (BCa bootstrap) covers the mean,
    shrinks with more prompts, is a point for identical prompts and absent below two."""
    import numpy as np

    rng = np.random.default_rng(0)
    few, many = list(rng.exponential(0.05, 8)), list(rng.exponential(0.05, 512))
    lo8, hi8 = quality_merge._mean_interval(few)
    lo, hi = quality_merge._mean_interval(many)
    assert lo8 < float(np.mean(few)) < hi8 and lo < float(np.mean(many)) < hi
    assert hi - lo < hi8 - lo8
    assert quality_merge._mean_interval([0.2] * 4) == [0.2, 0.2]
    assert quality_merge._mean_interval([0.3]) is None
    row = {"kl": 0.0123, "kl_ci95": [0.01, 0.015], "top1": 0.9}
    assert quality_merge._mean_ci(row, "kl", ".4f") == "0.0123 [0.0100, 0.0150]"
    assert quality_merge._mean_ci(row, "top1", ".3f") == "0.900"
