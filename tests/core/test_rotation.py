"""Unit tests of the rotations Π: orthogonal, exact inverse, seeded, O(d log d) FWHT = dense H_d."""

import pytest
import torch
from scipy.linalg import hadamard

from turboquant.rotation import DenseRotation, HadamardRotation, fwht, make_rotation

pytestmark = pytest.mark.synthetic
DIMS = [8, 64, 256]


@pytest.mark.parametrize("d", DIMS, ids=lambda d: f"d{d}")
def test_fwht_equals_sylvester_hadamard_matrix(d):
    x = torch.randn(5, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h = torch.from_numpy(hadamard(d)).to(torch.float64)
    torch.testing.assert_close(fwht(x), x @ h)


@pytest.mark.parametrize("kind", ["hadamard", "dense"])
@pytest.mark.parametrize("d", DIMS, ids=lambda d: f"d{d}")
def test_rotation_is_orthogonal_with_exact_inverse(kind, d):
    rot = make_rotation(kind, d, seed=3)
    m = rot.matrix()
    torch.testing.assert_close(m @ m.T, torch.eye(d), atol=1e-5, rtol=0)
    x = torch.randn(2, 3, d, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(rot.invert(rot.apply(x)), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(rot.apply(x), x @ m.T, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls", [HadamardRotation, DenseRotation])
def test_rotation_is_deterministic_for_a_seed_and_differs_across_seeds(cls):
    a, b, c = cls(64, seed=7), cls(64, seed=7), cls(64, seed=8)
    assert torch.equal(a.matrix(), b.matrix())
    assert not torch.equal(a.matrix(), c.matrix())


def test_hadamard_refuses_non_power_of_two_with_a_clear_error():
    with pytest.raises(ValueError, match="power of two.*rotation='dense'"):
        HadamardRotation(96)


def test_unknown_rotation_name_lists_the_allowed_ones():
    with pytest.raises(ValueError, match=r"\['dense', 'hadamard'\]"):
        make_rotation("givens", 64)


def test_dense_rotation_supports_any_dimension():
    rot = DenseRotation(96, seed=0)
    x = torch.randn(4, 96)
    torch.testing.assert_close(rot.invert(rot.apply(x)), x, atol=1e-5, rtol=0)


def test_fwht_large_dimension_uses_the_kronecker_path_correctly():
    d = 2048
    x = torch.randn(3, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(fwht(x), x @ torch.from_numpy(hadamard(d)).to(torch.float64))
