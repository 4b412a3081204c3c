"""Unit tests of the quantizers: round trips through real packed bytes, determinism, bad input."""

import math

import pytest
import torch

from tests.claim_checks import reference_distortion
from turboquant import ScalarQuantizer, TurboQuantMSE, TurboQuantProd

pytestmark = pytest.mark.synthetic
ALL_BITS = [1, 1.5, 2, 2.5, 3, 3.5, 4]


def unit_vectors(n: int, d: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("bits", ALL_BITS, ids=lambda b: f"b{b}")
def test_mse_pack_unpack_is_lossless_and_costs_d_bits_over_8_bytes(bits):
    q = TurboQuantMSE(128, bits, seed=1)
    x = torch.randn(3, 7, 128, generator=torch.Generator().manual_seed(2)) * 5
    codes = q.quantize(x)
    packed = q.pack(codes)
    assert packed.codes.shape == (3, 7, int(128 * bits / 8)) and packed.codes.dtype == torch.uint8
    assert packed.norms.dtype == torch.float16
    assert packed.nbytes() == 21 * q.nbytes_per_vector == 21 * (int(128 * bits / 8) + 2)
    torch.testing.assert_close(q.decode(packed), q.dequantize(codes), rtol=0, atol=0)


@pytest.mark.parametrize("bits", ALL_BITS, ids=lambda b: f"b{b}")
def test_mse_distortion_of_one_batch_is_near_the_independent_lloyd_max_value(bits):
    """Against tests/claim_checks.py's own Lloyd-Max computation, not ``q.distortion`` (a codebook
    and its own figure can be wrong together); the quantizer's figure must agree with it too."""
    q = TurboQuantMSE(256, bits)
    x = unit_vectors(2048, 256)
    err = ((q(x) - x) ** 2).sum(-1).mean().item()
    ref = reference_distortion(bits, 256)
    assert err == pytest.approx(ref, rel=0.03), f"D_mse={err:.5f} vs independent Lloyd-Max {ref:.5f}"
    assert q.distortion == pytest.approx(ref, rel=1e-4), f"quantizer's own figure {q.distortion:.5f} vs {ref:.5f}"


@pytest.mark.parametrize("bits", [1, 2, 2.5, 3, 3.5, 4], ids=lambda b: f"b{b}")
def test_prod_pack_unpack_is_lossless(bits):
    q = TurboQuantProd(64, bits, seed=4)
    x = torch.randn(10, 64, generator=torch.Generator().manual_seed(5))
    packed = q.pack(q.quantize(x))
    assert packed.nbytes() == 10 * q.nbytes_per_vector
    torch.testing.assert_close(q.decode(packed), q(x), rtol=0, atol=0)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_scalar_quantizer_round_trip_error_is_below_half_a_step(bits):
    q = ScalarQuantizer(64, bits)
    x = torch.randn(50, 64, generator=torch.Generator().manual_seed(0))
    xh = q.dequantize(q.unpack(q.pack(q.quantize(x))))
    step = (x.amax(-1) - x.amin(-1)) / (2**bits - 1)
    assert bool(((x - xh).abs() <= step.unsqueeze(-1) * 0.5 + 1e-2).all())


@pytest.mark.parametrize("make", [lambda: TurboQuantMSE(64, 3), lambda: TurboQuantProd(64, 3), lambda: ScalarQuantizer(64, 3)],
                         ids=["mse", "prod", "scalar"])
def test_zero_vectors_reconstruct_to_exact_zeros(make):
    q = make()
    out = q(torch.zeros(4, 64))
    assert torch.equal(out, torch.zeros(4, 64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_half_precision_inputs_are_accepted_and_math_runs_in_float32(dtype):
    q = TurboQuantMSE(64, 4)
    x = unit_vectors(256, 64).to(dtype)
    out = q(x)
    assert out.dtype == torch.float32
    assert ((out - x.float()) ** 2).sum(-1).mean() < 0.02


def test_quantizers_are_deterministic_for_a_seed():
    x = unit_vectors(16, 64)
    assert torch.equal(TurboQuantMSE(64, 2, seed=3)(x), TurboQuantMSE(64, 2, seed=3)(x))
    assert torch.equal(TurboQuantProd(64, 2, seed=3)(x), TurboQuantProd(64, 2, seed=3)(x))
    assert not torch.equal(TurboQuantProd(64, 2, seed=3)(x), TurboQuantProd(64, 2, seed=4)(x))


def test_dense_rotation_gives_the_same_distortion_law():
    x = unit_vectors(2048, 96)
    q = TurboQuantMSE(96, 3, rotation="dense")
    err = ((q(x) - x) ** 2).sum(-1).mean().item()
    assert err == pytest.approx(reference_distortion(3, 96), rel=0.03), f"d=96: D_mse={err:.5f}"


# ---- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [0, 5, 2.25, -1, 4.5])
def test_bits_outside_supported_set_name_the_allowed_values(bits):
    with pytest.raises(ValueError, match=r"`bits` must be one of \(1, 1\.5, 2, 2\.5, 3, 3\.5, 4\)"):
        TurboQuantMSE(64, bits)


def test_bits_must_be_a_number():
    with pytest.raises(TypeError, match="`bits` must be a number"):
        TurboQuantMSE(64, "3")


def test_prod_rejects_fractional_widths_below_two():
    with pytest.raises(ValueError, match="TurboQuantProd"):
        TurboQuantProd(64, 1.5)


def test_scalar_quantizer_rejects_fractional_bits():
    with pytest.raises(ValueError, match=r"one of \(1, 2, 3, 4\)"):
        ScalarQuantizer(64, 2.5)


@pytest.mark.parametrize("q", [TurboQuantMSE(64, 2), TurboQuantProd(64, 2), ScalarQuantizer(64, 2)], ids=["mse", "prod", "scalar"])
def test_dimension_mismatch_is_reported(q):
    with pytest.raises(ValueError, match="last dimension 32.*d=64"):
        q.quantize(torch.randn(3, 32))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_inputs_are_rejected(bad):
    x = torch.randn(3, 64)
    x[1, 5] = bad
    with pytest.raises(ValueError, match="NaN/Inf"):
        TurboQuantMSE(64, 2).quantize(x)


def test_empty_input_is_rejected():
    with pytest.raises(ValueError, match="empty"):
        TurboQuantMSE(64, 2).quantize(torch.empty(0, 64))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool])
def test_integer_inputs_are_rejected(dtype):
    with pytest.raises(TypeError, match="floating dtype"):
        TurboQuantMSE(64, 2).quantize(torch.zeros(2, 64, dtype=dtype))


def test_fractional_bits_need_a_multiple_of_16():
    with pytest.raises(ValueError, match="multiple of 16"):
        TurboQuantMSE(24, 2.5, rotation="dense")


def test_norms_beyond_float16_storage_are_rejected():
    with pytest.raises(ValueError, match="float16"):
        TurboQuantMSE(64, 2).quantize(torch.full((1, 64), 1e4))


def test_prod_is_unbiased_for_a_single_pair_over_many_qjl_draws():
    x, y = unit_vectors(1, 64, seed=1), unit_vectors(1, 64, seed=2)
    est = torch.stack([(TurboQuantProd(64, 2, seed=s)(x) @ y.T).squeeze() for s in range(400)])
    true = (x @ y.T).squeeze()
    se = est.std() / math.sqrt(len(est))
    assert abs(est.mean() - true) < 4 * se, f"mean {est.mean():.4f} vs {true:.4f} (se {se:.4f})"
