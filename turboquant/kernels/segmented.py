"""Decode attention for grouped (outlier) layouts with the halves kernel's word decoder.

A layout's groups ``G_1 .. G_m`` hold ``x̃_g = ||x_g|| Π_g^T c_g[idx_g]``. Every segment of the
layout (rotated coordinates at one bit width, bit-plane packed) is cut into *pieces* of a power of
two ``>= 32`` coordinates (d=256 ``paper-3.5``: outliers 64 @ 4 bits, rest 192 = 128 + 64 @ 3;
d=128: 32 @ 4, 96 = 64 + 32 @ 3). A piece's bit planes are whole 32-bit words of the row, so the
halves kernel's SWAR decoder (``_unpack_segment``: 2 integer ops a plane per 8 codes, one 4-byte
table load per code pair) reads it unchanged, with the piece's plane-0 offset and plane stride.
With the query rotated per group outside the kernel (``q̃_g = Π_g q_g``, code space),

    score(n) = Σ_g ||x_g(n)|| Σ_{s ∈ g} <q̃_s, c_s[idx_s(n)]>,
    acc_s   += Σ_n p_n ||v_g(s)(n)|| c_s[idx_s(n)]   (g(s): the group of piece s).

The kernel holds each piece in the decoder's bit-permuted coordinate order (``coord_perm``); the
wrapper permutes the rotated query into that order (:attr:`SegmentTables.positions`) and the
accumulated values back to code space before the per-group un-rotation + scatter
(:meth:`~turboquant.kernels.codespace.CodeSpaceTables.unrotate`). Nothing about the storage
changes: the pieces are read where :mod:`turboquant.layout` packs the segments. A layout runs here
when every segment starts on a 4-byte boundary and has planes of a multiple of 4 bytes (sizes a
multiple of 32 coordinates), so rows are whole words; others (d=64 outlier layouts: 16-channel
groups, rows of 26 bytes) run the byte-column kernel of :mod:`turboquant.kernels.codespace`.

Reads top to bottom: pieces and tables, Triton kernel, wrapper (the reference is
``decode_attention_codespace_reference``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from turboquant.kernels._common import HAS_TRITON, LOG2E, _pack_pairs, coord_perm
from turboquant.kernels.workspace import DecodeWorkspace, LengthArgs, buffer

if HAS_TRITON:
    import triton
    import triton.language as tl

    from turboquant.kernels.decode_attention import _residual_part, _unpack_segment

MAX_PIECES = 4  # pieces a row (constexpr slots of the kernel); d=256 needs at most 4
PIECE_MIN = 32  # coordinates: one 32-bit word a bit plane
PIECE_MAX = 128  # coordinates: the halves kernel's d/2 tile at d=256 (registers)
MAP_BN = 32  # output columns a program of the per-head map kernel

if TYPE_CHECKING:  # cuda_decode imports this package at run time
    from turboquant.kernels.cuda_decode import CudaConfig


# ------------------------------------------------------------------------------------------------
# pieces and tables
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """``size`` code-space coordinates from ``start`` at ``bits`` bits: plane ``j`` is bytes
    ``[base + j·stride, + size/8)`` of the row; codebook ``book`` (the layout's segment index),
    scaled by norm slot ``slot`` (its group)."""

    start: int
    size: int
    bits: int
    base: int
    stride: int
    book: int
    slot: int

    @property
    def spec(self) -> int:
        """The piece as one constexpr int for the kernel (decoded by ``_field``; 0 = no piece):
        ``bits + 8 (slot + 2 (book + 4 (log2 size + 16 (start + 1024 (base + 1024 stride)))))``."""
        log2 = self.size.bit_length() - 1
        return self.bits + 8 * (
            self.slot
            + 2
            * (self.book + 4 * (log2 + 16 * (self.start + 1024 * (self.base + 1024 * self.stride))))
        )


def layout_pieces(layout) -> tuple[Piece, ...] | str:
    """The pieces of ``layout`` in code-space order, or the reason the word decoder cannot
    read it."""
    if layout.code_nbytes % 4:
        return f"{layout.code_nbytes} code bytes a row (the word decoder reads whole 32-bit words)"
    out = []
    for g in layout.groups:
        for s in g.segments:
            book = layout.segments.index(s)
            if s.byte_start % 4 or s.plane_nbytes % 4:
                return (
                    f"segment [{s.start}, {s.stop}) at byte {s.byte_start} with "
                    f"{s.plane_nbytes}-byte planes (the word decoder needs 4-byte aligned planes: "
                    "segments of a multiple of 32 coordinates)"
                )
            left, off = s.size, 0
            while left:
                n = min(PIECE_MAX, 1 << (left.bit_length() - 1))
                out.append(
                    Piece(
                        s.start + off,
                        n,
                        s.bits,
                        s.byte_start + off // 8,
                        s.plane_nbytes,
                        book,
                        g.norm_slot,
                    )
                )
                left, off = left - n, off + n
    if len(out) > MAX_PIECES:
        return f"{len(out)} power-of-two pieces (the word decoder takes at most {MAX_PIECES})"
    if len(layout.segments) > 4:
        return f"{len(layout.segments)} codebooks (the word decoder takes at most 4)"
    return tuple(out)


@dataclass
class SegmentTables:
    """Device tables of one layout for the word-decoder kernel.

    Attributes:
        codespace: the layout's :class:`~turboquant.kernels.codespace.CodeSpaceTables` (rotation,
            channel order, norms); ``pieces``: :func:`layout_pieces`.
        lut32: int32 ``[segments, 256]``: code pair byte ``p`` ->
            ``f16(c[p & 15]) | f16(c[p >> 4]) << 16``.
        positions: long ``[d]``: the code-space coordinate the kernel holds at each position
            (each piece in ``coord_perm`` order, pieces in code-space order); ``inverse``: its
            inverse.
    """

    codespace: object
    pieces: tuple[Piece, ...]
    lut32: torch.Tensor
    positions: torch.Tensor
    inverse: torch.Tensor

    @property
    def specs(self) -> tuple[int, ...]:
        """:attr:`Piece.spec` of every kernel slot (0 past the last piece)."""
        return tuple(p.spec for p in self.pieces) + (0,) * (MAX_PIECES - len(self.pieces))

    @classmethod
    def of(cls, codespace) -> SegmentTables | None:
        """The tables of a :class:`CodeSpaceTables`' layout on its device, cached on it; None where
        :func:`layout_pieces` names a reason."""
        cache = codespace.__dict__.setdefault("_segmented", {})
        if "t" in cache:
            return cache["t"]
        pieces = layout_pieces(codespace.layout)
        tables = None
        if not isinstance(pieces, str):
            lut = torch.zeros(len(codespace.layout.segments), 2, 256)
            p = torch.arange(256)
            for i, s in enumerate(codespace.layout.segments):
                c = torch.zeros(16)
                cs = torch.as_tensor(s.codebook.centroids, dtype=torch.float32)
                c[: cs.numel()] = cs
                lut[i, 0], lut[i, 1] = c[p & 15], c[p >> 4]
            pos = torch.cat([coord_perm(pc.size) + pc.start for pc in pieces])
            dev = codespace.device
            tables = cls(
                codespace,
                pieces,
                _pack_pairs(lut.to(torch.float16)).to(dev),
                pos.to(dev),
                torch.argsort(pos).to(dev),
            )
        cache["t"] = tables
        return tables


def _word_rows(codes: torch.Tensor) -> bool:
    """Whether the rows of ``codes`` [B, H, cap, nbytes] can be read as int32 words."""
    return (
        codes.stride(-1) == 1
        and codes.stride(2) == codes.shape[-1]
        and all(s % 4 == 0 for s in codes.stride()[:3])
        and codes.storage_offset() % 4 == 0
        and codes.shape[2] * codes.shape[3] // 4 < 2**31
    )


def segmented_tables(k_tables, v_tables, k_codes, v_codes):
    """``(k, v)`` :class:`SegmentTables` when the word decoder can read both stores, else None."""
    kt, vt = SegmentTables.of(k_tables), SegmentTables.of(v_tables)
    if kt is None or vt is None or not _word_rows(k_codes) or not _word_rows(v_codes):
        return None
    return kt, vt


# ------------------------------------------------------------------------------------------------
# kernel
# ------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _load_q(q_rows, gmask, SPEC: tl.constexpr):
        # the pre-rotated, pre-scaled float32 query of one piece (kernel order): fp16 [G_PAD, N]
        N: tl.constexpr = 1 << ((SPEC // 64) % 16)
        OFF: tl.constexpr = (SPEC // 1024) % 1024
        offs = OFF + tl.arange(0, N)
        return tl.load(q_rows[:, None] + offs[None, :], mask=gmask[:, None], other=0.0).to(
            tl.float16
        )

    @triton.jit
    def _piece_codes(
        row_ptr, nmask, lut_ptr, SPEC: tl.constexpr, BLOCK_N: tl.constexpr, USE_ASM: tl.constexpr
    ):
        # unit-scale float16 centroids [BLOCK_N, N] of one piece (the halves word decoder)
        BITS: tl.constexpr = SPEC % 8
        BOOK: tl.constexpr = (SPEC // 16) % 4
        N: tl.constexpr = 1 << ((SPEC // 64) % 16)
        BASE: tl.constexpr = (SPEC // (1 << 20)) % 1024
        STRIDE: tl.constexpr = SPEC // (1 << 30)
        return _unpack_segment(
            row_ptr, nmask, lut_ptr + 256 * BOOK, BITS, BASE, STRIDE, N, BLOCK_N, USE_ASM
        )

    @triton.jit
    def _score(
        sc0,
        sc1,
        q,
        row_ptr,
        nmask,
        lut_ptr,
        SPEC: tl.constexpr,
        BLOCK_N: tl.constexpr,
        USE_ASM: tl.constexpr,
    ):
        # <q̃_s, c_s[idx]> [G_PAD, BLOCK_N] added to its group's partial score
        c = _piece_codes(row_ptr, nmask, lut_ptr, SPEC, BLOCK_N, USE_ASM)
        if (SPEC // 8) % 2 == 0:
            sc0 = tl.dot(q, tl.trans(c), sc0)
        else:
            sc1 = tl.dot(q, tl.trans(c), sc1)
        return sc0, sc1

    @triton.jit
    def _accumulate(
        acc,
        alpha,
        pv0,
        pv1,
        row_ptr,
        nmask,
        lut_ptr,
        SPEC: tl.constexpr,
        BLOCK_N: tl.constexpr,
        USE_ASM: tl.constexpr,
    ):
        # acc_s · alpha + (p · ||v_g||) c_s[idx]: a piece's value accumulator (kernel order)
        c = _piece_codes(row_ptr, nmask, lut_ptr, SPEC, BLOCK_N, USE_ASM)
        pv = pv0
        if (SPEC // 8) % 2 == 1:
            pv = pv1
        return tl.dot(pv, c, acc * alpha[:, None])

    @triton.jit
    def _zeros_acc(G_PAD: tl.constexpr, SPEC: tl.constexpr):
        N: tl.constexpr = 1 << ((SPEC // 64) % 16)
        return tl.zeros((G_PAD, N), dtype=tl.float32)

    @triton.jit
    def _store_acc(acc_ptr, part, gmask, acc, D: tl.constexpr, SPEC: tl.constexpr):
        N: tl.constexpr = 1 << ((SPEC // 64) % 16)
        OFF: tl.constexpr = (SPEC // 1024) % 1024
        offs = OFF + tl.arange(0, N)
        tl.store(acc_ptr + part[:, None] * D + offs[None, :], acc, mask=gmask[:, None])

    @triton.jit(do_not_specialize=["length", "chunk", "S_C", "S", "R", "chunk_r", "s_base"])
    def _seg_partial_kernel(
        qc_ptr, q_ptr, kc_ptr, kn_ptr, vc_ptr, vn_ptr, klut_ptr, vlut_ptr, rk_ptr, rv_ptr,
        m_ptr, l_ptr, acc_ptr, len_ptr, rlen_ptr,
        length, chunk, S_C, S, R, chunk_r, Hkv, qk_scale, s_base, len_sb, rlen_sb,
        sqc_b, sqc_h, sq_b, sq_h,
        skc_b, skc_h, skn_b, skn_h, skn_n,
        svc_b, svc_h, svn_b, svn_h, svn_n,
        srk_b, srk_h, srk_n, srv_b, srv_h, srv_n,
        G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
        KS0: tl.constexpr, KS1: tl.constexpr, KS2: tl.constexpr, KS3: tl.constexpr,
        VS0: tl.constexpr, VS1: tl.constexpr, VS2: tl.constexpr, VS3: tl.constexpr,
        K_NORMS: tl.constexpr, V_NORMS: tl.constexpr, K_ROW: tl.constexpr, V_ROW: tl.constexpr,
        K_ALIGN: tl.constexpr, V_ALIGN: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, USE_ASM: tl.constexpr, RES_IEEE: tl.constexpr,
        LEN_TENSOR: tl.constexpr, RLEN_TENSOR: tl.constexpr,
    ):  # fmt: skip
        # Programs [0, S_C): `chunk` packed tokens of one KV head, all G query heads of its group.
        #   Reads chunk · (K + V code bytes + 2 · groups norm bytes); writes G · (d + 2) float32
        #   partials (V rotated, kernel position order). qc_ptr: [B, H_q, d] float32, Π_g q_g per
        #   group in K's kernel position order, scaling · log2 e folded in.
        # Programs [S_C, S): `chunk_r` residual-window tokens, raw channels, full precision.
        # LEN_TENSOR / RLEN_TENSOR: valid lengths from device memory, clamped to the grid's bounds.
        # s_base: the grid's first split (S_C: only the residual splits, the CUDA kernel runs the rest).
        pid_s = tl.program_id(0) + s_base
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
            qrow = qc_ptr + b * sqc_b + (h * G + g) * sqc_h
            q0 = _load_q(qrow, gmask, KS0)
            if KS1 != 0:
                q1 = _load_q(qrow, gmask, KS1)
            if KS2 != 0:
                q2 = _load_q(qrow, gmask, KS2)
            if KS3 != 0:
                q3 = _load_q(qrow, gmask, KS3)
            m_i = tl.full((G_PAD,), float("-inf"), dtype=tl.float32)
            l_i = tl.zeros((G_PAD,), dtype=tl.float32)
            acc0 = _zeros_acc(G_PAD, VS0)
            if VS1 != 0:
                acc1 = _zeros_acc(G_PAD, VS1)
            if VS2 != 0:
                acc2 = _zeros_acc(G_PAD, VS2)
            if VS3 != 0:
                acc3 = _zeros_acc(G_PAD, VS3)
            kc_base = kc_ptr + tl.multiple_of(b * skc_b + h * skc_h, K_ALIGN)
            vc_base = vc_ptr + tl.multiple_of(b * svc_b + h * svc_h, V_ALIGN)
            kn_base = kn_ptr + b * skn_b + h * skn_h
            vn_base = vn_ptr + b * svn_b + h * svn_h
            for n0 in range(start, end, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                nmask = offs_n < end
                krow = kc_base + offs_n * K_ROW
                sc0 = tl.zeros((G_PAD, BLOCK_N), dtype=tl.float32)
                sc1 = tl.zeros((G_PAD, BLOCK_N), dtype=tl.float32)
                sc0, sc1 = _score(sc0, sc1, q0, krow, nmask, klut_ptr, KS0, BLOCK_N, USE_ASM)
                if KS1 != 0:
                    sc0, sc1 = _score(sc0, sc1, q1, krow, nmask, klut_ptr, KS1, BLOCK_N, USE_ASM)
                if KS2 != 0:
                    sc0, sc1 = _score(sc0, sc1, q2, krow, nmask, klut_ptr, KS2, BLOCK_N, USE_ASM)
                if KS3 != 0:
                    sc0, sc1 = _score(sc0, sc1, q3, krow, nmask, klut_ptr, KS3, BLOCK_N, USE_ASM)
                kn0 = tl.load(kn_base + offs_n * skn_n, mask=nmask, other=0.0).to(tl.float32)
                sc = sc0 * kn0[None, :]
                if K_NORMS == 2:
                    kn1 = tl.load(kn_base + offs_n * skn_n + 1, mask=nmask, other=0.0).to(
                        tl.float32
                    )
                    sc += sc1 * kn1[None, :]
                sc = tl.where(nmask[None, :], sc, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(sc, axis=1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(sc - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                vn0 = tl.load(vn_base + offs_n * svn_n, mask=nmask, other=0.0).to(tl.float32)
                pv0 = (p * vn0[None, :]).to(tl.float16)
                pv1 = pv0
                if V_NORMS == 2:
                    vn1 = tl.load(vn_base + offs_n * svn_n + 1, mask=nmask, other=0.0).to(
                        tl.float32
                    )
                    pv1 = (p * vn1[None, :]).to(tl.float16)
                vrow = vc_base + offs_n * V_ROW
                acc0 = _accumulate(
                    acc0, alpha, pv0, pv1, vrow, nmask, vlut_ptr, VS0, BLOCK_N, USE_ASM
                )
                if VS1 != 0:
                    acc1 = _accumulate(
                        acc1, alpha, pv0, pv1, vrow, nmask, vlut_ptr, VS1, BLOCK_N, USE_ASM
                    )
                if VS2 != 0:
                    acc2 = _accumulate(
                        acc2, alpha, pv0, pv1, vrow, nmask, vlut_ptr, VS2, BLOCK_N, USE_ASM
                    )
                if VS3 != 0:
                    acc3 = _accumulate(
                        acc3, alpha, pv0, pv1, vrow, nmask, vlut_ptr, VS3, BLOCK_N, USE_ASM
                    )
                m_i = m_new
            tl.store(m_ptr + part, m_i, mask=gmask)
            tl.store(l_ptr + part, l_i, mask=gmask)
            _store_acc(acc_ptr, part, gmask, acc0, D, VS0)
            if VS1 != 0:
                _store_acc(acc_ptr, part, gmask, acc1, D, VS1)
            if VS2 != 0:
                _store_acc(acc_ptr, part, gmask, acc2, D, VS2)
            if VS3 != 0:
                _store_acc(acc_ptr, part, gmask, acc3, D, VS3)
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


    @triton.jit(do_not_specialize=["Hq"])
    def _head_map_kernel(
        x_ptr, m_ptr, add_ptr, out_ptr, Hq, sx_b, sx_h, so_b, so_h,
        G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
        PER_HEAD: tl.constexpr, HAS_ADD: tl.constexpr,
    ):  # fmt: skip
        # Program (sequence b, KV head h, column block n): for the G query heads i of the group,
        # out[b, h·G + i, n·BN : (n+1)·BN] = float32 x[b, h·G + i] @ M[h][:, block] (+ add[b, h·G + i,
        # block], a contiguous [B, H_q, D] float32), in out's dtype. M [H_kv or 1, D, D]: a whole
        # per-head map (gather, per-group rotation, order, scale) in one float32 product
        # ("tf32x3": each float32 operand split into a TF32 head and tail, three tensor-core
        # products, error ~2^-21 relative, instead of IEEE fp32 FMA loops).
        pid = tl.program_id(0)
        n0 = tl.program_id(1) * BN
        Hkv = Hq // G
        b = (pid // Hkv).to(tl.int64)
        h = pid % Hkv
        gi = tl.arange(0, G_PAD)
        gmask = gi < G
        offs_d = tl.arange(0, D)
        cols = n0 + tl.arange(0, BN)
        x = tl.load(
            x_ptr + (b * sx_b + (h * G + gi) * sx_h)[:, None] + offs_d[None, :],
            mask=gmask[:, None], other=0.0,
        ).to(tl.float32)  # fmt: skip
        m_base = m_ptr
        if PER_HEAD:
            m_base = m_ptr + h.to(tl.int64) * D * D
        m = tl.load(m_base + offs_d[:, None] * D + cols[None, :])
        y = tl.dot(x, m, input_precision="tf32x3")
        if HAS_ADD:
            rows = (b * Hq + h * G + gi) * D
            y += tl.load(add_ptr + rows[:, None] + cols[None, :], mask=gmask[:, None], other=0.0)
        dst = out_ptr + (b * so_b + (h * G + gi) * so_h)[:, None] + cols[None, :]
        tl.store(dst, y.to(out_ptr.dtype.element_ty), mask=gmask[:, None])


# ------------------------------------------------------------------------------------------------
# the per-head maps around the kernels: raw query -> kernel query, kernel output -> raw channels
# ------------------------------------------------------------------------------------------------
def _cached_map(seg, tag: str, outliers, extra: tuple, build):
    """``build()`` cached on ``seg`` per outliers tensor (:func:`codespace.cached_per_outliers`)."""
    from turboquant.kernels.codespace import cached_per_outliers

    return cached_per_outliers(seg.__dict__.setdefault("_maps", {}), (tag, *extra), outliers, build, 32)


def query_map(k_seg: SegmentTables, outliers, hkv: int, qk_scale: float, code_order: bool, device) -> torch.Tensor:
    """float32 ``R`` [H_kv (outlier layouts) or 1, d, d] with ``q @ R[h]`` = ``qk_scale · [Π_g q_g]_g``
    of a raw query row of KV head ``h``: in code space (``code_order``: the CUDA kernel) or in the
    Triton kernel's position order (:attr:`SegmentTables.positions`)."""
    kt = k_seg.codespace

    def build():
        d = kt.d
        eye = torch.eye(d, device=device)
        r = kt.rotate(eye.expand(hkv, d, d), outliers) if kt.grouped else kt.rotate(eye.unsqueeze(0))
        if not code_order:
            r = r.index_select(-1, k_seg.positions.to(device))
        return (r * qk_scale).contiguous()

    return _cached_map(k_seg, "R", outliers, (hkv, float(qk_scale), code_order, str(device)), build)


def output_map(v_seg: SegmentTables, outliers, hkv: int, device) -> torch.Tensor:
    """float32 ``U`` [H_kv (outlier layouts) or 1, d, d] with ``y @ U[h]`` = the raw-channel vector
    of a kernel-order (:attr:`SegmentTables.positions`) code-space output row of KV head ``h``:
    per-group ``Π_g^T`` and the scatter back to the channels."""
    vt = v_seg.codespace

    def build():
        d = vt.d
        y = torch.eye(d, device=device).index_select(-1, v_seg.inverse.to(device))  # row t: position t
        u = vt.unrotate(y.expand(hkv, d, d), outliers) if vt.grouped else vt.unrotate(y.unsqueeze(0))
        return u.contiguous()

    return _cached_map(v_seg, "U", outliers, (hkv, str(device)), build)


# ------------------------------------------------------------------------------------------------
# the CUDA kernel for the compressed splits
# ------------------------------------------------------------------------------------------------
# backend="auto" runs the CUDA kernel from this many packed token-heads (B · H_kv · length) up. H200
# 2026-12-01 (results/gpu_decode_attention_layouts*.json): at 1 x 8k (32768) the CUDA kernel takes
# 42.9 us a call (graph) against 61.5 us for the Triton word decoder; smaller sizes not compared.
AUTO_CUDA_MIN_TOKEN_HEADS = 32768
_CUDA_LAUNCHES: dict = {}  # cuda_decode.PartialLaunch per call structure (addresses, shapes), oldest first
MAX_CUDA_LAUNCHES = 64


def _cuda_launch(qcs, k_codes, k_norms, v_codes, v_norms, ln, kt, vt, few: bool, backend: str, config: CudaConfig | None = None):
    """The CUDA kernel's launch for the compressed splits of this call (``qcs``: the rotated,
    scaled float32 query [B, H_q, d]), or None where the Triton kernel runs them."""
    from turboquant.kernels import cuda_decode

    cuda_decode.check_backend(backend)
    if backend == "triton":
        return None
    B, Hq, d = qcs.shape
    Hkv = k_codes.shape[1]
    if ln.bound == 0:
        return None
    if backend == "auto" and B * Hkv * ln.bound < AUTO_CUDA_MIN_TOKEN_HEADS:
        return None  # below the measured crossover the Triton kernel is as fast or faster
    lk = cuda_decode.len_kind(ln.tensor)
    key = (id(kt), id(vt), few, lk, config, qcs.device, tuple(qcs.shape),
           qcs.stride()[:2], *((t.data_ptr(), tuple(t.shape), t.stride()) for t in (k_codes, k_norms, v_codes, v_norms)))
    launch = _CUDA_LAUNCHES.get(key)  # a hit passed the checks below with these very tensors
    if launch is None:
        why = cuda_decode.unsupported(d, Hq // Hkv, kt, vt, k_codes, v_codes, k_norms, v_norms)
        launch = cuda_decode.choose(
            backend, why, lambda: cuda_decode.PartialLaunch(qcs, k_codes, k_norms, v_codes, v_norms, kt, vt, 1.0,
                                                            few, lk, config), stacklevel=5)
        if launch is None:
            return None
        if len(_CUDA_LAUNCHES) >= MAX_CUDA_LAUNCHES:
            del _CUDA_LAUNCHES[next(iter(_CUDA_LAUNCHES))]
        _CUDA_LAUNCHES[key] = (launch, kt, vt)  # holds the tables so their id()s stay unique
        return launch
    return launch[0]


# ------------------------------------------------------------------------------------------------
# wrapper
# ------------------------------------------------------------------------------------------------
def decode_attention_segmented(
    query: torch.Tensor,
    k_codes: torch.Tensor,
    k_norms: torch.Tensor,
    v_codes: torch.Tensor,
    v_norms: torch.Tensor,
    ln: LengthArgs,
    rl: LengthArgs,
    k_seg: SegmentTables,
    v_seg: SegmentTables,
    scaling: float,
    residual_k: torch.Tensor | None,
    residual_v: torch.Tensor | None,
    k_outliers: torch.Tensor | None,
    v_outliers: torch.Tensor | None,
    workspace: DecodeWorkspace | None = None,
    block_n: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    programs_per_sm: int | None = None,
    backend: str = "auto",
    cuda_config: CudaConfig | None = None,
) -> torch.Tensor:
    """The word-decoder decode of :func:`~turboquant.kernels.codespace.decode_attention_codespace`
    (which validates the arguments and resolves ``ln``/``rl`` first): ``[B, 1, H_q, d]``.

    Launch shapes as the halves kernel: few KV heads in flight (``B·H_kv < 16``) take 128-token
    blocks, 8 warps, 2 programs an SM; else 64 tokens, 4 warps, 3 programs an SM. ``backend``:
    "cuda" runs the compressed splits in the CUDA kernel of :mod:`turboquant.kernels.cuda_decode`
    (the query rotated per group here, partials in this kernel's position order; raises where it
    does not apply), "auto" does where it applies from ``AUTO_CUDA_MIN_TOKEN_HEADS`` packed token-
    heads up, "triton" never. The residual window and the combine always run in Triton.
    ``cuda_config``: the CUDA kernel's :class:`~turboquant.kernels.cuda_decode.CudaConfig` (None: its default)."""
    from turboquant.kernels.codespace import LAST_KERNEL, _cs_combine_kernel
    from turboquant.kernels.decode_attention import (
        _fork_side_stream,
        _num_sms,
        _raw_stream,
        _slab_align,
    )

    B, Hq, _, d = query.shape
    Hkv = k_codes.shape[1]
    G = Hq // Hkv
    dev = query.device
    kt, vt = k_seg.codespace, v_seg.codespace
    R = 0 if residual_k is None else residual_k.shape[2]
    few = B * Hkv < 16
    kn = k_norms if kt.grouped else k_norms.unsqueeze(-1)
    vn = v_norms if vt.grouped else v_norms.unsqueeze(-1)
    qk_scale = float(scaling) * LOG2E
    # Π_g q_g per group, scaled to log2 units: [B, H_q, d] float32 (filled below), in code space for
    # the CUDA kernel, in K's kernel position order for the Triton one
    qc = buffer(workspace, "qc", (B, Hq, d), torch.float32, dev)
    cuda = _cuda_launch(qc, k_codes, k_norms, v_codes, v_norms, ln, kt, vt, few, backend, cuda_config)
    if cuda is not None:  # a CTA step = warps x 16-token tiles, the CUDA kernel's split count
        from turboquant.kernels import cuda_decode

        shape = cuda_decode.launch_shape(few, cuda_config)
        block_n, programs_per_sm = 16 * shape["warps"], programs_per_sm or shape["programs_per_sm"]
    block_n = block_n or (128 if few else 64)
    num_warps = num_warps or (8 if few else 4)
    programs_per_sm = programs_per_sm or (2 if few else 3)
    if ln.bound > 0:
        want = num_splits or max(1, (programs_per_sm * _num_sms(dev)) // (B * Hkv))
        chunk = triton.cdiv(triton.cdiv(ln.bound, want), block_n) * block_n
        S_C = triton.cdiv(ln.bound, chunk)
    else:
        chunk, S_C = block_n, 0
    chunk_r = 64
    S = S_C + triton.cdiv(R, chunk_r)
    m_part = buffer(workspace, "m", (B * Hkv, S, G), torch.float32, dev)
    l_part = buffer(workspace, "l", (B * Hkv, S, G), torch.float32, dev)
    acc_part = buffer(workspace, "acc", (B * Hkv, S, G, d), torch.float32, dev)
    out_c = buffer(workspace, "out_c", (B, Hq, d), torch.float32, dev)
    out_r = buffer(workspace, "out_r", (B, Hq, d), torch.float32, dev)
    out = buffer(workspace, "out", (B, 1, Hq, d), query.dtype, dev)
    if query.stride(-1) != 1:
        query = query.contiguous()
    g_pad = max(16, triton.next_power_of_2(G))
    kc32, vc32 = k_codes.view(torch.int32), v_codes.view(torch.int32)
    rk = residual_k if R else query
    rv = residual_v if R else query
    lt = ln.tensor if ln.tensor is not None else kn
    rt = rl.tensor if rl.tensor is not None else kn
    ks, vs = k_seg.specs, v_seg.specs
    s_base = S_C if cuda is not None else 0  # the CUDA kernel fills the compressed splits

    def triton_splits():  # splits [s_base, S): every split, or only the residual window's (raw query)
        _seg_partial_kernel[(S - s_base, B * Hkv)](
            qc, query, kc32, kn, vc32, vn, k_seg.lut32, v_seg.lut32, rk, rv, m_part, l_part, acc_part,
            lt, rt, ln.value, chunk, S_C, S, rl.value, chunk_r, Hkv, qk_scale, s_base, ln.stride, rl.stride,
            qc.stride(0), qc.stride(1), query.stride(0), query.stride(1),
            kc32.stride(0), kc32.stride(1), kn.stride(0), kn.stride(1), kn.stride(2),
            vc32.stride(0), vc32.stride(1), vn.stride(0), vn.stride(1), vn.stride(2),
            rk.stride(0), rk.stride(1), rk.stride(2), rv.stride(0), rv.stride(1), rv.stride(2),
            G=G, G_PAD=g_pad, D=d,
            KS0=ks[0], KS1=ks[1], KS2=ks[2], KS3=ks[3], VS0=vs[0], VS1=vs[1], VS2=vs[2], VS3=vs[3],
            K_NORMS=kt.num_norms, V_NORMS=vt.num_norms,
            K_ROW=kt.code_nbytes // 4, V_ROW=vt.code_nbytes // 4,
            K_ALIGN=_slab_align(kc32), V_ALIGN=_slab_align(vc32),
            BLOCK_N=64 if cuda is not None else block_n, BLOCK_R=32 if d <= 128 else 16, USE_ASM=dev.type == "cuda",
            RES_IEEE=bool(R) and rk.dtype == torch.float32,
            LEN_TENSOR=ln.tensor is not None, RLEN_TENSOR=rl.tensor is not None,
            num_warps=num_warps,
        )  # fmt: skip

    # while a CUDA graph is captured, the residual window's splits (they read the raw query, not
    # the mapped one) run on a forked stream beside the query map and the CUDA kernel, as on the
    # halves path (free at replay; eager, the fork's stream and event calls cost more host time
    # than the overlap saves)
    side = None
    if cuda is not None and S > s_base and torch.cuda.is_current_stream_capturing():
        cur, side = _fork_side_stream(dev)
        with torch.cuda.stream(side):
            triton_splits()
    qmap = query_map(k_seg, k_outliers, Hkv, qk_scale, cuda is not None, dev)
    _head_map_kernel[(B * Hkv, d // MAP_BN)](
        query, qmap, qc, qc, Hq, query.stride(0), query.stride(1), qc.stride(0), qc.stride(1),
        G=G, G_PAD=g_pad, D=d, BN=MAP_BN, PER_HEAD=qmap.shape[0] > 1, HAS_ADD=False, num_warps=4,
    )  # fmt: skip
    if cuda is not None:
        LAST_KERNEL["decode"] = "segmented+cuda"
        cuda(qc.data_ptr(), m_part.data_ptr(), l_part.data_ptr(), acc_part.data_ptr(), ln.value, chunk, S_C, S,
             _raw_stream(dev), 0 if ln.tensor is None else ln.tensor.data_ptr(), ln.stride)
    if side is not None:
        cur.wait_stream(side)
    elif S > s_base:
        triton_splits()
    _cs_combine_kernel[(B * Hq,)](
        m_part, l_part, acc_part, out_c, out_r, S_C, S, Hq, G=G, D=d, BLOCK_S=16, num_warps=4
    )
    # V kernel order -> V code space -> per-group Π_g^T -> raw channels, + the residual part
    umap = output_map(v_seg, v_outliers, Hkv, dev)
    _head_map_kernel[(B * Hkv, d // MAP_BN)](
        out_c, umap, out_r, out, Hq, out_c.stride(0), out_c.stride(1), out.stride(0), out.stride(2),
        G=G, G_PAD=g_pad, D=d, BN=MAP_BN, PER_HEAD=umap.shape[0] > 1, HAS_ADD=True, num_warps=4,
    )  # fmt: skip
    return out


__all__ = [
    "MAX_PIECES",
    "Piece",
    "SegmentTables",
    "decode_attention_segmented",
    "layout_pieces",
    "segmented_tables",
]
