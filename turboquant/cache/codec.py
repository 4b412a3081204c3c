"""One tensor's quantizer (a layer's K or V) in the form the stores and the attention read."""

from __future__ import annotations

import math

import torch

from turboquant.attention import CentroidTable
from turboquant.layout import CodeLayout, build_layout, group_layout, layout_name, parse_layout
from turboquant.layout_quantizer import TurboQuantLayout
from turboquant.quantizer import TurboQuantMSE, TurboQuantProd
from turboquant.rotation import fwht

_SHARED_S: dict = {}


def _shared_qjl_matrix(d: int, seed: int, device: torch.device) -> torch.Tensor:
    key = (d, seed, str(device))
    if key not in _SHARED_S:
        gen = torch.Generator().manual_seed(seed + 1_000_003)
        _SHARED_S[key] = torch.randn(d, d, generator=gen, dtype=torch.float32).to(device)
    return _SHARED_S[key]


_SHARED_H: dict = {}


def _shared_hadamard(d: int, device: torch.device) -> torch.Tensor:
    """Sylvester ``H_d / sqrt(d)`` (symmetric), shared by every layer: ``Π = H diag(s) / sqrt(d)``."""
    key = (d, str(device))
    if key not in _SHARED_H:
        h = fwht(torch.eye(d, dtype=torch.float32)) / math.sqrt(d)
        _SHARED_H[key] = h.to(device).contiguous()
    return _SHARED_H[key]


class TensorCodec:
    """TurboQuant quantizer of one (layer, K|V) plus its centroid table and rotation on ``device``.

    ``layout``: a spec for :func:`turboquant.layout.build_layout` (default: ``bits``). An outlier
    layout (two channel groups) runs :class:`TurboQuantLayout`: ``rotate``/``unrotate``/``encode``
    then take the store's per-head outlier channels."""

    def __init__(self, d: int, bits: float, mode: str, rotation: str, seed: int, qjl_seed: int, law: str,
                 device: torch.device, layout: object = None) -> None:
        self.d, self.bits, self.mode = d, float(bits), mode
        self.grouped = False
        if layout is not None and not isinstance(parse_layout(layout), float):
            if mode != "mse":
                raise ValueError(f"layout {layout_name(layout)!r} needs mode 'mse', got {mode!r}")
            self.grouped = True
            # dense group rotations: one per cache seed, shared by every layer (shared_tables)
            self.quantizer = TurboQuantLayout(
                build_layout(layout, d, rotation=rotation, seed=seed, law=law, shared_seed=qjl_seed), law=law)
            self.mse = self.quantizer
            self.layout: CodeLayout = self.quantizer.layout
            self.S, self.qjl_scale = None, 0.0
            segs = [(sg.start, sg.stop, sg.bits, sg.codebook) for sg in self.layout.segments]
            self.table = CentroidTable.shared(d, segs, device)
            # per group: code-space coords [a, b), norm slot, code bytes [b0, b1), a table at the
            # group's own dimension (what the CPU C kernel scores one group at a time with)
            self.group_tables = []
            for i, g in enumerate(self.layout.groups):
                local = [(sg.start, sg.stop, sg.bits, sg.codebook) for sg in group_layout(self.layout, i).segments]
                self.group_tables.append((g.start, g.start + g.size, g.norm_slot, g.byte_start,
                                          g.byte_start + g.code_nbytes, CentroidTable.shared(g.size, local, device)))
            self.rotation = None
            self.code_nbytes = self.layout.code_nbytes
            self._signs = self._h = self._pi = self._pi_t = None
            # what the groups' rotations hold: Hadamard signs s, or the dense Π (turboquant.rotation)
            self._group_rot = [g.rotation.signs if g.rotation.kind == "hadamard" else g.rotation._q
                               for g in self.layout.groups]
            return
        if mode == "prod":
            self.quantizer: TurboQuantMSE | TurboQuantProd = TurboQuantProd(d, bits, rotation, seed, law, qjl_seed=qjl_seed)
            # one S per cache: identical values for every layer, stored once (C04: the bias of one fixed S)
            self.quantizer.S = _shared_qjl_matrix(d, qjl_seed, torch.device("cpu"))
            self.quantizer._s_cache = {}
            self.mse = self.quantizer.mse
            self.S = _shared_qjl_matrix(d, qjl_seed, device)
            self.qjl_scale = self.quantizer.qjl_scale
        else:
            self.quantizer = TurboQuantMSE(d, bits, rotation, seed, law)
            self.mse = self.quantizer
            self.S = None
            self.qjl_scale = 0.0
        self.layout = self.mse.layout if self.mse is not None else None
        self.table = CentroidTable.shared(d, self.mse.segments, device) if self.mse is not None else None
        self.rotation = self.mse.rotation if self.mse is not None else None
        self.code_nbytes = self.mse.code_nbytes if self.mse is not None else 0
        self._signs = self._h = self._pi = self._pi_t = None
        if self.rotation is not None and self.rotation.kind == "hadamard":
            self._signs = self.rotation.signs.to(device)
            self._h = _shared_hadamard(d, device)
        elif self.rotation is not None:
            self._pi = self.rotation.matrix().to(device).contiguous()  # Π, [d, d]
            self._pi_t = self._pi.T.contiguous()

    @property
    def nbytes_per_vector(self) -> int:
        """Ideal stored bytes a vector: packed codes + float16 norm(s) (+ QJL plane)."""
        return self.quantizer.nbytes_per_vector

    def rotate(self, x: torch.Tensor, outliers: torch.Tensor | None = None) -> torch.Tensor:
        """``Π x``; Hadamard: ``(x ⊙ s) H / sqrt(d)`` (one small matmul with the shared ``H``).
        Outlier layouts: ``x`` [B, H, M, D] gathered into code order (``outliers`` [H, n_out]) and
        rotated per group."""
        if self.grouped:
            return self.quantizer.rotate(x, per_head(outliers))
        if self._signs is None:
            return torch.matmul(x, self._pi_t)
        return torch.matmul(x * self._signs, self._h)

    def unrotate(self, y: torch.Tensor, outliers: torch.Tensor | None = None) -> torch.Tensor:
        """``Π^T y``; Hadamard: ``s ⊙ (y H / sqrt(d))``. Outlier layouts: per group, then
        scattered back to the raw channels."""
        if self.grouped:
            return self.quantizer.unrotate(y, per_head(outliers))
        if self._signs is None:
            return torch.matmul(y, self._pi)
        return torch.matmul(y, self._h) * self._signs

    def scale_norms(self, cents: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """``||x|| c[idx]`` (code space) from centroids [..., n, D] and stored norms [..., n]
        (outlier layouts: [..., n, groups], each group's coordinates times its own norm)."""
        if not self.grouped:
            return cents * norms.float().unsqueeze(-1)
        sizes = [g.size for g in self.layout.groups]
        return cents * torch.repeat_interleave(norms.float(), torch.tensor(sizes, device=norms.device), dim=-1)

    def group_slices(self) -> list[tuple[int, int, int]]:
        """``(start, stop, norm slot)`` of every group in code space."""
        if not self.grouped:
            return [(0, self.d, -1)]
        return [(g.start, g.start + g.size, g.norm_slot) for g in self.layout.groups]

    def encode(self, x: torch.Tensor, outliers: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """``x`` [..., d] -> (codes, norms, qjl, rnorms) as stored (``None`` where the mode has none)."""
        if self.grouped:
            packed = self.quantizer.pack(self.quantizer.quantize(x, per_head(outliers)))
            return packed.codes, packed.norms, None, None
        packed = self.quantizer.pack(self.quantizer.quantize(x))
        if self.mode == "mse":
            return packed.codes, packed.norms, None, None
        mse = packed.mse
        return (mse.codes if mse else None), (mse.norms if mse else None), packed.qjl, packed.rnorms


def per_head(outliers: torch.Tensor | None) -> torch.Tensor | None:
    """Outlier channels [H, n_out] -> [H, 1, n_out]: broadcast over a store's [B, H, T, D]."""
    return None if outliers is None else outliers.long().unsqueeze(-2)


def codec_seed(seed: int, layer_idx: int, kind: str) -> int:
    return (seed * 100_003 + layer_idx) * 2 + (0 if kind == "k" else 1)
