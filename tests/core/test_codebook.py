"""Lloyd-Max codebooks: symmetric, sorted, stationary, and equal to the known Gaussian-limit values."""

import math

import numpy as np
import pytest

from tests.claim_checks import (
    LITERATURE_ROUNDING,
    LLOYD_MAX_BETA_D256,
    lloyd_max_reference,
    quantizer_distortion,
)
from turboquant.codebook import lloyd_max_codebook

pytestmark = pytest.mark.synthetic

# Lloyd-Max MSE of N(0, 1) at b = 1..4 bits (Max 1960; the paper's 0.36, 0.117, 0.03, 0.009).
GAUSSIAN_LLOYD_MAX = {1: 0.363380, 2: 0.117481, 3: 0.034548, 4: 0.009497}


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_gaussian_limit_codebook_matches_lloyd_max_table(bits):
    cb = lloyd_max_codebook(bits, 256, "gaussian")
    assert cb.distortion == pytest.approx(GAUSSIAN_LLOYD_MAX[bits], rel=1e-3)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("law", ["beta", "gaussian"])
def test_codebook_is_sorted_symmetric_with_midpoint_boundaries(bits, law):
    cb = lloyd_max_codebook(bits, 128, law)
    c = cb.centroids
    assert len(c) == 2**bits and list(c) == sorted(c)
    for lo, hi in zip(c, reversed(c)):
        assert lo == pytest.approx(-hi, abs=1e-9)
    for k, b in enumerate(cb.boundaries):
        assert b == pytest.approx((c[k] + c[k + 1]) / 2)


def test_one_bit_centroids_are_plus_minus_sqrt_2_over_pi_d_in_the_gaussian_limit():
    cb = lloyd_max_codebook(1, 256, "gaussian")
    assert cb.centroids[1] == pytest.approx(math.sqrt(2 / math.pi) / math.sqrt(256), rel=1e-9)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_exact_beta_codebook_approaches_gaussian_limit_as_d_grows(bits):
    gaps = [abs(lloyd_max_codebook(bits, d, "beta").distortion - GAUSSIAN_LLOYD_MAX[bits]) for d in (16, 64, 1024)]
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] / GAUSSIAN_LLOYD_MAX[bits] < 0.005


def test_codebook_is_cached():
    assert lloyd_max_codebook(3, 64) is lloyd_max_codebook(3, 64)


@pytest.mark.parametrize("bad", [0, 9, 2.5, True])
def test_codebook_bits_out_of_range_is_rejected(bad):
    with pytest.raises(ValueError, match="`bits`"):
        lloyd_max_codebook(bad, 64)


def test_codebook_law_must_be_known():
    with pytest.raises(ValueError, match="`law` must be one of"):
        lloyd_max_codebook(2, 64, "laplace")


# ---- against an independent computation (tests/claim_checks.py: own density, iteration, quad) ----
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_independent_reference_reproduces_the_published_exact_values_at_d256(bits):
    """The reference the claims compare against agrees with DESIGN.md's exact d=256 figures."""
    ref = lloyd_max_reference(bits, 256)[1]
    assert abs(ref - LLOYD_MAX_BETA_D256[bits]) <= LITERATURE_ROUNDING, f"b={bits}: {ref:.6f} vs {LLOYD_MAX_BETA_D256[bits]}"


@pytest.mark.parametrize("d", [64, 96, 256])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_beta_codebook_equals_an_independent_lloyd_max_computation(bits, d):
    """Centroids within 1e-3 standard deviations and D_mse within 1e-5 (relative) of the reference;
    the codebook's own distortion figure equals the distortion of its centroids."""
    cb = lloyd_max_codebook(bits, d, "beta")
    cents, ref = lloyd_max_reference(bits, d)
    gap = max(abs(a - b) for a, b in zip(cb.centroids, cents)) * math.sqrt(d)
    assert gap < 1e-3, f"b={bits} d={d}: centroids differ by {gap:.2e} standard deviations"
    assert cb.distortion == pytest.approx(ref, rel=1e-5), f"b={bits} d={d}: {cb.distortion:.6f} vs {ref:.6f}"
    assert quantizer_distortion(cb.centroids, d) == pytest.approx(cb.distortion, rel=1e-6)


def test_scaled_or_uniform_centroids_are_measurably_worse_than_lloyd_max():
    """The reference can tell a wrong codebook beyond the C03 tolerance of 2%: centroids x1.1 cost
    3-4% more at 2..4 bits, a uniform grid between the extreme centroids 9-26% more at 3..4 bits."""
    for bits in (2, 3, 4):
        cents, ref = lloyd_max_reference(bits, 256)
        scaled = quantizer_distortion([1.1 * c for c in cents], 256)
        assert scaled > 1.025 * ref, f"b={bits}: x1.1 centroids {scaled:.5f} vs Lloyd-Max {ref:.5f}"
        if bits >= 3:
            uniform = quantizer_distortion(list(np.linspace(cents[0], cents[-1], 2**bits)), 256)
            assert uniform > 1.05 * ref, f"b={bits}: uniform grid {uniform:.5f} vs Lloyd-Max {ref:.5f}"
