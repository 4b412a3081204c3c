"""Kernels for every :class:`~turboquant.layout.CodeLayout`: outlier channel groups, dense rotations.

A layout splits the raw channels into groups ``G_1 .. G_m``; group ``g`` holds
``x̃_g = ||x_g|| Π_g^T c_g[idx_g]`` (own rotation, codebooks, float16 norm). In *code space* (the
groups' rotated coordinates, outliers first) a vector is ``y = [||x_g|| c_g[idx_g]]_g``, so

    <q, x̃> = Σ_g ||x_g|| (Π_g q_g) · c_g[idx_g]      and      Σ_n p_n x̃_n = unrot(Σ_n p_n y_n).

The kernels therefore work in code space only; the per-group gather + rotation of the query and
the un-rotation + scatter of the attention output run outside them in torch (:meth:`rotate`,
:meth:`unrotate`: one small matmul a group). Codes are read a byte column at a time: column ``k``
(coordinates ``8k .. 8k+7`` of one segment) has a plane-0 byte offset, a plane stride and a bit
count (:attr:`CodeSpaceTables.meta`), so any mix of segments of 1-4 bits whose starts and sizes are
multiples of 8 runs, with no alignment requirement on the rows. Each coordinate's centroid is a
table load (``16 · segment + idx``) scaled by the norm of its group (``norm slot``, at most two
groups: outliers + rest). So the per-group norms scale each group's share of the score and of
the value accumulator, exactly ``Σ_g ||x_g|| (Π_g q_g)·c_g``.

Decode: :func:`decode_attention_codespace` runs the word-decoder kernel of
:mod:`turboquant.kernels.segmented` (the halves kernel's SWAR decoder over power-of-two pieces of
each segment, same storage) whenever both stores' rows are whole 32-bit words (every head dim 128 /
256 preset), and the byte-column kernel here otherwise (d=64 outlier layouts: 16-channel groups,
26- or 18-byte rows); :data:`LAST_KERNEL` names which one the last call ran.

Reads top to bottom: tables and the rotation helpers, pure-torch references, Triton kernels,
wrappers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from turboquant.kernels._common import HAS_TRITON, LOG2E, SUPPORTED_HEAD_DIMS
from turboquant.kernels.workspace import DecodeWorkspace, LengthArgs, buffer, resolve_length
from turboquant.layout import GROUP_MULTIPLE, CodeLayout, channel_permutation
from turboquant.packing import unpack_bits

if HAS_TRITON:
    import triton
    import triton.language as tl

    from turboquant.kernels.decode_attention import _residual_part

KERNEL_SEGMENT_BITS = (1, 2, 3, 4)
KERNEL_ROTATIONS = ("hadamard", "dense")
MAX_GROUPS = 2  # norm slots a vector the kernels select between
_NORM_MAX = torch.finfo(torch.float16).max
LAST_KERNEL: dict = {}  # which decode kernel the last call ran ("segmented" or "byte-columns")

if TYPE_CHECKING:  # cuda_decode imports this package at run time
    from turboquant.kernels.cuda_decode import CudaConfig


# ------------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------------
def layout_reason(layout: CodeLayout) -> str | None:
    """Why no Triton kernel runs ``layout`` (device aside), or None."""
    if not isinstance(layout, CodeLayout):
        return f"a {type(layout).__name__}, not a turboquant.layout.CodeLayout"
    if layout.num_norms > MAX_GROUPS:
        return f"{layout.num_norms} channel groups (the kernels take at most {MAX_GROUPS}: outliers + rest)"
    if layout.d not in SUPPORTED_HEAD_DIMS:
        return (
            f"head_dim {layout.d} (the kernels tile whole rows of {SUPPORTED_HEAD_DIMS} channels)"
        )
    for g in layout.groups:
        if layout.is_grouped and g.size % GROUP_MULTIPLE:
            return (
                f"channel group {g.channels!r} of {g.size} channels (the kernels need groups of a multiple "
                f"of {GROUP_MULTIPLE} channels)"
            )
        kind = getattr(g.rotation, "kind", None)
        if kind not in KERNEL_ROTATIONS:
            return (
                f"rotation {kind!r} of group {g.channels!r} (the kernels take {KERNEL_ROTATIONS})"
            )
        for s in g.segments:
            if s.bits not in KERNEL_SEGMENT_BITS:
                return (
                    f"a {s.bits}-bit segment (the kernels unpack {KERNEL_SEGMENT_BITS} bits a code)"
                )
            if s.start % 8 or s.size % 8:
                return f"segment [{s.start}, {s.stop}) (the kernels read whole bytes: multiples of 8 coordinates)"
    return None


@dataclass
class CodeSpaceTables:
    """Device tables of one layout for the code-space kernels (see the module docstring).

    Attributes:
        layout: the :class:`~turboquant.layout.CodeLayout`.
        d, code_nbytes, num_norms: head dim, packed bytes a vector, float16 norms a vector.
        max_bits: the widest segment's bits (planes the kernels read a column, masked below it).
        meta: int32 ``[3·d/8 + 2·d]``: per byte column ``k`` the plane-0 byte offset, the plane
            stride and the bits; per coordinate the centroid base ``16·segment`` and the norm slot.
        centroids: float32 ``[16·segments]`` (padded with 0); boundaries: float32 ``[16·segments]``
            (the codebooks' decision boundaries, padded with +inf).
        rotations: per group ``(start, size, Π_g)`` with ``Π_g`` float32 ``[size, size]`` on the device.
    """

    layout: CodeLayout
    d: int
    code_nbytes: int
    num_norms: int
    max_bits: int
    meta: torch.Tensor
    centroids: torch.Tensor
    boundaries: torch.Tensor
    rotations: tuple
    _perms: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def device(self) -> torch.device:
        return self.meta.device

    @property
    def bits(self) -> float:
        """Bits a coordinate held, norms included (for messages)."""
        return self.layout.bits_per_coordinate

    @property
    def grouped(self) -> bool:
        return self.layout.is_grouped

    @classmethod
    def from_layout(
        cls, layout: CodeLayout, device: torch.device | str | None = None
    ) -> CodeSpaceTables:
        """Tables of ``layout`` on ``device`` (raises ``ValueError`` naming what the kernels cannot run)."""
        why = layout_reason(layout)
        if why is not None:
            raise ValueError(f"the Triton kernels cannot run layout {layout.name!r}: {why}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        d, ncol = layout.d, layout.d // 8
        col = torch.zeros(3, ncol, dtype=torch.int32)
        coord = torch.zeros(2, d, dtype=torch.int32)
        segs = layout.segments
        cen = torch.zeros(len(segs), 16)
        bnd = torch.full((len(segs), 16), float("inf"))
        for i, s in enumerate(segs):
            k0 = s.start // 8
            for k in range(k0, s.stop // 8):
                col[:, k] = torch.tensor(
                    [s.byte_start + (k - k0), s.plane_nbytes, s.bits], dtype=torch.int32
                )
            coord[0, s.start : s.stop] = 16 * i
            c = torch.as_tensor(s.codebook.centroids, dtype=torch.float32)
            cen[i, : c.numel()] = c
            bnd[i, : c.numel() - 1] = torch.as_tensor(s.codebook.boundaries, dtype=torch.float32)
        for g in layout.groups:
            coord[1, g.start : g.start + g.size] = g.norm_slot
        rots = tuple(
            (g.start, g.size, g.rotation.matrix().to(torch.float32).contiguous().to(device))
            for g in layout.groups
        )
        return cls(
            layout=layout,
            d=d,
            code_nbytes=layout.code_nbytes,
            num_norms=layout.num_norms,
            max_bits=max(s.bits for s in segs),
            meta=torch.cat([col.reshape(-1), coord.reshape(-1)]).to(device),
            centroids=cen.reshape(-1).to(device),
            boundaries=bnd.reshape(-1).to(device),
            rotations=rots,
        )

    # -- channel order and rotation (torch, outside the kernels) -------------------------------------
    def _perm(
        self, outliers: torch.Tensor | None, x: torch.Tensor, repeat: int = 1
    ) -> torch.Tensor | None:
        """Code-order permutation of ``x`` [..., H, T, d] from ``outliers`` [H / repeat, n_out]
        (each head's for ``repeat`` consecutive heads of ``x``: GQA query heads), expanded to
        ``x``'s shape; cached per outliers tensor (a store's are fixed after its first update), so
        a decode step spends no sort on it."""
        if not self.layout.is_grouped:
            return None
        if outliers is None:
            raise ValueError(
                f"layout {self.layout.name!r} has outlier channels: pass `outliers` [H, n_out]"
            )
        if outliers.shape[-1] != self.layout.n_out:
            raise ValueError(
                f"`outliers` has {outliers.shape[-1]} channels a head, layout {self.layout.name!r} "
                f"needs n_out={self.layout.n_out}"
            )
        def build():
            perm = channel_permutation(outliers.to(x.device).long(), self.d)  # [H, d]
            return perm.repeat_interleave(repeat, dim=0) if repeat > 1 else perm

        perm = cached_per_outliers(self._perms, (repeat, x.device), outliers, build, 64)
        if x.dim() < 3 or perm.dim() != 2 or perm.shape[0] != x.shape[-3]:
            raise ValueError(
                f"`outliers` [H, n_out] = {tuple(outliers.shape)} must match the head axis of "
                f"x [..., H, T, d] = {tuple(x.shape)}"
            )
        return perm.unsqueeze(-2).expand(x.shape)

    def rotate(
        self, x: torch.Tensor, outliers: torch.Tensor | None = None, repeat: int = 1
    ) -> torch.Tensor:
        """Code-space ``[Π_g x_g]_g`` float32 of raw ``x`` [..., H, T, d] (``outliers`` [H, n_out])."""
        perm = self._perm(outliers, x, repeat)
        xc = x.float() if perm is None else torch.gather(x.float(), -1, perm)
        return torch.cat([xc[..., a : a + n] @ p.T for a, n, p in self.rotations], dim=-1)

    def unrotate(
        self, y: torch.Tensor, outliers: torch.Tensor | None = None, repeat: int = 1
    ) -> torch.Tensor:
        """Inverse of :meth:`rotate`: per group ``Π_g^T``, then scattered back to the raw channels."""
        x = torch.cat([y[..., a : a + n].float() @ p for a, n, p in self.rotations], dim=-1)
        perm = self._perm(outliers, y, repeat)
        return x if perm is None else torch.empty_like(x).scatter_(-1, perm, x)

    def group_norms(self, xc: torch.Tensor) -> torch.Tensor:
        """``||x_g||`` float32 [..., groups] of code-ordered ``xc`` [..., d]."""
        return torch.stack(
            [torch.linalg.vector_norm(xc[..., a : a + n], dim=-1) for a, n, _ in self.rotations], -1
        )

    def spread(self, norms: torch.Tensor) -> torch.Tensor:
        """Per-group values [..., groups] -> per code-space coordinate [..., d] (an index_select
        with the coordinates' norm slots: no host sync, unlike a tensor-count repeat_interleave)."""
        slots = self.meta[3 * (self.d // 8) + self.d :].to(device=norms.device, dtype=torch.long)
        return norms.index_select(-1, slots)


def _version(t: torch.Tensor) -> int | None:
    """In-place version counter of ``t`` (None for inference-mode tensors, which have none)."""
    try:
        return t._version
    except RuntimeError:
        return None


def cached_per_outliers(cache: dict, key: tuple, outliers: torch.Tensor | None, build, max_entries: int):
    """``build()`` cached in ``cache`` per ``(outliers tensor, *key)``: a hit needs the very tensor
    at the in-place version it was built at (never for inference-mode tensors, which have no
    version; a store's outliers are fixed after its first update). ``outliers`` None (a one-group
    layout): cached per ``key``. The cache is emptied when it holds ``max_entries``."""
    version = None if outliers is None else _version(outliers)
    full_key = (id(outliers), *key)
    hit = cache.get(full_key)
    if hit is not None and hit[0] is outliers and (outliers is None or (version is not None and hit[1] == version)):
        return hit[2]
    value = build()
    if len(cache) >= max_entries:
        cache.clear()
    cache[full_key] = (outliers, version, value)  # holds `outliers`, so its id stays unique while cached
    return value


def as_codespace(tables, device: torch.device | None = None) -> CodeSpaceTables:
    """``tables`` as :class:`CodeSpaceTables` (a halves :class:`KernelTables` through its layout)."""
    if isinstance(tables, CodeSpaceTables):
        return tables
    layout = getattr(tables, "layout", None)
    if layout is None:
        raise ValueError(
            "these KernelTables were built from raw parts (no layout): build them with "
            "KernelTables.from_layout to mix them with an outlier layout"
        )
    cache = tables.__dict__.setdefault("_codespace", {})
    key = str(device or tables.device)
    if key not in cache:
        cache[key] = CodeSpaceTables.from_layout(layout, device or tables.device)
    return cache[key]


def _norms_shape(tables: CodeSpaceTables, lead: tuple[int, ...]) -> tuple[int, ...]:
    """Stored norms: [..., groups] for outlier layouts, [...] for one-group layouts (as the store)."""
    return (*lead, tables.num_norms) if tables.grouped else tuple(lead)


# ------------------------------------------------------------------------------------------------
# references
# ------------------------------------------------------------------------------------------------
def unpack_codespace_reference(
    codes: torch.Tensor, norms: torch.Tensor, tables: CodeSpaceTables
) -> torch.Tensor:
    """``y = [||x_g|| c_g[idx_g]]_g`` float32 [..., d] (code space) via ``packing.unpack_bits``."""
    parts = []
    for i, s in enumerate(tables.layout.segments):
        idx = unpack_bits(
            codes[..., s.byte_start : s.byte_start + s.nbytes].contiguous(), s.bits, s.size
        ).long()
        parts.append(tables.centroids.to(codes.device)[16 * i + idx])
    nf = norms.float() if tables.grouped else norms.float().unsqueeze(-1)
    return torch.cat(parts, dim=-1) * tables.spread(nf)


def dequantize_codespace_reference(
    codes: torch.Tensor,
    norms: torch.Tensor,
    tables: CodeSpaceTables,
    outliers: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Raw-channel ``x̃`` [B, H, T, d] from codes [B, H, T, code_nbytes] and norms."""
    return tables.unrotate(unpack_codespace_reference(codes, norms, tables), outliers).to(dtype)


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _cs_values(
        row_ptr,
        nmask,
        norm_rows,
        meta_ptr,
        cent_ptr,
        D: tl.constexpr,
        MAX_BITS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        NORMS: tl.constexpr,
    ):
        """``||x_g|| c_g[idx]`` float32 [BLOCK_N, D] (code space) of ``BLOCK_N`` packed rows
        (``row_ptr``: uint8 pointers to the row starts; ``norm_rows``: float16 pointers to each
        row's first norm, ``NORMS`` (1 or 2) of them). Reads each plane's bytes a column (``D/8``
        loads a plane a row)."""
        C: tl.constexpr = D // 8
        offs_c = tl.arange(0, C)
        off = tl.load(meta_ptr + offs_c)
        stride = tl.load(meta_ptr + C + offs_c)
        nbits = tl.load(meta_ptr + 2 * C + offs_c)
        sh = tl.arange(0, 8)
        idx = tl.zeros((BLOCK_N, C, 8), dtype=tl.int32)
        for j in tl.static_range(MAX_BITS):
            byte = tl.load(
                row_ptr[:, None] + off[None, :] + j * stride[None, :],
                mask=nmask[:, None] & (nbits > j)[None, :],
                other=0,
            ).to(tl.int32)
            idx += ((byte[:, :, None] >> sh[None, None, :]) & 1) << j
        codes = tl.reshape(idx, (BLOCK_N, D))
        offs_d = tl.arange(0, D)
        cbase = tl.load(meta_ptr + 3 * C + offs_d)
        slot = tl.load(meta_ptr + 3 * C + D + offs_d)
        cen = tl.load(cent_ptr + cbase[None, :] + codes)
        if NORMS == 0:  # unit scale: the caller applies the norms (decode keys)
            return cen
        n0 = tl.load(norm_rows, mask=nmask, other=0.0).to(tl.float32)
        scale = n0[:, None]
        if NORMS == 2:  # two groups: each coordinate takes its group's norm
            n1 = tl.load(norm_rows + 1, mask=nmask, other=0.0).to(tl.float32)
            scale = tl.where(slot[None, :] == 0, n0[:, None], n1[:, None])
        return cen * scale

    @triton.jit
    def _cs_quantize_kernel(
        y_ptr, nsrc_ptr, codes_ptr, norms_ptr, meta_ptr, bnd_ptr, pos_ptr,
        n_rows, H, T, cap, pos_sb,
        sc_b, sc_h, sc_t, sn_b, sn_h, sn_t,
        D: tl.constexpr, MAX_BITS: tl.constexpr, NORMS: tl.constexpr, BLOCK_M: tl.constexpr,
        HAS_POS: tl.constexpr,
    ):  # fmt: skip
        # rows of unit, rotated, code-space y (float32, contiguous) -> nearest centroid (number of
        # boundaries below y, ties to the lower code as torch.bucketize) -> bit planes by column;
        # the float16 group norms (nsrc, [rows, NORMS]) are stored beside. HAS_POS: row t of
        # sequence b goes to t + pos[b] (a device write offset), rows past `cap` are dropped.
        C: tl.constexpr = D // 8
        pid = tl.program_id(0)
        rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < n_rows
        t = rows % T
        bh = rows // T
        h = bh % H
        b = bh // H
        tw = t
        wmask = rmask
        if HAS_POS:
            tw = t + tl.load(pos_ptr + b * pos_sb, mask=rmask, other=0).to(tl.int64)
            wmask = rmask & (tw < cap)
        offs_d = tl.arange(0, D)
        y = tl.load(y_ptr + rows[:, None] * D + offs_d[None, :], mask=rmask[:, None], other=0.0)
        cbase = tl.load(meta_ptr + 3 * C + offs_d)
        idx = tl.zeros((BLOCK_M, D), dtype=tl.int32)
        for k in tl.static_range((1 << MAX_BITS) - 1):
            idx += (y > tl.load(bnd_ptr + cbase + k)[None, :]).to(tl.int32)
        offs_c = tl.arange(0, C)
        off = tl.load(meta_ptr + offs_c)
        stride = tl.load(meta_ptr + C + offs_c)
        nbits = tl.load(meta_ptr + 2 * C + offs_c)
        idx3 = tl.reshape(idx, (BLOCK_M, C, 8))
        sh = tl.arange(0, 8)
        row_ptr = codes_ptr + b * sc_b + h * sc_h + tw * sc_t
        for j in tl.static_range(MAX_BITS):
            byte = tl.sum(((idx3 >> j) & 1) << sh[None, None, :], axis=2)
            tl.store(
                row_ptr[:, None] + off[None, :] + j * stride[None, :],
                byte.to(tl.uint8),
                mask=wmask[:, None] & (nbits > j)[None, :],
            )
        nrow = norms_ptr + b * sn_b + h * sn_h + tw * sn_t
        for gi in tl.static_range(NORMS):
            tl.store(
                nrow + gi, tl.load(nsrc_ptr + rows * NORMS + gi, mask=rmask, other=0.0), mask=wmask
            )

    @triton.jit(do_not_specialize=["length"])
    def _cs_dequantize_kernel(
        c_ptr,
        n_ptr,
        meta_ptr,
        cent_ptr,
        y_ptr,
        length,
        H,
        sc_b,
        sc_h,
        sc_t,
        sn_b,
        sn_h,
        sn_t,
        D: tl.constexpr,
        MAX_BITS: tl.constexpr,
        BLOCK_T: tl.constexpr,
        NORMS: tl.constexpr,
    ):
        # grid (cdiv(length, BLOCK_T), B·H): code-space y of BLOCK_T rows -> y_ptr [B·H, length, D] float32
        pid_t = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        offs_t = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        tmask = offs_t < length
        y = _cs_values(
            c_ptr + b * sc_b + h * sc_h + offs_t * sc_t,
            tmask,
            n_ptr + b * sn_b + h * sn_h + offs_t * sn_t,
            meta_ptr,
            cent_ptr,
            D,
            MAX_BITS,
            BLOCK_T,
            NORMS,
        )
        offs_d = tl.arange(0, D)
        tl.store(
            y_ptr + (pid_bh.to(tl.int64) * length + offs_t)[:, None] * D + offs_d[None, :],
            y,
            mask=tmask[:, None],
        )

    @triton.jit(do_not_specialize=["length", "chunk", "S_C", "S", "R", "chunk_r"])
    def _cs_partial_kernel(
        qc_ptr,
        q_ptr,
        kc_ptr,
        kn_ptr,
        vc_ptr,
        vn_ptr,
        kmeta_ptr,
        kcent_ptr,
        vmeta_ptr,
        vcent_ptr,
        rk_ptr,
        rv_ptr,
        m_ptr,
        l_ptr,
        acc_ptr,
        len_ptr,
        rlen_ptr,
        length,
        chunk,
        S_C,
        S,
        R,
        chunk_r,
        Hkv,
        qk_scale,
        len_sb,
        rlen_sb,
        sqc_b,
        sqc_h,
        sq_b,
        sq_h,
        skc_b,
        skc_h,
        skc_n,
        skn_b,
        skn_h,
        skn_n,
        svc_b,
        svc_h,
        svc_n,
        svn_b,
        svn_h,
        svn_n,
        srk_b,
        srk_h,
        srk_n,
        srv_b,
        srv_h,
        srv_n,
        G: tl.constexpr,
        G_PAD: tl.constexpr,
        D: tl.constexpr,
        K_MAXB: tl.constexpr,
        V_MAXB: tl.constexpr,
        K_NORMS: tl.constexpr,
        V_NORMS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr,
        RES_IEEE: tl.constexpr,
        LEN_TENSOR: tl.constexpr,
        RLEN_TENSOR: tl.constexpr,
    ):
        # Programs [0, S_C): `chunk` packed tokens of one KV head, all G query heads of its group,
        #   scored with the code-space query (qc_ptr: Π_g q_g per group, scaling · log2 e folded in);
        #   values accumulated in V's code space. Reads chunk · (K + V code bytes + norms).
        # Programs [S_C, S): `chunk_r` residual-window tokens, raw channels, full precision.
        # LEN_TENSOR / RLEN_TENSOR: the valid lengths come from device memory (clamped to the
        # host bounds `length` / `R` the grid was sized by); empty programs write m = -inf, l = 0.
        pid_s = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // Hkv).to(tl.int64)
        h = (pid_bh % Hkv).to(tl.int64)
        g = tl.arange(0, G_PAD)
        gmask = g < G
        part = (pid_bh * S + pid_s) * G + g
        if LEN_TENSOR:
            length = tl.minimum(tl.load(len_ptr + b * len_sb).to(tl.int32), length)
        if RLEN_TENSOR:
            R = tl.minimum(tl.load(rlen_ptr + b * rlen_sb).to(tl.int32), R)
        if pid_s < S_C:
            start = pid_s * chunk
            end = tl.minimum(start + chunk, length)
            offs_d = tl.arange(0, D)
            qc = tl.load(
                qc_ptr + b * sqc_b + (h * G + g)[:, None] * sqc_h + offs_d[None, :],
                mask=gmask[:, None],
                other=0.0,
            ).to(tl.float16)
            # keys: unit centroids in the float16 product, each group's ||k_g|| applied to its
            # partial score in float32 after it (rounding ||k_g|| c[idx] to float16 instead gives
            # an error that varies token to token: the GPU failures of 2026-12-01)
            kslot = tl.load(kmeta_ptr + 3 * (D // 8) + D + offs_d)
            qc0 = tl.where(kslot[None, :] == 0, qc, 0.0).to(tl.float16)
            qc1 = tl.where(kslot[None, :] == 1, qc, 0.0).to(tl.float16)
            m_i = tl.full((G_PAD,), float("-inf"), dtype=tl.float32)
            l_i = tl.zeros((G_PAD,), dtype=tl.float32)
            acc = tl.zeros((G_PAD, D), dtype=tl.float32)
            for n0 in range(start, end, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                nmask = offs_n < end
                kv = _cs_values(
                    kc_ptr + b * skc_b + h * skc_h + offs_n * skc_n,
                    nmask,
                    kn_ptr + b * skn_b + h * skn_h + offs_n * skn_n,
                    kmeta_ptr,
                    kcent_ptr,
                    D,
                    K_MAXB,
                    BLOCK_N,
                    0,
                ).to(tl.float16)
                kn_rows = kn_ptr + b * skn_b + h * skn_h + offs_n * skn_n
                kn0 = tl.load(kn_rows, mask=nmask, other=0.0).to(tl.float32)
                if K_NORMS == 2:  # [G_PAD, BLOCK_N], log2 units
                    kn1 = tl.load(kn_rows + 1, mask=nmask, other=0.0).to(tl.float32)
                    sc = tl.dot(qc0, tl.trans(kv)) * kn0[None, :]
                    sc += tl.dot(qc1, tl.trans(kv)) * kn1[None, :]
                else:
                    sc = tl.dot(qc, tl.trans(kv)) * kn0[None, :]
                sc = tl.where(nmask[None, :], sc, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(sc, axis=1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(sc - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                vv = _cs_values(
                    vc_ptr + b * svc_b + h * svc_h + offs_n * svc_n,
                    nmask,
                    vn_ptr + b * svn_b + h * svn_h + offs_n * svn_n,
                    vmeta_ptr,
                    vcent_ptr,
                    D,
                    V_MAXB,
                    BLOCK_N,
                    V_NORMS,
                )
                acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), vv.to(tl.float16))
                m_i = m_new
            tl.store(m_ptr + part, m_i, mask=gmask)
            tl.store(l_ptr + part, l_i, mask=gmask)
            tl.store(acc_ptr + part[:, None] * D + offs_d[None, :], acc, mask=gmask[:, None])
        else:
            q_rows = q_ptr + b * sq_b + (h * G + g) * sq_h
            _residual_part(
                q_rows,
                gmask,
                part,
                rk_ptr,
                rv_ptr,
                m_ptr,
                l_ptr,
                acc_ptr,
                b,
                h,
                pid_s,
                S_C,
                R,
                chunk_r,
                qk_scale,
                srk_b,
                srk_h,
                srk_n,
                srv_b,
                srv_h,
                srv_n,
                G_PAD,
                D,
                BLOCK_R,
                RES_IEEE,
            )

    @triton.jit(do_not_specialize=["S_C", "S"])
    def _cs_combine_kernel(
        m_ptr,
        l_ptr,
        acc_ptr,
        outc_ptr,
        outr_ptr,
        S_C,
        S,
        Hq,
        G: tl.constexpr,
        D: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        # One program per (sequence, query head): merges the S splits with one softmax denominator;
        # writes the compressed part (V code space) and the residual part (raw channels) apart,
        # each divided by the total weight (the caller un-rotates the first and adds the second).
        pid = tl.program_id(0)
        b = (pid // Hq).to(tl.int64)
        hq = pid % Hq
        Hkv = Hq // G
        bh = b * Hkv + hq // G
        g = hq % G
        offs_d = tl.arange(0, D)
        offs_s = tl.arange(0, BLOCK_S)
        m_all = tl.full((BLOCK_S,), float("-inf"), dtype=tl.float32)
        for s0 in range(0, S, BLOCK_S):
            sm = s0 + offs_s < S
            m_all = tl.maximum(
                m_all, tl.load(m_ptr + (bh * S + s0 + offs_s) * G + g, mask=sm, other=float("-inf"))
            )
        m_tot = tl.max(m_all, axis=0)
        l_tot = tl.zeros((BLOCK_S,), dtype=tl.float32)
        acc_c = tl.zeros((D,), dtype=tl.float32)
        acc_r = tl.zeros((D,), dtype=tl.float32)
        for s0 in range(0, S, BLOCK_S):
            sidx = s0 + offs_s
            sm = sidx < S
            part = (bh * S + sidx) * G + g
            w = tl.where(
                sm, tl.exp2(tl.load(m_ptr + part, mask=sm, other=float("-inf")) - m_tot), 0.0
            )
            l_tot += w * tl.load(l_ptr + part, mask=sm, other=0.0)
            a = tl.load(acc_ptr + part[:, None] * D + offs_d[None, :], mask=sm[:, None], other=0.0)
            comp = sidx < S_C
            acc_c += tl.sum(tl.where(comp, w, 0.0)[:, None] * a, axis=0)
            acc_r += tl.sum(tl.where(comp, 0.0, w)[:, None] * a, axis=0)
        inv = 1.0 / tl.sum(l_tot, axis=0)
        tl.store(outc_ptr + pid * D + offs_d, acc_c * inv)
        tl.store(outr_ptr + pid * D + offs_d, acc_r * inv)


# ------------------------------------------------------------------------------------------------
# wrappers
# ------------------------------------------------------------------------------------------------
def _need_triton(op: str) -> None:
    if not HAS_TRITON:
        raise RuntimeError(f"{op} needs Triton (pip install triton); use the *_reference functions")


def quantize_pack_codespace(
    x: torch.Tensor,
    tables: CodeSpaceTables,
    outliers: torch.Tensor | None = None,
    out_codes: torch.Tensor | None = None,
    out_norms: torch.Tensor | None = None,
    check_range: bool = True,
    positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize and pack ``x`` [B, H, T, d] with any layout: gather + per-group norms and rotation
    in torch, nearest centroid + bit-plane packing in the kernel. Returns ``(codes uint8
    [B, H, T, code_nbytes], norms float16 [B, H, T, groups])`` (one-group layouts: norms
    [B, H, T]); writes into ``out_codes`` / ``out_norms`` when given (any strides, last dim unit)."""
    _need_triton("quantize_pack")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"`x` must be float32/float16/bfloat16, got {x.dtype}")
    if x.dim() != 4 or x.shape[-1] != tables.d:
        raise ValueError(f"`x` must be [B, H, T, d={tables.d}], got {tuple(x.shape)}")
    lead = tuple(x.shape[:-1])
    pos, pos_sb, cap = None, 0, 0
    if positions is not None:
        from turboquant.kernels.quantize_pack import check_positions

        pos, pos_sb, cap, lead = check_positions(positions, x, out_codes, out_norms)
    nshape = _norms_shape(tables, lead)
    if out_codes is None:
        out_codes = torch.empty(*lead, tables.code_nbytes, dtype=torch.uint8, device=x.device)
    if out_norms is None:
        out_norms = torch.empty(nshape, dtype=torch.float16, device=x.device)
    if (
        tuple(out_codes.shape) != (*lead, tables.code_nbytes)
        or out_codes.dtype != torch.uint8
        or out_codes.stride(-1) != 1
    ):
        raise ValueError(
            f"`out_codes` must be uint8 {(*lead, tables.code_nbytes)} with a unit last stride, got "
            f"{out_codes.dtype} {tuple(out_codes.shape)}"
        )
    if tuple(out_norms.shape) != nshape or out_norms.dtype != torch.float16:
        raise ValueError(
            f"`out_norms` must be float16 {nshape}, got {out_norms.dtype} {tuple(out_norms.shape)}"
        )
    if x.numel() == 0:
        return out_codes, out_norms
    perm = tables._perm(outliers, x)
    xc = x.float() if perm is None else torch.gather(x.float(), -1, perm)
    norms = tables.group_norms(xc)  # [B, H, T, groups]
    if check_range and float(norms.max()) > _NORM_MAX:
        raise ValueError(f"a group norm exceeds the float16 norm storage range ({_NORM_MAX:.0f})")
    u = xc / tables.spread(norms.clamp_min(1e-30))
    y = torch.cat([u[..., a : a + n] @ p.T for a, n, p in tables.rotations], dim=-1).contiguous()
    B, H, T, _ = x.shape
    n_rows = B * H * T
    block_m = 16 if tables.d <= 128 else 8
    n16 = norms.to(torch.float16).contiguous()  # [B, H, T, groups]
    nt = out_norms if tables.grouped else out_norms.unsqueeze(-1)
    _cs_quantize_kernel[(triton.cdiv(n_rows, block_m),)](
        y, n16, out_codes, nt, tables.meta, tables.boundaries, tables.meta if pos is None else pos,
        n_rows, H, T, cap, pos_sb,
        out_codes.stride(0), out_codes.stride(1), out_codes.stride(2),
        nt.stride(0), nt.stride(1), nt.stride(2),
        D=tables.d, MAX_BITS=tables.max_bits, NORMS=tables.num_norms, BLOCK_M=block_m,
        HAS_POS=pos is not None, num_warps=4,
    )  # fmt: skip
    return out_codes, out_norms


def _check_codes(
    name: str, codes: torch.Tensor, norms: torch.Tensor, tables: CodeSpaceTables, B: int
) -> None:
    if (
        codes.dtype != torch.uint8
        or codes.dim() != 4
        or codes.shape[0] != B
        or codes.shape[-1] != tables.code_nbytes
    ):
        raise ValueError(
            f"`{name}_codes` must be uint8 [B={B}, H, capacity, {tables.code_nbytes}] for layout "
            f"{tables.layout.name!r}, got {codes.dtype} {tuple(codes.shape)}"
        )
    if codes.stride(-1) != 1:
        raise ValueError(f"`{name}_codes` must have a unit stride in its last dim")
    want = _norms_shape(tables, tuple(codes.shape[:3]))
    if (
        norms.dtype != torch.float16
        or tuple(norms.shape) != want
        or (tables.grouped and norms.stride(-1) != 1)
    ):
        raise ValueError(
            f"`{name}_norms` must be float16 {want} (unit stride over groups) for layout "
            f"{tables.layout.name!r}, got {norms.dtype} {tuple(norms.shape)}"
        )
    if codes.device != tables.device:
        raise ValueError(f"`{name}` tables live on {tables.device}, the codes on {codes.device}")


def dequantize_codespace(
    codes: torch.Tensor,
    norms: torch.Tensor,
    length: int,
    tables: CodeSpaceTables,
    outliers: torch.Tensor | None = None,
    dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
    block_t: int = 32,
) -> torch.Tensor:
    """Raw-channel ``x̃`` [B, H, length, d] of the first ``length`` vectors of a store of any
    layout: code-space values in the kernel, per-group un-rotation + scatter in torch; written into
    ``out[:, :, :length]`` when given."""
    _need_triton("dequantize")
    B = codes.shape[0] if codes.dim() == 4 else -1
    _check_codes("store", codes, norms, tables, B)
    _, H, cap, _ = codes.shape
    if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= cap:
        raise ValueError(
            f"`length` must be an int in [0, {cap}] (the store capacity), got {length!r}"
        )
    y = torch.empty(B, H, length, tables.d, dtype=torch.float32, device=codes.device)
    if length:
        nt = norms if tables.grouped else norms.unsqueeze(-1)
        _cs_dequantize_kernel[(triton.cdiv(length, block_t), B * H)](
            codes,
            nt,
            tables.meta,
            tables.centroids,
            y,
            length,
            H,
            codes.stride(0),
            codes.stride(1),
            codes.stride(2),
            nt.stride(0),
            nt.stride(1),
            nt.stride(2),
            D=tables.d,
            MAX_BITS=tables.max_bits,
            BLOCK_T=block_t,
            NORMS=tables.num_norms,
            num_warps=4,
        )
    x = tables.unrotate(y, outliers)
    if out is None:
        return x.to(dtype)
    out[:, :, :length] = x
    return out[:, :, :length]


def decode_attention_codespace(
    query: torch.Tensor,
    k_codes: torch.Tensor,
    k_norms: torch.Tensor,
    v_codes: torch.Tensor,
    v_norms: torch.Tensor,
    length: int | torch.Tensor,
    k_tables: CodeSpaceTables,
    v_tables: CodeSpaceTables,
    scaling: float,
    residual_k: torch.Tensor | None = None,
    residual_v: torch.Tensor | None = None,
    k_outliers: torch.Tensor | None = None,
    v_outliers: torch.Tensor | None = None,
    max_length: int | None = None,
    residual_length: int | torch.Tensor | None = None,
    workspace: DecodeWorkspace | None = None,
    block_n: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    programs_per_sm: int | None = None,
    backend: str = "auto",
    cuda_config: CudaConfig | None = None,
) -> torch.Tensor:
    """Decode attention over packed K/V stores of any layouts (K and V may differ) + the residual
    window; ``[B, 1, H_q, d]`` in the query's dtype. ``decode_attention`` forwards here whenever a
    tables object is :class:`CodeSpaceTables`; arguments as there, plus ``k_outliers`` /
    ``v_outliers`` ([H_kv, n_out], the stores' ``outliers``) for outlier layouts.

    Runs the word-decoder kernel of :mod:`turboquant.kernels.segmented` when both layouts' rows are
    whole 32-bit words (every head dim 128/256 preset); else (d=64 outlier layouts, 16-channel
    groups) the byte-column kernel below. ``backend`` as in ``decode_attention``: "cuda" / "auto"
    run the compressed splits of head_dim 256 layouts in the CUDA kernel (word-decoder layouts only)."""
    from turboquant.kernels.decode_attention import _num_sms

    _need_triton("decode_attention")
    if query.dim() != 4 or query.shape[2] != 1:
        raise ValueError(
            f"`query` must be [B, H_q, 1, d] (one decode token), got {tuple(query.shape)}"
        )
    B, Hq, _, d = query.shape
    if k_tables.d != d or v_tables.d != d:
        raise ValueError(f"tables built for d={k_tables.d}/{v_tables.d}, query has d={d}")
    _check_codes("k", k_codes, k_norms, k_tables, B)
    _check_codes("v", v_codes, v_norms, v_tables, B)
    Hkv = k_codes.shape[1]
    if v_codes.shape[1] != Hkv or Hq % Hkv:
        raise ValueError(f"H_q={Hq} must be a multiple of H_kv={Hkv} (K) = {v_codes.shape[1]} (V)")
    G = Hq // Hkv
    dev = query.device
    cap = min(k_codes.shape[2], v_codes.shape[2])
    ln = resolve_length(length, max_length, B, cap, dev)
    R = 0 if residual_k is None else residual_k.shape[2]
    if R and (
        residual_v is None
        or residual_v.shape != residual_k.shape
        or residual_k.stride(-1) != 1
        or residual_v.stride(-1) != 1
        or residual_v.dtype != residual_k.dtype
        or tuple(residual_k.shape[:2]) != (B, Hkv)
        or residual_k.shape[-1] != d
    ):
        raise ValueError(
            f"`residual_k`/`residual_v` must both be [B={B}, H_kv={Hkv}, R, d={d}], one dtype, "
            "contiguous last dim"
        )
    if R and residual_k.dtype == torch.bfloat16 and residual_k.device.type == "cpu":
        raise ValueError(
            "a bfloat16 residual window cannot run under Triton's interpreter (its tl.dot on "
            "bfloat16 is wrong): pass float32/float16 windows on CPU; bfloat16 runs on CUDA"
        )
    rl = (
        LengthArgs(R, R, None, 0)
        if residual_length is None
        else resolve_length(residual_length, R, B, R, dev, "residual_length")
    )
    if ln.tensor is None and rl.tensor is None and ln.value == 0 and rl.value == 0:
        raise ValueError("nothing to attend to: length == 0 and no residual window")
    from turboquant.kernels.segmented import decode_attention_segmented, segmented_tables

    seg = segmented_tables(k_tables, v_tables, k_codes, v_codes)
    LAST_KERNEL["decode"] = "byte-columns" if seg is None else "segmented"
    if seg is not None:
        return decode_attention_segmented(
            query, k_codes, k_norms, v_codes, v_norms, ln, rl, *seg, scaling, residual_k,
            residual_v, k_outliers, v_outliers, workspace=workspace, block_n=block_n,
            num_splits=num_splits, num_warps=num_warps, programs_per_sm=programs_per_sm,
            backend=backend, cuda_config=cuda_config,
        )  # fmt: skip
    if backend == "cuda":
        raise ValueError(
            f"backend='cuda': layouts {k_tables.layout.name!r}/{v_tables.layout.name!r} at head_dim {d} "
            "run in the byte-column Triton kernel (rows are not whole 32-bit words); use "
            "backend='triton' or 'auto'"
        )
    if backend not in ("auto", "triton"):
        raise ValueError(f"`backend` must be one of 'auto', 'triton', 'cuda', got {backend!r}")
    num_warps, programs_per_sm = num_warps or 4, programs_per_sm or 3
    qk_scale = float(scaling) * LOG2E
    block_n = block_n or (64 if d <= 128 else 32)
    if ln.bound > 0:
        want = num_splits or max(1, (programs_per_sm * _num_sms(dev)) // (B * Hkv))
        chunk = triton.cdiv(triton.cdiv(ln.bound, want), block_n) * block_n
        S_C = triton.cdiv(ln.bound, chunk)
    else:
        chunk, S_C = block_n, 0
    chunk_r = 64
    S = S_C + triton.cdiv(R, chunk_r)
    qc = k_tables.rotate(query, k_outliers, repeat=G) * qk_scale  # [B, H_q, 1, d] float32
    m_part = buffer(workspace, "m", (B * Hkv, S, G), torch.float32, dev)
    l_part = buffer(workspace, "l", (B * Hkv, S, G), torch.float32, dev)
    acc_part = buffer(workspace, "acc", (B * Hkv, S, G, d), torch.float32, dev)
    out_c = buffer(workspace, "out_c", (B, Hq, 1, d), torch.float32, dev)
    out_r = buffer(workspace, "out_r", (B, Hq, 1, d), torch.float32, dev)
    if query.stride(-1) != 1:
        query = query.contiguous()
    kn = k_norms if k_tables.grouped else k_norms.unsqueeze(-1)
    vn = v_norms if v_tables.grouped else v_norms.unsqueeze(-1)
    rk = residual_k if R else query
    rv = residual_v if R else query
    lt = ln.tensor if ln.tensor is not None else k_tables.meta
    rt = rl.tensor if rl.tensor is not None else k_tables.meta
    _cs_partial_kernel[(S, B * Hkv)](
        qc,
        query,
        k_codes,
        kn,
        v_codes,
        vn,
        k_tables.meta,
        k_tables.centroids,
        v_tables.meta,
        v_tables.centroids,
        rk,
        rv,
        m_part,
        l_part,
        acc_part,
        lt,
        rt,
        ln.value,
        chunk,
        S_C,
        S,
        rl.value,
        chunk_r,
        Hkv,
        qk_scale,
        ln.stride,
        rl.stride,
        qc.stride(0),
        qc.stride(1),
        query.stride(0),
        query.stride(1),
        k_codes.stride(0),
        k_codes.stride(1),
        k_codes.stride(2),
        kn.stride(0),
        kn.stride(1),
        kn.stride(2),
        v_codes.stride(0),
        v_codes.stride(1),
        v_codes.stride(2),
        vn.stride(0),
        vn.stride(1),
        vn.stride(2),
        rk.stride(0),
        rk.stride(1),
        rk.stride(2),
        rv.stride(0),
        rv.stride(1),
        rv.stride(2),
        G=G,
        G_PAD=max(16, triton.next_power_of_2(G)),
        D=d,
        K_MAXB=k_tables.max_bits,
        V_MAXB=v_tables.max_bits,
        K_NORMS=k_tables.num_norms,
        V_NORMS=v_tables.num_norms,
        BLOCK_N=block_n,
        BLOCK_R=32 if d <= 128 else 16,
        RES_IEEE=bool(R) and rk.dtype == torch.float32,
        LEN_TENSOR=ln.tensor is not None,
        RLEN_TENSOR=rl.tensor is not None,
        num_warps=num_warps,
    )
    _cs_combine_kernel[(B * Hq,)](
        m_part, l_part, acc_part, out_c, out_r, S_C, S, Hq, G=G, D=d, BLOCK_S=16, num_warps=4
    )
    out = v_tables.unrotate(out_c, v_outliers, repeat=G) + out_r
    return out.transpose(1, 2).to(query.dtype)


def decode_attention_codespace_reference(
    query: torch.Tensor,
    k_codes: torch.Tensor,
    k_norms: torch.Tensor,
    v_codes: torch.Tensor,
    v_norms: torch.Tensor,
    length: int,
    k_tables: CodeSpaceTables,
    v_tables: CodeSpaceTables,
    scaling: float,
    residual_k: torch.Tensor | None = None,
    residual_v: torch.Tensor | None = None,
    k_outliers: torch.Tensor | None = None,
    v_outliers: torch.Tensor | None = None,
) -> torch.Tensor:
    """Materialising float32 reference: dequantize ``[0, length)`` to raw channels, append the
    residual window, GQA softmax attention. [B, H_q, 1, d] -> [B, 1, H_q, d] (query dtype)."""
    Hq = query.shape[1]
    Hkv = k_codes.shape[1]
    k = dequantize_codespace_reference(
        k_codes[:, :, :length], k_norms[:, :, :length], k_tables, k_outliers
    )
    v = dequantize_codespace_reference(
        v_codes[:, :, :length], v_norms[:, :, :length], v_tables, v_outliers
    )
    if residual_k is not None and residual_k.shape[2] > 0:
        k = torch.cat([k, residual_k.float()], dim=2)
        v = torch.cat([v, residual_v.float()], dim=2)
    g = Hq // Hkv
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    s = (query.float() @ k.transpose(-1, -2)) * scaling
    return (torch.softmax(s, dim=-1) @ v).transpose(1, 2).to(query.dtype)


__all__ = [
    "CodeSpaceTables",
    "as_codespace",
    "decode_attention_codespace",
    "decode_attention_codespace_reference",
    "dequantize_codespace",
    "dequantize_codespace_reference",
    "layout_reason",
    "quantize_pack_codespace",
    "unpack_codespace_reference",
]
