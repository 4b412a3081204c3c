"""The code format of one (layer, K|V): :class:`CodeLayout`, built once by :func:`build_layout`.

A vector ``x ∈ R^d`` is split into channel groups ``G_1 .. G_m`` of *raw* channels (before any
rotation). Group ``g`` is an independent TurboQuant-mse instance: ``y_g = Π_g (x_g / ||x_g||)``
with its own rotation ``Π_g`` (Hadamard when ``|G_g|`` is a power of two, else dense Haar), its own
Lloyd-Max codebooks at dimension ``|G_g|`` and one float16 norm ``||x_g||``. The rotated coordinates
of a group are cut into segments ``(start, stop, bits)``; each segment is bit-plane packed
(``turboquant.packing``) after the previous one. So a vector costs

    nbytes_per_vector = Σ_g Σ_seg |seg| · bits_seg / 8  +  2 · m   bytes.

* ``halves-3.5`` / ``halves-2.5`` / ``halves-1.5`` (and ``b + 0.5`` bits): one group of all d
  channels, rotated coordinates ``[0, d/2)`` at ``b+1`` bits and ``[d/2, d)`` at ``b`` bits (the
  data-oblivious split; the suite's format before the paper recipe). Integer bits: one segment.
* ``paper-3.5`` = d/4 outlier channels at 4 bits + the rest at 3; ``paper-2.5`` = d/4 at 3 + the
  rest at 2 (paper §4.3: two independent instances, more bits for the outliers). Which channels are
  the outliers is data: per (layer, KV head) the ``n_out`` channels of largest L2 norm over the
  prompt (:func:`select_outliers`); the cache stores those indices (counted apart from the codes).
* ``(n_out, b_hi, b_lo)`` or the name ``outliers-<n_out>-<b_hi>-<b_lo>``: any such split.

Code space: the concatenation of the groups' rotated coordinates (outliers first), the order in
which codes are packed and centroids are looked up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from turboquant.codebook import LAWS, Codebook, lloyd_max_codebook
from turboquant.packing import packed_nbytes
from turboquant.rotation import make_rotation
from turboquant.validation import check_choice

NORM_NBYTES = 2  # one float16 norm a group
HALVES_BITS = (1.5, 2.5, 3.5)
INTEGER_BITS = (1, 2, 3, 4)
PAPER_PRESETS = {"paper-3.5": (4, 3), "paper-2.5": (3, 2)}  # (b_hi, b_lo), n_out = d / 4
LAYOUT_NAMES = (
    "halves-3.5",
    "halves-2.5",
    "halves-1.5",
    *PAPER_PRESETS,
    "outliers-<n_out>-<b_hi>-<b_lo>",
)
GROUP_MULTIPLE = 16  # outlier groups: a multiple of 16 channels (whole bytes a half, kernel tiles)
_GROUP_SEED_STRIDE = 7919  # group g rotates with seed + g · stride (group 0 keeps the layer's seed)


@dataclass(frozen=True)
class Segment:
    """Rotated coordinates ``[start, stop)`` of a group (code space) at ``bits`` bits.

    Packed as ``bits`` planes of ``(stop - start) / 8`` bytes from ``byte_start`` of the row. Its
    codebook is the ``bits``-bit Lloyd-Max one of the coordinate law at the group's dimension
    ``group_dim`` (built on first use and cached process-wide: bytes a vector need no codebook)."""

    start: int
    stop: int
    bits: int
    group_dim: int
    law: str = "beta"
    byte_start: int = 0

    @property
    def codebook(self) -> Codebook:
        return lloyd_max_codebook(self.bits, self.group_dim, self.law)

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def plane_nbytes(self) -> int:
        return self.size // 8

    @property
    def nbytes(self) -> int:
        return packed_nbytes(self.size, self.bits)

    def plane_offset(self, j: int) -> int:
        """Byte offset of bit plane ``j`` in the packed row."""
        return self.byte_start + j * self.plane_nbytes


@dataclass(frozen=True)
class ChannelGroup:
    """One TurboQuant instance: ``size`` raw channels (``channels`` = ``"all"``, ``"outliers"`` or
    ``"rest"``), code-space coordinates ``[start, start + size)``, its rotation, segments and norm slot."""

    channels: str
    start: int
    size: int
    rotation: object = field(compare=False, repr=False)
    segments: tuple[Segment, ...] = ()
    norm_slot: int = 0

    @property
    def byte_start(self) -> int:
        return self.segments[0].byte_start

    @property
    def code_nbytes(self) -> int:
        return sum(s.nbytes for s in self.segments)

    @property
    def bits(self) -> float:
        return sum(s.size * s.bits for s in self.segments) / self.size

    @property
    def distortion(self) -> float:
        """``D_mse`` of the group for unit group vectors: size-weighted mean of its segments'."""
        return sum(s.size * s.codebook.distortion for s in self.segments) / self.size


@dataclass(frozen=True)
class CodeLayout:
    """The code format of one (layer, K|V) tensor; see the module docstring."""

    name: str
    d: int
    groups: tuple[ChannelGroup, ...]
    n_out: int = 0  # outlier channels selected per (layer, head); 0: one group of all channels

    @property
    def segments(self) -> tuple[Segment, ...]:
        """Every segment in packing order (code-space coordinates)."""
        return tuple(s for g in self.groups for s in g.segments)

    @property
    def code_nbytes(self) -> int:
        return sum(g.code_nbytes for g in self.groups)

    @property
    def num_norms(self) -> int:
        return len(self.groups)

    @property
    def norm_nbytes(self) -> int:
        return NORM_NBYTES * self.num_norms

    @property
    def nbytes_per_vector(self) -> int:
        """Codes + float16 norms (outlier indices are per (layer, head): :meth:`index_nbytes`)."""
        return self.code_nbytes + self.norm_nbytes

    @property
    def bits_per_coordinate(self) -> float:
        """``8 · nbytes_per_vector / d``: what a vector holds, norms included."""
        return 8 * self.nbytes_per_vector / self.d

    @property
    def code_bits(self) -> float:
        """Bits a coordinate in the codes alone (the paper's 2.25 for ``paper-2.5``)."""
        return 8 * self.code_nbytes / self.d

    @property
    def index_dtype(self) -> torch.dtype:
        return torch.uint8 if self.d <= 256 else torch.int16

    def index_nbytes(self) -> int:
        """Bytes of the stored outlier channel indices of one (layer, head)."""
        return self.n_out * self.index_dtype.itemsize

    @property
    def is_grouped(self) -> bool:
        return len(self.groups) > 1

    @property
    def distortion(self) -> float:
        """Expected ``D_mse`` when every group holds an equal share of the energy per channel."""
        return sum(g.size * g.distortion for g in self.groups) / self.d

    def describe(self) -> str:
        parts = [
            f"{g.channels}:{g.size}@" + "+".join(f"{s.size}x{s.bits}" for s in g.segments)
            for g in self.groups
        ]
        return f"{self.name} ({', '.join(parts)}; {self.bits_per_coordinate:.4g} bits/coord with norms)"


# ------------------------------------------------------------------------------------------------
# construction
# ------------------------------------------------------------------------------------------------
def _bits_specs(bits: float, size: int) -> list[tuple[int, int, int]]:
    """Rotated-coordinate segments of one group: integer bits one segment, ``b + 0.5`` two halves."""
    whole = math.floor(bits)
    if bits == whole:
        return [(0, size, int(whole))]
    half = size // 2
    return [(0, half, whole + 1), (half, size, whole)]


def _group(
    channels: str,
    start: int,
    size: int,
    bits: float,
    rotation: str,
    seed: int,
    law: str,
    byte_start: int,
    slot: int,
    shared_seed: int | None = None,
) -> ChannelGroup:
    check_choice(law, "law", LAWS)  # the codebooks are built on first use: refuse a bad law here
    segs, offset = [], byte_start
    for a, b, nb in _bits_specs(bits, size):
        segs.append(Segment(start + a, start + b, nb, size, law, offset))
        offset += packed_nbytes(b - a, nb)
    if rotation == "dense" and shared_seed is not None:
        rot = shared_dense_rotation(size, shared_seed)
    else:
        rot = make_rotation(rotation, size, seed)
    return ChannelGroup(channels, start, size, rot, tuple(segs), slot)


SHARED_DENSE: dict = {}  # (size, seed) -> DenseRotation, one per process (like the QJL matrix S)


def shared_dense_rotation(size: int, seed: int):
    """The dense Haar rotation of a ``size``-channel group shared by every layer of a cache."""
    key = (size, seed)
    if key not in SHARED_DENSE:
        SHARED_DENSE[key] = make_rotation("dense", size, seed)
    return SHARED_DENSE[key]


def parse_layout(spec: object, name: str = "layout") -> str | float | tuple[int, int, int]:
    """Normalise a layout spec: a name (``LAYOUT_NAMES``), bits (``1 ... 4``, halves included) or
    ``(n_out, b_hi, b_lo)``. Raises ``ValueError`` listing the valid names."""
    if isinstance(spec, bool):
        raise TypeError(
            f"`{name}` must be a layout name {LAYOUT_NAMES}, bits or (n_out, b_hi, b_lo), got {spec!r}"
        )
    if isinstance(spec, (int, float)):
        if float(spec) not in (*INTEGER_BITS, *HALVES_BITS):
            raise ValueError(
                f"`{name}` bits must be one of {sorted((*INTEGER_BITS, *HALVES_BITS))}, got {spec!r}"
            )
        return float(spec)
    if isinstance(spec, (tuple, list)):
        if len(spec) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in spec):
            raise ValueError(
                f"`{name}` as a tuple must be (n_out, b_hi, b_lo) of ints, got {spec!r}"
            )
        if spec[0] % GROUP_MULTIPLE or spec[0] <= 0:
            raise ValueError(
                f"`n_out`={spec[0]} of `{name}` must be a positive multiple of {GROUP_MULTIPLE} below d"
            )
        for label, b in (("b_hi", spec[1]), ("b_lo", spec[2])):
            if b not in INTEGER_BITS:
                raise ValueError(f"`{name}` {label}={b} must be one of {INTEGER_BITS}")
        return tuple(spec)
    if isinstance(spec, str):
        if spec in PAPER_PRESETS:
            return spec
        if spec.startswith("halves-") and spec[len("halves-") :] in {str(b) for b in HALVES_BITS}:
            return float(spec[len("halves-") :])
        if spec.startswith("outliers-"):
            try:
                n, hi, lo = (int(p) for p in spec[len("outliers-") :].split("-"))
            except ValueError:
                raise ValueError(
                    f"`{name}`={spec!r}: expected outliers-<n_out>-<b_hi>-<b_lo>, e.g. outliers-32-4-3"
                ) from None
            return parse_layout((n, hi, lo), name)
        if spec.startswith("int-") and spec[4:] in {str(b) for b in INTEGER_BITS}:
            return float(spec[4:])
    raise ValueError(
        f"unknown `{name}` {spec!r}: valid layouts are {LAYOUT_NAMES}, 'int-<1..4>', or bits (1 ... 4)"
    )


def layout_name(spec: object) -> str:
    """Canonical name of a layout spec (``halves-3.5``, ``int-3``, ``paper-2.5``, ``outliers-32-4-3``)."""
    p = parse_layout(spec)
    if isinstance(p, str):
        return p
    if isinstance(p, tuple):
        return "outliers-{}-{}-{}".format(*p)
    return f"int-{int(p)}" if p == int(p) else f"halves-{p}"


def build_layout(
    spec: object,
    d: int,
    *,
    rotation: str = "hadamard",
    seed: int = 0,
    law: str = "beta",
    shared_seed: int | None = None,
) -> CodeLayout:
    """The one constructor of a :class:`CodeLayout` for head dim ``d`` from a name, bits or
    ``(n_out, b_hi, b_lo)``. One group: ``rotation`` as given; outlier groups: Hadamard where the
    group size is a power of two (and ``rotation='hadamard'``), else dense Haar. ``shared_seed``:
    an outlier group's dense rotation is the process-wide one of ``(size, shared_seed)`` (the
    cache shares it across layers: d_g² floats once instead of per layer and tensor), else
    seeded per group from ``seed``."""
    p = parse_layout(spec)
    if not isinstance(d, int) or isinstance(d, bool) or d < 8:
        raise ValueError(f"`d` must be an int >= 8, got {d!r}")
    if isinstance(p, float):
        if d % (16 if p != int(p) else 8):
            raise ValueError(
                f"layout {layout_name(p)!r} needs d to be a multiple of {16 if p != int(p) else 8}, got d={d}"
            )
        return CodeLayout(layout_name(p), d, (_group("all", 0, d, p, rotation, seed, law, 0, 0),))
    if isinstance(p, str):
        hi, lo = PAPER_PRESETS[p]
        n_out, name = d // 4, p
    else:
        n_out, hi, lo = p
        name = layout_name(p)
    if n_out % GROUP_MULTIPLE or not 0 < n_out < d:
        raise ValueError(
            f"`n_out`={n_out} of layout {name!r} must be a multiple of {GROUP_MULTIPLE} in (0, d={d})"
        )
    rest = d - n_out
    if rest % 8:
        raise ValueError(
            f"layout {name!r}: the regular group of d - n_out = {rest} channels must be a multiple of 8"
        )

    def kind(n: int) -> str:
        return "hadamard" if rotation == "hadamard" and n & (n - 1) == 0 else "dense"

    g0 = _group("outliers", 0, n_out, float(hi), kind(n_out), seed, law, 0, 0, shared_seed)
    g1 = _group(
        "rest",
        n_out,
        rest,
        float(lo),
        kind(rest),
        seed + _GROUP_SEED_STRIDE,
        law,
        g0.code_nbytes,
        1,
        None if shared_seed is None else shared_seed + _GROUP_SEED_STRIDE,
    )
    return CodeLayout(name, d, (g0, g1), n_out=n_out)


def group_layout(layout: CodeLayout, g: int) -> CodeLayout:
    """Group ``g`` of ``layout`` as a one-group layout of its own (coordinates and bytes from 0)."""
    group = layout.groups[g]
    segs = tuple(
        Segment(
            s.start - group.start,
            s.stop - group.start,
            s.bits,
            s.group_dim,
            s.law,
            s.byte_start - group.byte_start,
        )
        for s in group.segments
    )
    local = ChannelGroup("all", 0, group.size, group.rotation, segs, 0)
    return CodeLayout(f"{layout.name}[{group.channels}]", group.size, (local,))


# ------------------------------------------------------------------------------------------------
# outlier selection (paper §4.3, QJL's rule)
# ------------------------------------------------------------------------------------------------
def select_outliers(x: torch.Tensor, n_out: int, head_dim: int = -3) -> torch.Tensor:
    """Per head: the ``n_out`` raw channels of largest L2 norm over all of that head's vectors.

    ``x`` [B, H, T, D] (``head_dim`` names the head axis, default -3) -> long [H, n_out], ascending
    channel order. Ties go to the lower channel (a stable sort), so the choice is deterministic."""
    xf = x.float().movedim(head_dim, 0)
    energy = xf.pow(2).reshape(xf.shape[0], -1, xf.shape[-1]).sum(1)  # [H, D]
    order = torch.sort(energy, dim=-1, descending=True, stable=True).indices[:, :n_out]
    return torch.sort(order, dim=-1).values


def channel_permutation(outliers: torch.Tensor, d: int) -> torch.Tensor:
    """long [..., d]: the outlier channels (ascending) then the remaining ones (ascending);
    ``x[..., perm]`` is ``x`` in code-space channel order."""
    lead = outliers.shape[:-1]
    mask = torch.zeros(*lead, d, dtype=torch.bool, device=outliers.device)
    mask.scatter_(-1, outliers.long(), True)
    ar = torch.arange(d, device=outliers.device).expand(*lead, d)
    # outliers get keys in [0, d), the rest in [d, 2d): one stable sort keeps each set ascending
    key = torch.where(mask, ar, ar + d)
    return torch.sort(key, dim=-1, stable=True).indices


__all__ = [
    "LAYOUT_NAMES",
    "PAPER_PRESETS",
    "ChannelGroup",
    "CodeLayout",
    "Segment",
    "build_layout",
    "channel_permutation",
    "group_layout",
    "layout_name",
    "parse_layout",
    "select_outliers",
]
