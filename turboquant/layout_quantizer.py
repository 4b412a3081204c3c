"""TurboQuant over any :class:`~turboquant.layout.CodeLayout`: one independent mse instance a group.

For outlier channels ``O`` (per head) and the rest ``R`` (paper §4.3):
``x̃_O = ||x_O|| Π_O^T c_O[idx_O]``, ``x̃_R = ||x_R|| Π_R^T c_R[idx_R]``, each group with its own
rotation, codebook at its own dimension and float16 norm; then scattered back to the raw channels.
So ``E||x - x̃||² = D_O ||x_O||² + D_R ||x_R||²``: more bits where the energy is.
A one-group layout (halves / integer bits) is exactly :class:`~turboquant.quantizer.TurboQuantMSE`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from turboquant.layout import (
    CodeLayout,
    build_layout,
    channel_permutation,
    group_layout,
    select_outliers,
)
from turboquant.quantizer import NORM_DTYPE, TurboQuantMSE, _round_norms
from turboquant.validation import check_float_tensor


@dataclass
class LayoutQuantized:
    """``idx`` uint8 [..., d] (code space), ``norms`` float32 [..., groups], ``outliers`` long
    [..., n_out] (broadcastable to the leading dims; ``None`` for one-group layouts)."""

    idx: torch.Tensor
    norms: torch.Tensor
    outliers: torch.Tensor | None


@dataclass
class PackedLayout:
    """Stored form: ``codes`` uint8 [..., code_nbytes], ``norms`` float16 [..., groups], and the
    outlier channel indices (``layout.index_dtype``) held once per head."""

    codes: torch.Tensor
    norms: torch.Tensor
    outliers: torch.Tensor | None

    def nbytes(self) -> int:
        n = (
            self.codes.numel() * self.codes.element_size()
            + self.norms.numel() * self.norms.element_size()
        )
        return n + (
            0 if self.outliers is None else self.outliers.numel() * self.outliers.element_size()
        )


class TurboQuantLayout:
    """Quantize ``x`` [..., d] with a code layout (see the module docstring).

    Args:
        layout: a :class:`CodeLayout`, or a spec for :func:`build_layout` together with ``d``.
        d, rotation, seed, law: passed to :func:`build_layout` when ``layout`` is a spec.
    """

    def __init__(
        self,
        layout: CodeLayout | object,
        d: int | None = None,
        rotation: str = "hadamard",
        seed: int = 0,
        law: str = "beta",
    ) -> None:
        if not isinstance(layout, CodeLayout):
            if d is None:
                raise ValueError("`d` is needed when `layout` is a spec, not a CodeLayout")
            layout = build_layout(layout, d, rotation=rotation, seed=seed, law=law)
        self.layout = layout
        self.d = layout.d
        self.groups = [
            TurboQuantMSE.from_layout(group_layout(layout, g), law, seed)
            for g in range(len(layout.groups))
        ]

    @property
    def nbytes_per_vector(self) -> int:
        return self.layout.nbytes_per_vector

    @property
    def distortion(self) -> float:
        return self.layout.distortion

    # -- channel order -----------------------------------------------------------------------------
    def select(self, x: torch.Tensor) -> torch.Tensor | None:
        """Outlier channels of ``x`` [..., d] pooled over every vector: long [n_out] (None: one group)."""
        if not self.layout.is_grouped:
            return None
        return select_outliers(x.reshape(1, -1, self.d), self.layout.n_out, head_dim=0)[0]

    def _perm(self, outliers: torch.Tensor | None, lead: torch.Size) -> torch.Tensor | None:
        if outliers is None:
            return None
        return channel_permutation(outliers, self.d).expand(*lead, self.d)

    def to_code_order(self, x: torch.Tensor, outliers: torch.Tensor | None) -> torch.Tensor:
        perm = self._perm(outliers, x.shape[:-1])
        return x if perm is None else torch.gather(x, -1, perm)

    def from_code_order(self, y: torch.Tensor, outliers: torch.Tensor | None) -> torch.Tensor:
        perm = self._perm(outliers, y.shape[:-1])
        return y if perm is None else torch.empty_like(y).scatter_(-1, perm, y)

    def _split(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x[..., g.start : g.start + g.size] for g in self.layout.groups]

    def rotate(self, x: torch.Tensor, outliers: torch.Tensor | None) -> torch.Tensor:
        """Code-space ``[Π_O x_O, Π_R x_R]`` of ``x`` [..., d] (e.g. the query, scored against codes)."""
        parts = self._split(self.to_code_order(x.float(), outliers))
        return torch.cat([q.rotation.apply(p) for q, p in zip(self.groups, parts)], dim=-1)

    def unrotate(self, y: torch.Tensor, outliers: torch.Tensor | None) -> torch.Tensor:
        """Inverse of :meth:`rotate`: per group ``Π_g^T``, then back to the raw channels."""
        parts = self._split(y.float())
        x = torch.cat([q.rotation.invert(p) for q, p in zip(self.groups, parts)], dim=-1)
        return self.from_code_order(x, outliers)

    # -- quantize / dequantize --------------------------------------------------------------------
    def quantize(self, x: torch.Tensor, outliers: torch.Tensor | None = None) -> LayoutQuantized:
        """``x`` [..., d] -> codes. ``outliers``: long [..., n_out] broadcastable to ``x``'s leading
        dims; ``None`` selects them from ``x`` itself (:meth:`select`)."""
        check_float_tensor(x, "x", self.d)
        if self.layout.is_grouped and outliers is None:
            outliers = self.select(x)
        if self.layout.is_grouped and outliers.shape[-1] != self.layout.n_out:
            raise ValueError(
                f"`outliers` has {outliers.shape[-1]} channels a head, layout {self.layout.name!r} "
                f"needs n_out={self.layout.n_out}"
            )
        parts = self._split(self.to_code_order(x.float(), outliers))
        qs = [q.quantize(p) for q, p in zip(self.groups, parts)]
        idx = torch.cat([q.idx for q in qs], dim=-1)
        norms = torch.stack([q.norms for q in qs], dim=-1)
        return LayoutQuantized(idx, _round_norms(norms, "group norm"), outliers)

    def dequantize_code_order(self, q: LayoutQuantized) -> torch.Tensor:
        """``[||x_g|| c_g[idx_g]]_g`` in code space (the rotated reconstruction)."""
        parts = [
            grp.centroid_values(q.idx[..., g.start : g.start + g.size]) * q.norms[..., i : i + 1]
            for i, (grp, g) in enumerate(zip(self.groups, self.layout.groups))
        ]
        return torch.cat(parts, dim=-1)

    def dequantize(self, q: LayoutQuantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.unrotate(self.dequantize_code_order(q), q.outliers).to(dtype)

    def __call__(self, x: torch.Tensor, outliers: torch.Tensor | None = None) -> torch.Tensor:
        return self.dequantize(self.quantize(x, outliers))

    # -- storage ------------------------------------------------------------------------------------
    def pack(self, q: LayoutQuantized) -> PackedLayout:
        from turboquant.packing import pack_bits

        codes = torch.cat(
            [pack_bits(q.idx[..., s.start : s.stop], s.bits) for s in self.layout.segments], dim=-1
        )
        out = None if q.outliers is None else q.outliers.to(self.layout.index_dtype)
        return PackedLayout(codes, q.norms.to(NORM_DTYPE), out)

    def unpack(self, p: PackedLayout) -> LayoutQuantized:
        from turboquant.packing import unpack_bits

        if p.codes.shape[-1] != self.layout.code_nbytes:
            raise ValueError(
                f"packed codes have {p.codes.shape[-1]} bytes a vector, layout {self.layout.name!r} "
                f"has {self.layout.code_nbytes}"
            )
        idx = torch.cat(
            [
                unpack_bits(p.codes[..., s.byte_start : s.byte_start + s.nbytes], s.bits, s.size)
                for s in self.layout.segments
            ],
            dim=-1,
        )
        out = None if p.outliers is None else p.outliers.long()
        return LayoutQuantized(idx, p.norms.float(), out)


__all__ = ["LayoutQuantized", "PackedLayout", "TurboQuantLayout"]
