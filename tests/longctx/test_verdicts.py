"""The decision rule (turboquant.verdicts): hand-computed cases for both interval kinds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from turboquant.verdicts import MIN_N_CONTINUOUS, decide, discordant_interval

pytestmark = pytest.mark.synthetic


def test_identical_needles_on_a_tiny_grid_are_inconclusive_never_pass() -> None:
    # b = c = 0, n = 9: half-width 1 - 0.0125^(1/9) = 0.3855 (exact bound at alpha/4)
    v = decide([1] * 9, [1] * 9, 0.02, kind="binary")
    assert v.status == "WARN" and v.diff == 0.0
    assert v.ci95[0] == pytest.approx(-(1 - 0.0125 ** (1 / 9)), abs=1e-9)
    # smallest n whose zero-discordance bound clears the margin: ln(0.0125)/ln(0.98) = 216.9 -> 217
    assert v.n_to_resolve == 217 == math.ceil(math.log(0.0125) / math.log(0.98))
    assert decide([1] * 216, [1] * 216, 0.02, kind="binary").status == "WARN"
    assert decide([1] * 217, [1] * 217, 0.02, kind="binary").status == "PASS"


def test_binary_clear_regression_fails_and_clear_non_inferiority_passes() -> None:
    full = [1] * 300
    lost = [0] * 60 + [1] * 240  # c = 60 of 300: diff -0.2
    v = decide(lost, full, 0.02, kind="binary")
    assert v.status == "FAIL" and v.diff == pytest.approx(-0.2) and v.ci95[1] < -0.02
    v = decide([1] * 300, [1] * 299 + [0], 0.02, kind="binary")  # one gained, none lost
    assert v.status == "PASS" and v.ci95[0] > -0.02


def test_binary_interval_matches_hand_computed_clopper_pearson() -> None:
    from scipy.stats import beta

    b, c, n = 3, 7, 100
    lo, hi = discordant_interval(b, c, n)
    assert lo == pytest.approx(beta.ppf(0.0125, 3, 98) - beta.ppf(0.9875, 8, 93))
    assert hi == pytest.approx(beta.ppf(0.9875, 4, 97) - beta.ppf(0.0125, 7, 94))
    # the H100 grid of the README (3 needles lost, 0.93 vs 0.96 over 100) is inconclusive, not FAIL
    comp, full = [1] * 92 + [1] + [0] * 4 + [0] * 3, [1] * 92 + [0] + [1] * 4 + [0] * 3
    v = decide(comp, full, 0.02, kind="binary")
    assert v.status == "WARN" and v.diff == pytest.approx(-0.03) and v.n_to_resolve > 100


def test_continuous_bootstrap_pass_fail_and_resolution_n() -> None:
    rng = np.random.default_rng(0)
    full = rng.uniform(0, 1, 200)
    close = full + rng.normal(0, 0.02, 200)
    v = decide(close, full, 0.01)
    assert v.status == "PASS", v.reason
    assert v.ci95[0] > -0.01 and v.ci95[0] < v.diff < v.ci95[1]
    worse = full - 0.1 + rng.normal(0, 0.02, 200)
    assert decide(worse, full, 0.01).status == "FAIL"
    # inconclusive: mean near the margin; n from (z sd / |diff + m|)^2 at the observed sd
    d = rng.normal(-0.01, 0.05, 200)
    d = d - d.mean() - 0.008
    v = decide(full + d, full, 0.01)
    assert v.status == "WARN"
    assert v.n_to_resolve == math.ceil((1.959963984540054 * d.std(ddof=1) / 0.002) ** 2)
    assert decide(full + d, full, 0.01) == v, "the bootstrap must be deterministic (fixed seed)"


def test_continuous_guards_against_tiny_and_degenerate_samples() -> None:
    small = decide([0.9] * 10, [0.1] * 10, 0.01)  # even a large gain is WARN below MIN_N
    assert small.status == "WARN" and "n < 20" in small.reason and MIN_N_CONTINUOUS == 20
    same = decide([50.0] * 30, [50.0] * 30, 1.0, score_range=100.0)  # no case changed, 0-100 scale
    assert same.status == "WARN" and same.ci95[0] < -1.0
    assert same.n_to_resolve == math.ceil(math.log(0.0125) / math.log(0.99))  # 437


def test_bad_input_names_the_parameter() -> None:
    with pytest.raises(ValueError, match="`kind` must be one of"):
        decide([1], [1], 0.02, kind="exact")
    with pytest.raises(ValueError, match="`margin` must be a finite number >= 0"):
        decide([1], [1], -0.1)
    with pytest.raises(ValueError, match="paired"):
        decide([1, 0], [1], 0.02)
    with pytest.raises(ValueError, match="kind='binary' needs scores in"):
        decide([0.5], [1], 0.02, kind="binary")
    with pytest.raises(ValueError, match="empty"):
        decide([], [], 0.02)
