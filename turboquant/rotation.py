"""Random rotations Π used by TurboQuant: signed Hadamard (fast) and dense Haar (QR).

After ``y = Π x / ||x||`` every coordinate of ``y`` follows the marginal of a uniformly random point
on the sphere S^{d-1} (exactly for the Haar rotation; approximately, for dense inputs, for the
signed Hadamard), which is what lets one scalar codebook serve every coordinate.
"""

from __future__ import annotations

import math

import torch

from turboquant.validation import check_power_of_two


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh-Hadamard transform along the last dim: ``x H_d`` (Sylvester order).

    O(d log d) butterflies; ``fwht(fwht(x)) = d · x``. The last dim must be a power of two.
    """
    d = x.shape[-1]
    check_power_of_two(d, "x.shape[-1]")
    lead = x.shape[:-1]
    y = x.reshape(-1, d)
    h = 1
    while h < d:
        y = y.view(-1, d // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(*lead, d)


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
        gen = torch.Generator().manual_seed(self.seed)
        g = torch.randn(d, d, generator=gen, dtype=torch.float64)
        q, r = torch.linalg.qr(g)
        q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
        self._q = q.to(torch.float32)
        self._cache: dict = {}

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
