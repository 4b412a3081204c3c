"""Shared pieces of the Triton kernels: per-quantizer lookup tables and the in-register FWHT.

The kernels read exactly what :class:`turboquant.quantizer.TurboQuantMSE` packs (bit-plane layout,
``docs/ARCHITECTURE.md``). Every code row is viewed as two *segments* of ``d/2`` coordinates:

* integer bits ``b``: one quantizer segment ``[0, d)`` of ``b`` planes of ``d/8`` bytes; kernel
  segment A = bytes ``[0, d/16)`` of every plane, B = bytes ``[d/16, d/8)`` (plane stride ``d/8``);
* fractional bits ``b + 0.5``: A = the ``b+1``-bit segment (planes of ``d/16`` bytes at offset 0),
  B = the ``b``-bit segment (planes of ``d/16`` bytes after A).

So one kernel handles every supported width with two (bits, base, stride) triples, read from the
:class:`~turboquant.layout.CodeLayout` by :meth:`KernelTables.from_layout`. Every other layout the
kernels run (outlier channel groups, dense rotations) goes through :mod:`turboquant.kernels.codespace`
(its tables are what ``from_layout`` returns for those layouts): decode on the word decoder cut into
power-of-two pieces (:mod:`turboquant.kernels.segmented`) where rows are whole 32-bit words, else
the byte-column kernel.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass

import torch

try:  # import must never fail on a CPU-only machine without Triton
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    HAS_TRITON = False

SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_KERNEL_BITS = (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)
LOG2E = 1.4426950408889634


def on_input_device(fn):
    """Run ``fn(x, ...)`` with ``x``'s CUDA device current. The kernels launch on the *current*
    device (Triton's launcher, ``cuLaunchKernel`` into the current context), so a layer that
    accelerate's ``device_map`` put on another GPU would otherwise launch on the wrong one (a CUDA
    error at best). A no-op where ``x`` is on the current device or not on CUDA."""

    first = next(iter(inspect.signature(fn).parameters))

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        dev = getattr(args[0] if args else kwargs.get(first), "device", None)
        if dev is not None and dev.type == "cuda" and dev.index is not None and dev.index != torch.cuda.current_device():
            with torch.cuda.device(dev):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper


def check_head_dim(d: int) -> int:
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"`head_dim` for the Triton kernels must be one of {SUPPORTED_HEAD_DIMS}, got {d!r}")
    return d


def check_kernel_bits(bits: float) -> float:
    if float(bits) not in SUPPORTED_KERNEL_BITS:
        raise ValueError(f"`bits` for the Triton kernels must be one of {SUPPORTED_KERNEL_BITS}, got {bits!r}")
    return float(bits)


@dataclass
class KernelTables:
    """Device-resident tables of one TurboQuant-mse quantizer, in the form the kernels read.

    Attributes:
        d, bits: head dim and bit width.
        seg: ``((bits_A, base_A, stride_A), (bits_B, base_B, stride_B))`` in bytes (see module doc).
        code_nbytes: packed bytes a vector (``d · bits / 8``).
        signs: float32 ``[d]`` Hadamard signs ``s`` (``Π = H diag(s) / sqrt(d)``).
        boundaries: float32 ``[2, 16]`` per kernel segment, padded with +inf.
        centroids: float32 ``[2, 16]`` per kernel segment, padded with 0.
        lut: float16 ``[2, 2, 256]``: ``lut[s, 0, p] = c_s[p & 15]``, ``lut[s, 1, p] = c_s[p >> 4]``
            (a byte holding two codes indexes both halves: one load a centroid, no nibble math).
        lut32: int32 ``[2, 256]``: the same pairs packed, ``f16(c_s[p & 15]) | f16(c_s[p >> 4]) << 16``
            (one 4-byte load yields both centroids of a code-pair byte; what the decode kernel reads).
        rot_t: float32 ``[d, d]`` = ``Π^T`` (row vectors: ``Π x = x @ Π^T``).
        rot: float32 ``[d, d]`` = ``Π`` (row vectors: ``Π^T y = y @ Π``).
        layout: the :class:`~turboquant.layout.CodeLayout` read by :meth:`from_layout`, else None.
    """

    d: int
    bits: float
    seg: tuple[tuple[int, int, int], tuple[int, int, int]]
    code_nbytes: int
    signs: torch.Tensor
    boundaries: torch.Tensor
    centroids: torch.Tensor
    lut: torch.Tensor
    lut32: torch.Tensor
    rot_t: torch.Tensor
    rot: torch.Tensor
    layout: object = None  # the CodeLayout the tables were read from (None: built from raw parts)

    @property
    def device(self) -> torch.device:
        return self.signs.device

    @classmethod
    def build(
        cls,
        d: int,
        bits: float,
        signs: torch.Tensor,
        centroids_hi: torch.Tensor | list[float],
        centroids_lo: torch.Tensor | list[float] | None = None,
        device: torch.device | str | None = None,
        boundaries: tuple | None = None,
    ) -> KernelTables:
        """Tables from raw parts (no layout object: the halves byte layout of ``bits``).
        ``centroids_hi``: ascending centroids of the ``ceil(bits)``-bit codebook (segment A);
        ``centroids_lo``: of the ``floor(bits)``-bit one (segment B, fractional widths only).
        ``boundaries``: the codebooks' own decision boundaries ``(hi, lo)`` (default: centroid
        midpoints). Code that has a :class:`~turboquant.layout.CodeLayout` uses :meth:`from_layout`."""
        check_head_dim(d)
        bits = check_kernel_bits(bits)
        whole = math.floor(bits)
        frac = bits != whole
        if frac:
            if centroids_lo is None:
                raise ValueError(f"fractional bits={bits} need `centroids_lo` ({whole}-bit codebook)")
            ba, bb = whole + 1, whole
            seg = ((ba, 0, d // 16), (bb, ba * d // 16, d // 16))
            cents = [torch.as_tensor(centroids_hi, dtype=torch.float32), torch.as_tensor(centroids_lo, dtype=torch.float32)]
            bnds = None if boundaries is None else (boundaries[0], boundaries[1])
        else:
            seg = ((whole, 0, d // 8), (whole, d // 16, d // 8))
            c = torch.as_tensor(centroids_hi, dtype=torch.float32)
            cents = [c, c]
            bnds = None if boundaries is None else (boundaries[0], boundaries[0])
        return cls._assemble(d, bits, seg, int(d * bits) // 8, cents, bnds, signs, device)

    @classmethod
    def _assemble(cls, d: int, bits: float, seg, code_nbytes: int, cents: list, bnds, signs,
                  device: torch.device | str | None, layout=None) -> KernelTables:
        """Device tables from the two kernel segments' ``(bits, base, stride)``, codebooks and signs."""
        for (nb, _, _), c in zip(seg, cents):
            if c.numel() != 2**nb:
                raise ValueError(f"a {nb}-bit segment needs {2**nb} centroids, got {c.numel()}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        bnd = torch.full((2, 16), float("inf"))
        cen = torch.zeros(2, 16)
        lut = torch.zeros(2, 2, 256)
        p = torch.arange(256)
        for s, c in enumerate(cents):
            n = c.numel()
            cen[s, :n] = c
            bnd[s, : n - 1] = (c[1:] + c[:-1]) / 2
            if bnds is not None and bnds[s] is not None:
                bnd[s, : n - 1] = torch.as_tensor(bnds[s], dtype=torch.float32)
            lut[s, 0] = cen[s][p & 15]
            lut[s, 1] = cen[s][p >> 4]
        signs = torch.as_tensor(signs, dtype=torch.float32).reshape(d)
        h = torch.ones(1, 1)
        while h.shape[0] < d:  # Sylvester Hadamard, natural order
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        rot = h * signs.unsqueeze(0) / math.sqrt(d)  # Π = H diag(s) / sqrt(d)
        return cls(
            d=d,
            bits=bits,
            seg=tuple(tuple(int(v) for v in t) for t in seg),
            code_nbytes=code_nbytes,
            signs=signs.to(device),
            boundaries=bnd.to(device),
            centroids=cen.to(device),
            lut=lut.to(device=device, dtype=torch.float16),
            lut32=_pack_pairs(lut.to(torch.float16)).to(device),
            rot_t=rot.T.contiguous().to(device),
            rot=rot.contiguous().to(device),
            layout=layout,
        )

    @classmethod
    def from_layout(cls, layout, device: torch.device | str | None = None):
        """Tables of a :class:`~turboquant.layout.CodeLayout`: segments, bits, byte offsets,
        codebooks and norm slots read from the layout (nothing re-derived from ``bits``).

        A one-group Hadamard layout whose segments are the two halves (or one integer-bit segment)
        gives :class:`KernelTables` for the halves kernels; any other layout the kernels run
        (outlier groups, a dense rotation) gives :class:`turboquant.kernels.codespace.CodeSpaceTables`
        for the code-space kernels. Raises ``ValueError`` with the reason where no kernel runs it
        (:func:`turboquant.kernels.layout_unsupported`)."""
        from turboquant.kernels.codespace import CodeSpaceTables, layout_reason

        why = layout_reason(layout)
        if why is not None:
            raise ValueError(f"the Triton kernels cannot run layout {layout.name!r}: {why}")
        if not halves_shaped(layout):
            return CodeSpaceTables.from_layout(layout, device)
        d, segs = layout.d, layout.segments
        if len(segs) == 1:  # integer bits: kernel segments = the two halves of every plane
            s0 = segs[0]
            seg = ((s0.bits, s0.byte_start, s0.plane_nbytes), (s0.bits, s0.byte_start + s0.plane_nbytes // 2, s0.plane_nbytes))
            books = [s0.codebook, s0.codebook]
        else:
            seg = tuple((s.bits, s.byte_start, s.plane_nbytes) for s in segs)
            books = [s.codebook for s in segs]
        cents = [torch.as_tensor(b.centroids, dtype=torch.float32) for b in books]
        bnds = tuple(torch.as_tensor(b.boundaries, dtype=torch.float32) for b in books)
        rotation = layout.groups[0].rotation
        return cls._assemble(d, float(layout.code_bits), seg, layout.code_nbytes, cents, bnds, rotation.signs,
                             device, layout=layout)

    @classmethod
    def from_quantizer(cls, quantizer, device: torch.device | str | None = None):
        """Tables of a :class:`turboquant.quantizer.TurboQuantMSE` or
        :class:`turboquant.layout_quantizer.TurboQuantLayout`, through :meth:`from_layout`; cached on it."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        cache = quantizer.__dict__.setdefault("_kernel_tables", {})
        key = str(device)
        if key in cache:
            return cache[key]
        layout = getattr(quantizer, "layout", None)
        if layout is None:
            raise ValueError(f"{type(quantizer).__name__} has no code layout: the kernels read a TurboQuant-mse "
                             "quantizer's `layout`")
        rotation = getattr(quantizer, "rotation", None)
        if not layout.is_grouped and getattr(rotation, "kind", None) != "hadamard":
            raise ValueError(
                f"the Triton kernels support rotation='hadamard' only, got {getattr(rotation, 'kind', rotation)!r}"
            )
        tables = cls.from_layout(layout, device)
        if tables.code_nbytes != getattr(quantizer, "code_nbytes", layout.code_nbytes):
            raise ValueError(f"layout mismatch: kernel {tables.code_nbytes} B/vector, quantizer {quantizer.code_nbytes}")
        cache[key] = tables
        return tables


def halves_shaped(layout) -> bool:
    """Whether ``layout`` is what the halves kernels run: one Hadamard group of head dim 64/128/256
    with one integer-bit segment or two ``d/2`` segments."""
    if layout.is_grouped or getattr(layout.groups[0].rotation, "kind", None) != "hadamard":
        return False
    if layout.d not in SUPPORTED_HEAD_DIMS:
        return False
    segs = layout.segments
    return len(segs) == 1 or (len(segs) == 2 and segs[0].size == segs[1].size == layout.d // 2)


def _pack_pairs(lut16: torch.Tensor) -> torch.Tensor:
    """float16 ``[2, 2, 256]`` (lo, hi) -> int32 ``[2, 256]`` with lo in the low 16 bits."""
    lo = lut16[:, 0].contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    hi = lut16[:, 1].contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    return (lo | (hi << 16)).contiguous()


def coord_perm(d2: int) -> torch.Tensor:
    """The coordinate order in which the decode kernel holds a segment of ``d2`` codes.

    Position ``p = (((((w·2 + l)·2 + t)·2 + u)·2 + v)·2 + h`` holds coordinate
    ``32w + 8(2v + u) + (2t + l) + 4h`` (word ``w`` of a plane, byte ``2v + u``, bit pair
    ``(2t+l, 2t+l+4)``). The kernel computes it inline.
    """
    p = torch.arange(d2)
    w, l, t, u, v, h = p // 32, (p // 16) % 2, (p // 8) % 2, (p // 4) % 2, (p // 2) % 2, p % 2
    return 32 * w + 8 * (2 * v + u) + 2 * t + l + 4 * h


def position_coords(d: int) -> torch.Tensor:
    """int64 [d]: the natural coordinate the kernels hold at each position of a whole row — segment
    A (coordinates ``[0, d/2)``) then segment B, each in :func:`coord_perm` order (the Triton
    kernels' ``_natural``)."""
    half = coord_perm(d // 2)
    return torch.cat([half, half + d // 2])


if HAS_TRITON:

    @triton.jit
    def _fwht_stage(x, M: tl.constexpr, D: tl.constexpr, H: tl.constexpr):
        # butterflies (a, b) -> (a + b, a - b) between coordinates m and m + H (m's H-bit clear)
        y = tl.permute(tl.reshape(x, (M, D // (2 * H), 2, H)), (0, 1, 3, 2))
        a, b = tl.split(y)
        y = tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2))
        return tl.reshape(y, (M, D))

    @triton.jit
    def fwht_tile(x, M: tl.constexpr, D: tl.constexpr):
        """Unnormalised Walsh-Hadamard transform of every row of an ``[M, D]`` register tile,
        D in (64, 128, 256) (Sylvester order, same butterfly order as ``turboquant.rotation.fwht``)."""
        x = _fwht_stage(x, M, D, 1)
        x = _fwht_stage(x, M, D, 2)
        x = _fwht_stage(x, M, D, 4)
        x = _fwht_stage(x, M, D, 8)
        x = _fwht_stage(x, M, D, 16)
        x = _fwht_stage(x, M, D, 32)
        if D >= 128:
            x = _fwht_stage(x, M, D, 64)
        if D >= 256:
            x = _fwht_stage(x, M, D, 128)
        return x
