"""Random rotations Π used by TurboQuant: signed Hadamard (fast) and dense Haar (QR).

After ``y = Π x / ||x||`` every coordinate of ``y`` follows the marginal of a uniformly random point
on the sphere S^{d-1} (exactly for the Haar rotation; approximately, for dense inputs, for the
signed Hadamard), which is what lets one scalar codebook serve every coordinate.
"""

from __future__ import annotations

import functools
import math

import torch

from turboquant.validation import check_power_of_two

_SYLVESTER: dict = {}


def _sylvester(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The n x n Sylvester Hadamard matrix H_n (entries ±1), cached per device and dtype."""
    key = (n, device, dtype)
    if key not in _SYLVESTER:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < n:
            h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
        _SYLVESTER[key] = h.to(device=device, dtype=dtype)
    return _SYLVESTER[key]


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform along the last dim: ``x H_d`` (Sylvester order).

    For d <= 512 one GEMM with the cached ±1 matrix (BLAS beats butterflies at these sizes on
    CPU); beyond, ``H_d = H_a ⊗ H_b``: with x viewed as an [a, b] matrix X, ``x H_d = H_a X H_b``,
    O(d (a + b)). The Triton kernels use true O(d log d) butterflies. ``fwht(fwht(x)) = d · x``.
    """
    d = x.shape[-1]
    check_power_of_two(d, "x.shape[-1]")
    if d <= 512:
        return torch.matmul(x, _sylvester(d, x.device, x.dtype))
    k = d.bit_length() - 1
    a, b = 2 ** ((k + 1) // 2), 2 ** (k // 2)
    y = torch.matmul(x.reshape(-1, b), _sylvester(b, x.device, x.dtype)).reshape(-1, a, b)
    y = torch.matmul(_sylvester(a, x.device, x.dtype), y)
    return y.reshape(x.shape)


class HadamardRotation:
    """``Π = H_d diag(s) / sqrt(d)`` with random signs ``s ∈ {±1}^d`` (seeded): orthogonal, O(d log d)."""

    kind = "hadamard"

    def __init__(self, d: int, seed: int = 0) -> None:
        self.d = check_power_of_two(d)
        self.seed = int(seed)
        gen = torch.Generator().manual_seed(self.seed)
        self.signs = torch.randint(0, 2, (d,), generator=gen).to(torch.float32) * 2 - 1
        self._scale = 1.0 / math.sqrt(d)
        self._cache: dict = {}

    def _signs_on(self, ref: torch.Tensor) -> torch.Tensor:
        key = (ref.device, ref.dtype)
        if key not in self._cache:
            self._cache[key] = self.signs.to(device=ref.device, dtype=ref.dtype)
        return self._cache[key]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``y = Π x`` along the last dim."""
        return fwht(x * self._signs_on(x)) * self._scale

    def invert(self, y: torch.Tensor) -> torch.Tensor:
        """``x = Π^T y`` along the last dim."""
        return fwht(y) * self._scale * self._signs_on(y)

    def matrix(self) -> torch.Tensor:
        """Π as a dense [d, d] float32 matrix (row i = image basis)."""
        return self.apply(torch.eye(self.d)).T.contiguous()


class DenseRotation:
    """Haar-random ``Π = Q`` from ``Q, R = qr(G)``, ``G ~ N(0, 1)^{d×d}``, columns sign-fixed by sign(diag R)."""

    kind = "dense"

    def __init__(self, d: int, seed: int = 0) -> None:
        if not isinstance(d, int) or d < 1:
            raise ValueError(f"`d` must be a positive int, got {d!r}")
        self.d = d
        self.seed = int(seed)
        self._cache: dict = {}

    @functools.cached_property
    def _q(self) -> torch.Tensor:
        """Q, drawn on first use (a layout built only for its byte counts never draws it)."""
        gen = torch.Generator().manual_seed(self.seed)
        g = torch.randn(self.d, self.d, generator=gen, dtype=torch.float64)
        q, r = torch.linalg.qr(g)
        return (q * torch.sign(torch.diagonal(r)).unsqueeze(0)).to(torch.float32)

    def _q_on(self, ref: torch.Tensor) -> torch.Tensor:
        key = (ref.device, ref.dtype)
        if key not in self._cache:
            self._cache[key] = self._q.to(device=ref.device, dtype=ref.dtype)
        return self._cache[key]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``y = Π x`` along the last dim (``x @ Q^T``)."""
        return x @ self._q_on(x).T

    def invert(self, y: torch.Tensor) -> torch.Tensor:
        """``x = Π^T y`` along the last dim (``y @ Q``)."""
        return y @ self._q_on(y)

    def matrix(self) -> torch.Tensor:
        return self._q.clone()


ROTATIONS = {"hadamard": HadamardRotation, "dense": DenseRotation}


def make_rotation(kind: str, d: int, seed: int = 0) -> HadamardRotation | DenseRotation:
    """Build a rotation by name: ``'hadamard'`` (d a power of two) or ``'dense'`` (any d)."""
    if kind not in ROTATIONS:
        raise ValueError(f"`rotation` must be one of {sorted(ROTATIONS)}, got {kind!r}")
    return ROTATIONS[kind](d, seed)
