"""Decode attention directly over TurboQuant packed codes (flash-decoding, GQA, residual window).

For one new query token per sequence, ``out = softmax(q K^T · scaling) V`` where the first
``length`` keys/values are TurboQuant codes (``PackedStore``, bit planes, rotated domain) and
the last ``R`` are the full-precision residual window. Values are TurboQuant-mse; keys are
TurboQuant-mse or TurboQuant-prod (MSE at ``b-1`` bits + QJL, :class:`KeyQJL`), scored as

    <q, k̃> = ||k|| (Π q)·c[idx]  +  √(π/2)/d · ||r|| · (S q)·z,   z = sign(S r) ∈ {±1}^d.

Nothing is dequantized to memory:

1. split-K partial kernel, grid ``(splits, B·H_kv)``: each program rotates the group's queries in
   registers (FWHT, ``Π_k q · scaling · log2 e``), streams a chunk of packed rows of one KV head,
   unpacks both segments into centroid values in registers (SWAR over 32-bit words of the bit
   planes, then one table load per code pair), scores all ``G = H_q/H_kv`` query heads of the group
   with one tensor-core product (``score = (q_rot · c[idx]) · ||k||``), runs the online softmax and
   accumulates ``p · ||v|| · c[idx_v]`` in the *rotated* value domain. Extra programs take the
   residual window (full precision, original domain) in chunks of 64 tokens. Prod keys (constexpr
   ``K_QJL``; the MSE-only kernel compiles to the same code as without it): the wrapper computes
   ``S q`` once a call (one small torch matmul, pre-scaled to log2 units, float16); per block the
   program expands the QJL bits (``d/32`` int32 words a row, word ``w`` bit ``j`` = coordinate
   ``32w + j``) one word column at a time to ±1 float16, accumulates ``(S q) z^T`` with
   tensor-core products (K = 32) and adds it times ``||r||`` to the score;
2. combine kernel, grid ``(B·H_q,)``: merges all splits with one softmax denominator, un-rotates
   the compressed part once per head (FWHT, ``Π_v^T``) and adds the residual part.

Two launches, no [d, d] matrices, no host synchronisation (CUDA-graph capturable).

Memory traffic per KV head and token: ``2 · (d·bits/8 + 2)`` bytes (K and V codes + norms), i.e.
228 B at d=256 / 3.5 bits against 1024 B for bf16 K/V (4.5x less); prod keys add 2 B (``||r||``)
at the same bit width (``d(b-1)/8`` code bytes + ``d/8`` QJL bytes); partials add
``splits · G · (d + 2) · 4`` bytes a KV head, written once and read once. The CUDA kernel
(:mod:`turboquant.kernels.cuda_decode`) has no QJL path: prod keys always run in Triton.

Host work a call (eager decode is host-bound otherwise): the wrapper validates a call structure
once and keeps a *launch plan* (:func:`_plan_key`: shapes, strides, dtypes, addresses of the stored
tensors, tables, options), so a repeated call only checks its lengths and residual rows, computes
the split grid and launches the two compiled kernels directly (:mod:`turboquant.kernels.fast_launch`)
with no torch op of its own (one new output without a workspace). A store that grows or
reallocates has other addresses/shapes: a new plan. ``PLAN_CACHE = False`` validates every call.

Reads top to bottom: pure-torch reference, Triton kernels, launch plans, wrapper.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from turboquant.kernels._common import (
    HAS_TRITON,
    LOG2E,
    KernelTables,
    check_head_dim,
    on_input_device,
)
from turboquant.kernels.fast_launch import LaunchCache, int_spec, ptr_spec
from turboquant.kernels.workspace import DecodeWorkspace, LengthArgs, buffer, resolve_length
from turboquant.packing import unpack_bits

if HAS_TRITON:
    import triton
    import triton.language as tl

    from turboquant.kernels._common import fwht_tile

if TYPE_CHECKING:  # cuda_decode imports this package at run time
    from turboquant.kernels.cuda_decode import CudaConfig


# ------------------------------------------------------------------------------------------------
# TurboQuant-prod keys: the QJL part
# ------------------------------------------------------------------------------------------------
@dataclass
class KeyQJL:
    """The QJL part of TurboQuant-prod keys (the MSE part at ``b-1`` bits is ``k_codes``/``k_norms``).

    ``k̃ = ||k|| Π^T c[idx] + scale · ||r|| · S^T z`` with ``z = sign(S r)``, ``r`` the MSE residual.

    Attributes:
        qjl: uint8 ``[B, H_kv, capacity, d/8]``: ``z`` as one bit plane (bit ``j`` of byte ``k`` =
            coordinate ``8k + j``, 1 = +1, 0 = -1; ``PackedStore.qjl``).
        rnorms: float16 ``[B, H_kv, capacity]``: ``||r||`` (``PackedStore.rnorms``).
        S: float32 ``[d, d]`` QJL matrix on the query's device (``TurboQuantProd.S``, ``TensorCodec.S``).
        scale: ``√(π/2)/d`` (``TurboQuantProd.qjl_scale``).
    """

    qjl: torch.Tensor
    rnorms: torch.Tensor
    S: torch.Tensor
    scale: float

    @classmethod
    def from_store(cls, store) -> KeyQJL:
        """From a prod-mode ``PackedStore`` (``.qjl``, ``.rnorms``, ``.codec.S``, ``.codec.qjl_scale``)."""
        codec = getattr(store, "codec", None)
        if getattr(codec, "S", None) is None:
            raise ValueError("the key store holds QJL codes but its `codec` has no QJL matrix `S`")
        return cls(qjl=store.qjl, rnorms=store.rnorms, S=codec.S, scale=float(codec.qjl_scale))

    def dequantize(self, length: int) -> torch.Tensor:
        """``scale · ||r|| · S^T z`` float32 ``[B, H_kv, length, d]`` (row vectors: ``z @ S``)."""
        d = self.S.shape[0]
        z = unpack_bits(self.qjl[:, :, :length].contiguous(), 1, d).to(torch.float32) * 2 - 1
        rn = self.rnorms[:, :, :length].to(torch.float32).unsqueeze(-1)
        return self.scale * rn * (z @ self.S.to(device=z.device, dtype=torch.float32))


# ------------------------------------------------------------------------------------------------
# reference
# ------------------------------------------------------------------------------------------------
def unpack_rotated_reference(codes: torch.Tensor, norms: torch.Tensor, tables: KernelTables) -> torch.Tensor:
    """``||x|| c[idx]`` float32 [..., d] (rotated domain) from packed codes, via ``packing.unpack_bits``."""
    d, half = tables.d, tables.d // 2
    (ba, _, sa), (bb, _, _) = tables.seg
    if sa == d // 8:
        idx = unpack_bits(codes, ba, d).long()
        ia, ib = idx[..., :half], idx[..., half:]
    else:
        na = half * ba // 8
        ia = unpack_bits(codes[..., :na].contiguous(), ba, half).long()
        ib = unpack_bits(codes[..., na:].contiguous(), bb, half).long()
    cen = tables.centroids.to(codes.device)
    vals = torch.cat([cen[0][ia], cen[1][ib]], dim=-1)
    return vals * norms.to(torch.float32).unsqueeze(-1)


def decode_attention_reference(
    query: torch.Tensor,
    k_codes: torch.Tensor,
    k_norms: torch.Tensor,
    v_codes: torch.Tensor,
    v_norms: torch.Tensor,
    length: int,
    k_tables: KernelTables,
    v_tables: KernelTables,
    scaling: float,
    residual_k: torch.Tensor | None = None,
    residual_v: torch.Tensor | None = None,
    k_qjl: KeyQJL | None = None,
) -> torch.Tensor:
    """Materialising float32 reference: dequantize ``[0, length)``, append the residual window,
    GQA softmax attention. ``query`` [B, H_q, 1, d] -> [B, 1, H_q, d] (query dtype). With
    ``k_qjl`` (prod keys) ``k̃ = ||k|| Π^T c[idx] + √(π/2)/d · ||r|| · S^T z``."""
    Hq = query.shape[1]
    Hkv = k_codes.shape[1]
    dev = query.device
    k = unpack_rotated_reference(k_codes[:, :, :length], k_norms[:, :, :length], k_tables) @ k_tables.rot.to(dev)
    if k_qjl is not None:
        k = k + k_qjl.dequantize(length).to(dev)
    v = unpack_rotated_reference(v_codes[:, :, :length], v_norms[:, :, :length], v_tables) @ v_tables.rot.to(dev)
    if residual_k is not None and residual_k.shape[2] > 0:
        k = torch.cat([k, residual_k.to(torch.float32)], dim=2)
        v = torch.cat([v, residual_v.to(torch.float32)], dim=2)
    g = Hq // Hkv
    k = k.repeat_interleave(g, dim=1)
    v = v.repeat_interleave(g, dim=1)
    s = (query.to(torch.float32) @ k.transpose(-1, -2)) * scaling
    out = torch.softmax(s, dim=-1) @ v  # [B, Hq, Tq, d]
    return out.transpose(1, 2).to(query.dtype)


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _perm_coords(D2: tl.constexpr):
        # tile position p = ((((((w*2 + l)*2 + t)*2 + u)*2 + v)*2 + h) holds segment coordinate
        # 32w + 8(2v + u) + (2t + l) + 4h  (see _unpack_segment)
        p = tl.arange(0, D2)
        h = p % 2
        v = (p // 2) % 2
        u = (p // 4) % 2
        t = (p // 8) % 2
        l = (p // 16) % 2
        return 32 * (p // 32) + 8 * (2 * v + u) + 2 * t + l + 4 * h

    @triton.jit
    def _pairs(acc, wj, I: tl.constexpr, J: tl.constexpr):
        # bit J of codes (8k+I, 8k+I+4) of every byte k of plane word wj -> bits (J, J+4) of byte k
        if J >= I:
            x = wj << (J - I)
        else:
            x = wj >> (I - J)
        return acc | (x & (0x11111111 << J))

    @triton.jit
    def _lookup(lut_ptr, a, B: tl.constexpr):
        # byte B of every word: a code pair -> packed float16 centroid pair (one 4-byte L1 load)
        return tl.load(lut_ptr + ((a >> (8 * B)) & 0xFF).to(tl.int32))

    @triton.jit
    def _join4(x0, x1, x2, x3):
        # [...] x4 -> [..., 2, 2]: element [..., l, t] = x_{2t + l}
        return tl.join(tl.join(x0, x1), tl.join(x2, x3))

    @triton.jit
    def _unpack_segment(row_ptr, nmask, lut_ptr, BITS: tl.constexpr, BASE: tl.constexpr,
                        STRIDE: tl.constexpr, D2: tl.constexpr, BLOCK_N: tl.constexpr,
                        USE_ASM: tl.constexpr):
        """Centroid values (float16, unit scale) of one segment of ``BLOCK_N`` packed rows, in the
        coordinate order of ``_perm_coords``. ``row_ptr``: int32 pointers to the row starts.

        Reads ``BITS · d2/8`` bytes a row as 32-bit words (one coalesced pass). SWAR: for each
        bit position I in 0..3, ``(w >> I) & 0x11111111`` takes bit J of the codes (8k+I, 8k+I+4)
        of every byte k; shifted to bits (J, J+4) and OR-ed over the planes, each byte ends up
        holding the code pair (8k+I | 8k+I+4 << 4): 2 integer ops per plane per 8 codes. Each
        byte indexes a 256-entry table of packed float16 pairs (c[lo], c[hi]): one L1-resident
        4-byte load per two coordinates, no nibble arithmetic. Every word stays in one thread.
        (Tried: two loads from a 32-byte float16 table per pair instead: 1.9x slower on H100.)
        """
        W: tl.constexpr = D2 // 32
        offs_w = tl.arange(0, W)
        a0 = tl.zeros((BLOCK_N, W), dtype=tl.uint32)
        a1 = tl.zeros((BLOCK_N, W), dtype=tl.uint32)
        a2 = tl.zeros((BLOCK_N, W), dtype=tl.uint32)
        a3 = tl.zeros((BLOCK_N, W), dtype=tl.uint32)
        for j in tl.static_range(BITS):
            wj = tl.load(row_ptr[:, None] + (BASE + j * STRIDE) // 4 + offs_w[None, :], mask=nmask[:, None], other=0)
            wj = wj.to(tl.uint32, bitcast=True)
            a0 = _pairs(a0, wj, 0, j)
            a1 = _pairs(a1, wj, 1, j)
            a2 = _pairs(a2, wj, 2, j)
            a3 = _pairs(a3, wj, 3, j)
        # 16 lookups per word set: byte B of a_I -> [BLOCK_N, W, 2(l), 2(t), 2(u), 2(v)], I = 2t+l, B = 2v+u
        p0 = _join4(_lookup(lut_ptr, a0, 0), _lookup(lut_ptr, a1, 0), _lookup(lut_ptr, a2, 0), _lookup(lut_ptr, a3, 0))
        p1 = _join4(_lookup(lut_ptr, a0, 1), _lookup(lut_ptr, a1, 1), _lookup(lut_ptr, a2, 1), _lookup(lut_ptr, a3, 1))
        p2 = _join4(_lookup(lut_ptr, a0, 2), _lookup(lut_ptr, a1, 2), _lookup(lut_ptr, a2, 2), _lookup(lut_ptr, a3, 2))
        p3 = _join4(_lookup(lut_ptr, a0, 3), _lookup(lut_ptr, a1, 3), _lookup(lut_ptr, a2, 3), _lookup(lut_ptr, a3, 3))
        pair = _join4(p0, p1, p2, p3)
        if USE_ASM:
            lo, hi = tl.inline_asm_elementwise(
                asm="mov.b32 {$0, $1}, $2;", constraints="=h,=h,r", args=[pair],
                dtype=(tl.float16, tl.float16), is_pure=True, pack=1,
            )
        else:
            lo = (pair & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
            hi = (pair >> 16).to(tl.int16).to(tl.float16, bitcast=True)
        return tl.reshape(tl.join(lo, hi), (BLOCK_N, D2))

    @triton.jit
    def _natural(D: tl.constexpr):
        # natural coordinate held at each kernel position: segment (top bit) kept, _perm_coords inside
        D2: tl.constexpr = D // 2
        k = tl.arange(0, D)
        p = k % D2
        coord = 32 * (p // 32) + 8 * (2 * ((p // 2) % 2) + (p // 4) % 2) + 2 * ((p // 8) % 2) + (p // 16) % 2 + 4 * (p % 2)
        return (k // D2) * D2 + coord

    @triton.jit
    def _qjl_scores(row_ptr, nmask, sq_rows, gmask, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
        """``(S q) · z`` float32 [G_PAD, BLOCK_N] for ``BLOCK_N`` QJL rows (``row_ptr``: int32
        pointers to the row starts, ``d/32`` words a row; word ``w`` bit ``j`` = coordinate
        ``32w + j``). One word column at a time: bits -> ±1 float16 [BLOCK_N, 32], one tensor-core
        product with the matching 32 coordinates of ``S q`` (float16 rows ``sq_rows``, L1-resident),
        so only a [32, BLOCK_N] tile is expanded at once. (Offline ptxas, sm_90, d=256, 64 tokens,
        4 warps: one [BLOCK_N, d] tile and one product took 255 registers + stack; this form 188,
        against 134 for the mse-only kernel.)"""
        offs_j = tl.arange(0, 32)
        acc = tl.zeros((G_PAD, BLOCK_N), dtype=tl.float32)
        for w in tl.static_range(D // 32):
            word = tl.load(row_ptr + w, mask=nmask, other=0)
            zt = (((word[None, :] >> offs_j[:, None]) & 1) * 2 - 1).to(tl.float16)  # [32, BLOCK_N]
            sq = tl.load(sq_rows[:, None] + (32 * w + offs_j)[None, :], mask=gmask[:, None], other=0.0)
            acc = tl.dot(sq.to(tl.float16), zt, acc)
        return acc

    @triton.jit
    def _residual_part(q_rows, gmask, part, rk_ptr, rv_ptr, m_ptr, l_ptr, acc_ptr, b, h, pid_s, S_C, R, chunk_r,
                       qk_scale, srk_b, srk_h, srk_n, srv_b, srv_h, srv_n,
                       G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr, RES_IEEE: tl.constexpr):
        r0 = (pid_s - S_C) * chunk_r
        r1 = tl.minimum(r0 + chunk_r, R)
        offs_d = tl.arange(0, D)
        dt = rk_ptr.dtype.element_ty
        q = tl.load(q_rows[:, None] + offs_d[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
        q = (q * qk_scale).to(dt)
        m_i = tl.full((G_PAD,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((G_PAD,), dtype=tl.float32)
        acc = tl.zeros((G_PAD, D), dtype=tl.float32)
        for n0 in range(r0, r1, BLOCK_R):
            offs_n = n0 + tl.arange(0, BLOCK_R)
            nmask = offs_n < r1
            k = tl.load(rk_ptr + b * srk_b + h * srk_h + offs_n[:, None] * srk_n + offs_d[None, :],
                        mask=nmask[:, None], other=0.0)
            if RES_IEEE:
                sc = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                sc = tl.dot(q, tl.trans(k))
            sc = tl.where(nmask[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(sc - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(rv_ptr + b * srv_b + h * srv_h + offs_n[:, None] * srv_n + offs_d[None, :],
                        mask=nmask[:, None], other=0.0)
            if RES_IEEE:
                pv = tl.dot(p, v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(dt), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        tl.store(m_ptr + part, m_i, mask=gmask)
        tl.store(l_ptr + part, l_i, mask=gmask)
        tl.store(acc_ptr + part[:, None] * D + offs_d[None, :], acc, mask=gmask[:, None])

    # sizes that change every decode step are not specialised on (no recompilation as the cache grows)
    @triton.jit(do_not_specialize=["length", "chunk", "S_C", "S", "R", "chunk_r", "S_BASE"])
    def _decode_partial_kernel(
        q_ptr, ksign_ptr, kc_ptr, kn_ptr, vc_ptr, vn_ptr, klut_ptr, vlut_ptr, rk_ptr, rv_ptr,
        m_ptr, l_ptr, acc_ptr, sqj_ptr, kq_ptr, kr_ptr, len_ptr, rlen_ptr,
        length, chunk, S_C, S, R, chunk_r, Hkv, qk_scale, S_BASE, len_sb, rlen_sb,
        sq_b, sq_h,
        skc_b, skc_h, skc_n, skn_b, skn_h, skn_n,
        svc_b, svc_h, svc_n, svn_b, svn_h, svn_n,
        srk_b, srk_h, srk_n, srv_b, srv_h, srv_n,
        ssj_b, ssj_h, skq_b, skq_h, skq_n, skr_b, skr_h, skr_n,
        G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, INV_SQRT_D: tl.constexpr,
        KBA: tl.constexpr, KPA: tl.constexpr, KSA: tl.constexpr,
        KBB: tl.constexpr, KPB: tl.constexpr, KSB: tl.constexpr,
        VBA: tl.constexpr, VPA: tl.constexpr, VSA: tl.constexpr,
        VBB: tl.constexpr, VPB: tl.constexpr, VSB: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, USE_ASM: tl.constexpr, RES_IEEE: tl.constexpr,
        K_ROW: tl.constexpr, V_ROW: tl.constexpr, K_ALIGN: tl.constexpr, V_ALIGN: tl.constexpr,
        K_QJL: tl.constexpr, LEN_TENSOR: tl.constexpr, RLEN_TENSOR: tl.constexpr,
    ):
        # Programs [0, S_C): `chunk` packed tokens of one KV head, all G query heads of the group.
        #   Reads chunk · 2 · (d·bits/8 + 2) bytes; writes G · (d + 2) float32 partials (rotated
        #   domain, kernel position order). K_QJL (prod keys): also chunk · (d/8 + 2) bytes of QJL
        #   bits + ||r||, scored against S q (sqj_ptr: [B, H_q, d] float16, natural order, log2 units).
        # Programs [S_C, S): `chunk_r` residual-window tokens, full precision, natural order.
        #   Reads chunk_r · 2 · d values; writes G · (d + 2) float32.
        # The grid may start at split S_BASE (the CUDA kernel took the compressed splits).
        # LEN_TENSOR / RLEN_TENSOR: valid lengths read from device memory (a CUDA graph replays the
        # launch unchanged), clamped to the bounds `length` / `R` the grid was sized by; programs
        # past them run no iteration and write an empty partial (m = -inf, l = 0).
        D2: tl.constexpr = D // 2
        pid_s = tl.program_id(0) + S_BASE
        pid_bh = tl.program_id(1)
        b = (pid_bh // Hkv).to(tl.int64)  # 64-bit slab offsets: a store may exceed 2 GiB
        h = (pid_bh % Hkv).to(tl.int64)
        g = tl.arange(0, G_PAD)
        gmask = g < G
        q_rows = q_ptr + b * sq_b + (h * G + g) * sq_h
        part = (pid_bh * S + pid_s) * G + g
        if LEN_TENSOR:
            length = tl.minimum(tl.load(len_ptr + b * len_sb).to(tl.int32), length)
        if RLEN_TENSOR:
            R = tl.minimum(tl.load(rlen_ptr + b * rlen_sb).to(tl.int32), R)
        if pid_s < S_C:
            start = pid_s * chunk
            end = tl.minimum(start + chunk, length)
            # rotate the query in registers, directly in kernel position order: loading
            # s∘q at the bit-permuted coordinates and applying the Sylvester FWHT gives Π q permuted
            # (H[σ(i), j] = H[i, σ^-1(j)] for a bit permutation σ).
            nat = _natural(D)
            q = tl.load(q_rows[:, None] + nat[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
            sgn = tl.load(ksign_ptr + nat)
            qr = fwht_tile(q * sgn[None, :], G_PAD, D) * (qk_scale * INV_SQRT_D)
            qa, qb = tl.split(tl.permute(tl.reshape(qr.to(tl.float16), (G_PAD, 2, D2)), (0, 2, 1)))
            sqj_rows = sqj_ptr + b * ssj_b + (h * G + g) * ssj_h  # prod keys: S q rows of the group

            m_i = tl.full((G_PAD,), float("-inf"), dtype=tl.float32)
            l_i = tl.zeros((G_PAD,), dtype=tl.float32)
            acc_a = tl.zeros((G_PAD, D2), dtype=tl.float32)
            acc_b = tl.zeros((G_PAD, D2), dtype=tl.float32)
            # rows are contiguous (stride K_ROW/V_ROW words, constexpr) so plane words load as 16-byte vectors
            kc_base = kc_ptr + tl.multiple_of(b * skc_b + h * skc_h, K_ALIGN)
            vc_base = vc_ptr + tl.multiple_of(b * svc_b + h * svc_h, V_ALIGN)
            for n0 in range(start, end, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                nmask = offs_n < end
                krow = kc_base + offs_n * K_ROW
                if K_QJL:  # √(π/2)/d · ||r|| · (S q)·z (constant folded into sqj); before the MSE
                    # unpack, so its temporaries are dead by then (fewer registers than after it)
                    qjl_rows = kq_ptr + b * skq_b + h * skq_h + offs_n * skq_n
                    sj = _qjl_scores(qjl_rows, nmask, sqj_rows, gmask, G_PAD, D, BLOCK_N)
                    kr = tl.load(kr_ptr + b * skr_b + h * skr_h + offs_n * skr_n, mask=nmask, other=0.0).to(tl.float32)
                    sj = sj * kr[None, :]
                ka = _unpack_segment(krow, nmask, klut_ptr, KBA, KPA, KSA, D2, BLOCK_N, USE_ASM)
                kb = _unpack_segment(krow, nmask, klut_ptr + 256, KBB, KPB, KSB, D2, BLOCK_N, USE_ASM)
                sc = tl.dot(qa, tl.trans(ka)) + tl.dot(qb, tl.trans(kb))  # [G_PAD, BLOCK_N], log2 units
                kn = tl.load(kn_ptr + b * skn_b + h * skn_h + offs_n * skn_n, mask=nmask, other=0.0).to(tl.float32)
                sc = sc * kn[None, :]
                if K_QJL:
                    sc += sj
                sc = tl.where(nmask[None, :], sc, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(sc, axis=1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(sc - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                vn = tl.load(vn_ptr + b * svn_b + h * svn_h + offs_n * svn_n, mask=nmask, other=0.0).to(tl.float32)
                pv = (p * vn[None, :]).to(tl.float16)
                vrow = vc_base + offs_n * V_ROW
                va = _unpack_segment(vrow, nmask, vlut_ptr, VBA, VPA, VSA, D2, BLOCK_N, USE_ASM)
                vb = _unpack_segment(vrow, nmask, vlut_ptr + 256, VBB, VPB, VSB, D2, BLOCK_N, USE_ASM)
                acc_a = acc_a * alpha[:, None] + tl.dot(pv, va)
                acc_b = acc_b * alpha[:, None] + tl.dot(pv, vb)
                m_i = m_new
            tl.store(m_ptr + part, m_i, mask=gmask)
            tl.store(l_ptr + part, l_i, mask=gmask)
            offs_h = tl.arange(0, D2)
            tl.store(acc_ptr + part[:, None] * D + offs_h[None, :], acc_a, mask=gmask[:, None])
            tl.store(acc_ptr + part[:, None] * D + D2 + offs_h[None, :], acc_b, mask=gmask[:, None])
        else:
            _residual_part(q_rows, gmask, part, rk_ptr, rv_ptr, m_ptr, l_ptr, acc_ptr, b, h, pid_s, S_C, R, chunk_r,
                           qk_scale, srk_b, srk_h, srk_n, srv_b, srv_h, srv_n, G_PAD, D, BLOCK_R, RES_IEEE)

    @triton.jit(do_not_specialize=["S_C", "S"])
    def _decode_combine_kernel(
        m_ptr, l_ptr, acc_ptr, vsign_ptr, out_ptr,
        S_C, S, Hq, so_b, so_h,
        G: tl.constexpr, D: tl.constexpr, INV_SQRT_D: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        # One program per (sequence, query head): reads S · (d + 2) float32 partials, writes d
        # outputs. Compressed splits hold rotated values in kernel position order; residual splits
        # natural-order values, read here at the permuted offsets so both sums share one order.
        pid = tl.program_id(0)
        b = (pid // Hq).to(tl.int64)
        hq = pid % Hq
        Hkv = Hq // G
        bh = b * Hkv + hq // G
        g = hq % G
        nat = _natural(D)
        offs_d = tl.arange(0, D)
        offs_s = tl.arange(0, BLOCK_S)
        m_all = tl.full((BLOCK_S,), float("-inf"), dtype=tl.float32)
        for s0 in range(0, S, BLOCK_S):
            sm = s0 + offs_s < S
            m_all = tl.maximum(m_all, tl.load(m_ptr + (bh * S + s0 + offs_s) * G + g, mask=sm, other=float("-inf")))
        m_tot = tl.max(m_all, axis=0)
        l_tot = tl.zeros((BLOCK_S,), dtype=tl.float32)
        acc_c = tl.zeros((D,), dtype=tl.float32)
        acc_r = tl.zeros((D,), dtype=tl.float32)
        for s0 in range(0, S, BLOCK_S):
            sidx = s0 + offs_s
            sm = sidx < S
            part = (bh * S + sidx) * G + g
            w = tl.where(sm, tl.exp2(tl.load(m_ptr + part, mask=sm, other=float("-inf")) - m_tot), 0.0)
            l_tot += w * tl.load(l_ptr + part, mask=sm, other=0.0)
            comp = sidx < S_C
            offs = tl.where(comp[:, None], offs_d[None, :], nat[None, :])
            a = tl.load(acc_ptr + part[:, None] * D + offs, mask=sm[:, None], other=0.0)
            acc_c += tl.sum(tl.where(comp, w, 0.0)[:, None] * a, axis=0)
            acc_r += tl.sum(tl.where(comp, 0.0, w)[:, None] * a, axis=0)
        # un-rotate once: Π_v^T y = s ∘ H y / sqrt(d); in position order H y lands at σ^-1
        y = tl.reshape(fwht_tile(tl.reshape(acc_c, (1, D)), 1, D), (D,))
        sgn = tl.load(vsign_ptr + nat)
        out = (sgn * y * INV_SQRT_D + acc_r) / tl.sum(l_tot, axis=0)
        tl.store(out_ptr + b * so_b + hq * so_h + nat, out.to(out_ptr.dtype.element_ty))


# ------------------------------------------------------------------------------------------------
# wrapper
# ------------------------------------------------------------------------------------------------
_SM_COUNT: dict = {}
# backend="auto" runs the CUDA kernel from this many packed token-heads (B · H_kv · length) up:
# the crossover measured on the H100 (results/gpu_decode_attention.md: batch 1 at 16k, batch 8 at 4k)
AUTO_CUDA_MIN_TOKEN_HEADS = 65536
_SIDE_STREAMS: dict = {}
LAST_LAUNCH: dict = {}  # last compiled kernel handles (register / spill reports in benchmarks)


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One extra stream a device, for the residual-window splits beside the CUDA kernel."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


def _fork_side_stream(device: torch.device) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
    """(the current stream, the side stream made to wait for it): work launched on the side stream
    runs beside what follows on the current one until ``current.wait_stream(side)`` joins them."""
    cur = torch.cuda.current_stream(device)
    side = _side_stream(device)
    side.wait_stream(cur)
    return cur, side


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device]


def _slab_align(c32: torch.Tensor) -> int:
    """Largest power of two (<= 4 words) dividing the (b, h) slab offsets of an int32 code view."""
    a = 4
    while a > 1 and (c32.stride(0) % a or c32.stride(1) % a or c32.storage_offset() % a):
        a //= 2
    return a


def _check_store(name: str, codes: torch.Tensor, norms: torch.Tensor, tables: KernelTables, B: int, length: int) -> None:
    if codes.dtype != torch.uint8 or codes.dim() != 4:
        raise TypeError(f"`{name}_codes` must be uint8 [B, H_kv, capacity, code_nbytes], got {codes.dtype} {tuple(codes.shape)}")
    if codes.shape[0] != B or codes.shape[-1] != tables.code_nbytes:
        raise ValueError(f"`{name}_codes` shape {tuple(codes.shape)} does not match B={B}, code_nbytes={tables.code_nbytes}")
    if codes.stride(-1) != 1 or codes.stride(2) != tables.code_nbytes or any(s % 4 for s in codes.stride()[:-1]) \
            or codes.storage_offset() % 4:
        raise ValueError(f"`{name}_codes` rows must be contiguous ([..., capacity, code_nbytes] with unit row "
                         "stride) and 4-byte aligned: the kernel reads 32-bit words")
    if norms.dtype != torch.float16 or tuple(norms.shape) != tuple(codes.shape[:3]):
        raise ValueError(f"`{name}_norms` must be float16 {tuple(codes.shape[:3])}, got {norms.dtype} {tuple(norms.shape)}")
    if length > codes.shape[2]:
        raise ValueError(f"length {length} exceeds the {name} store capacity {codes.shape[2]}")
    if codes.shape[2] * codes.shape[3] // 4 >= 2**31:
        raise ValueError(f"`{name}_codes` hold {codes.shape[2]} tokens a head: the kernels index one head's rows "
                         f"with 32-bit word offsets (at most {(2**31 - 1) * 4 // codes.shape[3]} tokens a head)")


def _check_qjl(k_qjl: KeyQJL, k_codes: torch.Tensor, d: int, device: torch.device) -> None:
    """Validate the QJL part of prod keys against the key store (shapes, dtypes, layout, device)."""
    if not isinstance(k_qjl, KeyQJL):
        raise TypeError(f"`k_qjl` must be a KeyQJL (or None), got {type(k_qjl).__name__}")
    want = (*k_codes.shape[:3], d // 8)
    qjl, rn, S = k_qjl.qjl, k_qjl.rnorms, k_qjl.S
    if not isinstance(qjl, torch.Tensor) or qjl.dtype != torch.uint8 or tuple(qjl.shape) != want:
        got = f"{qjl.dtype} {tuple(qjl.shape)}" if isinstance(qjl, torch.Tensor) else type(qjl).__name__
        raise ValueError(f"`k_qjl.qjl` must be uint8 [B, H_kv, capacity, d/8] = {want} (the key store's "
                         f"[B, H_kv, capacity] and d={d}), got {got}")
    if qjl.stride(-1) != 1 or any(st % 4 for st in qjl.stride()[:-1]) or qjl.storage_offset() % 4:
        raise ValueError("`k_qjl.qjl` rows must be contiguous and 4-byte aligned: the kernel reads 32-bit words")
    if not isinstance(rn, torch.Tensor) or rn.dtype != torch.float16 or tuple(rn.shape) != want[:3]:
        got = f"{rn.dtype} {tuple(rn.shape)}" if isinstance(rn, torch.Tensor) else type(rn).__name__
        raise ValueError(f"`k_qjl.rnorms` must be float16 [B, H_kv, capacity] = {want[:3]}, got {got}")
    if not isinstance(S, torch.Tensor) or not S.is_floating_point() or tuple(S.shape) != (d, d):
        got = f"{S.dtype} {tuple(S.shape)}" if isinstance(S, torch.Tensor) else type(S).__name__
        raise ValueError(f"`k_qjl.S` must be a float [d, d] = ({d}, {d}) QJL matrix, got {got}")
    for name, t in (("qjl", qjl), ("rnorms", rn), ("S", S)):
        if t.device != device:
            raise ValueError(f"`k_qjl.{name}` is on {t.device}, the query on {device}: move it once, not every call")
    if not (isinstance(k_qjl.scale, (int, float)) and math.isfinite(k_qjl.scale) and k_qjl.scale > 0):
        raise ValueError(f"`k_qjl.scale` must be a positive finite float (√(π/2)/d), got {k_qjl.scale!r}")


# ------------------------------------------------------------------------------------------------
# launch plans: the structural validation and launch constants once, then only per-call work
# ------------------------------------------------------------------------------------------------
# A plan is a pure function of its key: everything the validation and the launch constants depend
# on (query shape/strides/dtype/device; address, shape and strides of every stored tensor, so a
# store that grows or reallocates gets a new plan; tables and tuning; launch options). What changes
# every step (length, residual rows R, the query's and the lengths' addresses) is checked on every
# call. Plans hold no store tensor (no memory kept alive); they hold the tables they were built for,
# so ``id(tables)`` in the key stays unique.
PLAN_CACHE = True
MAX_PLANS = 256
PLAN_STATS = {"built": 0, "hits": 0}
_PLANS: dict = {}
_SCRATCH: dict = {}  # (device, stream) -> [m, l, acc] flat split buffers shared by calls without a workspace
_TOKENS = itertools.count()
_NO_RESIDUAL_LENGTH = tuple(LengthArgs(r, r, None, 0) for r in range(1025))  # residual_length None: all R rows


def clear_plans() -> None:
    """Drop every cached launch plan and the shared split buffers (the next calls validate anew)."""
    _PLANS.clear()
    _SCRATCH.clear()


def _sig(t: torch.Tensor) -> tuple:
    return t.data_ptr(), t.shape, t.stride(), t.dtype


def _rsig(t: torch.Tensor) -> tuple:
    """A residual buffer without its row count (R changes every step: checked per call)."""
    sh = t.shape
    return t.data_ptr(), sh[:2], sh[3:], t.stride(), t.dtype


_CUDA_DECODE: list = []  # the cuda_decode module, imported at the first call (it imports this module's package)


def _cuda_decode():
    """The :mod:`~turboquant.kernels.cuda_decode` module (imported at first use)."""
    if not _CUDA_DECODE:
        from turboquant.kernels import cuda_decode

        _CUDA_DECODE.append(cuda_decode)
    return _CUDA_DECODE[0]


def _plan_key(query, k_codes, k_norms, v_codes, v_norms, length, k_tables, v_tables, scaling, residual_k,
              residual_v, block_n, num_splits, num_warps, num_stages, programs_per_sm, backend, k_qjl,
              max_length, residual_length, cuda_config: CudaConfig | None = None) -> tuple | None:
    """The plan key of a call, or None (no plan: the call validates and launches uncached) where an
    argument is of a kind the key cannot describe (the full validation then names the problem)."""
    if not isinstance(scaling, (float, int)) or not (max_length is None or type(max_length) is int):
        return None
    try:
        res = None if residual_k is None else (_rsig(residual_k), None if residual_v is None else _rsig(residual_v))
        qjl = None if k_qjl is None else (type(k_qjl), _sig(k_qjl.qjl), _sig(k_qjl.rnorms), _sig(k_qjl.S),
                                          k_qjl.scale)
        # one flat tuple (fewer nested tuples to build, hash and compare on every call)
        key = (query.shape, query.stride(), query.dtype, query.device,
               k_codes.data_ptr(), k_codes.shape, k_codes.stride(), k_codes.dtype,
               k_norms.data_ptr(), k_norms.shape, k_norms.stride(), k_norms.dtype,
               v_codes.data_ptr(), v_codes.shape, v_codes.stride(), v_codes.dtype,
               v_norms.data_ptr(), v_norms.shape, v_norms.stride(), v_norms.dtype,
               id(k_tables), id(v_tables), scaling, res, qjl, block_n, num_splits,
               num_warps, num_stages, programs_per_sm, backend, type(length), max_length, type(residual_length),
               cuda_config)
    except (AttributeError, TypeError, IndexError, RuntimeError):
        return None
    return key


@dataclass
class _Plan:
    """Validated facts and launch constants of one call structure (see :func:`_plan_key`)."""

    token: int
    B: int
    Hq: int
    Hkv: int
    G: int
    d: int
    dev: torch.device
    dtype: torch.dtype
    capacity: int
    k_tables: KernelTables
    v_tables: KernelTables
    qk_scale: float
    backend: str
    q_contig: bool  # query rows not contiguous: copied every call
    q_strides: tuple  # of the query as launched
    strides: dict  # residual window present (bool) -> every stride argument of the partial kernel, in order
    ptrs: tuple  # addresses (in the key): k signs, k codes, k norms, v codes, v norms, k/v LUTs, residual k/v,
    #              QJL words, ||r|| (mse keys: k codes, k norms), v signs
    res_ok: bool  # residual_v matches residual_k (all but R), unit last stride, one dtype
    res_bf16_cpu: bool
    res_ieee: bool
    qjl: tuple | None  # (S^T · √(π/2)/d · scaling · log2 e float32, S kept alive, qjl strides, rnorms strides)
    const: dict  # partial-kernel constexprs that do not depend on the launch variant
    options: dict
    cfg: dict  # use_cuda -> (block_n, want splits or None, fixed splits or None)
    cuda_config: CudaConfig | None  # the CUDA kernel's launch configuration (None: its default)
    cuda_why: str | None = None  # why the CUDA kernel cannot run this plan ("": it can; None: not asked yet)
    partial: object = None  # LaunchCache of the partial kernel
    # cuda_decode.PartialLaunch by length kind (cuda_decode.LEN_KINDS; built at the first CUDA call)
    cuda_launch: dict = field(default_factory=dict)
    combine: object = None


def _build_plan(query, k_codes, k_norms, v_codes, v_norms, length, k_tables, v_tables, scaling, residual_k,
                residual_v, block_n, num_splits, num_warps, num_stages, programs_per_sm, backend, k_qjl,
                residual_length, cuda_config: CudaConfig | None = None) -> _Plan:
    """Validate everything of a call that does not change from step to step; the launch constants."""
    if query.dim() != 4 or query.shape[2] != 1:
        raise ValueError(f"`query` must be [B, H_q, 1, d] (one decode token), got {tuple(query.shape)}")
    B, Hq, _, d = query.shape
    check_head_dim(d)
    if k_tables.d != d or v_tables.d != d:
        raise ValueError(f"tables built for d={k_tables.d}/{v_tables.d}, query has d={d}")
    _check_store("k", k_codes, k_norms, k_tables, B, 0)
    _check_store("v", v_codes, v_norms, v_tables, B, 0)
    if k_qjl is not None:
        _check_qjl(k_qjl, k_codes, d, query.device)
    Hkv = k_codes.shape[1]
    if Hq % Hkv:
        raise ValueError(f"H_q={Hq} must be a multiple of H_kv={Hkv}")
    G = Hq // Hkv
    dev = query.device
    _cuda_decode().check_backend(backend)
    if backend == "cuda" and k_qjl is not None:
        raise ValueError("backend='cuda': the CUDA decode kernel does not support TurboQuant-prod (QJL) keys "
                         "(`k_qjl` given); use backend='triton' or 'auto' (prod keys run in Triton)")
    rk, rv = residual_k, residual_v
    res_ok = rk is not None and rv is not None and rv.dim() == rk.dim() >= 3 and rk.stride(-1) == 1 \
        and rv.stride(-1) == 1 and rv.dtype == rk.dtype \
        and all(a == b for i, (a, b) in enumerate(zip(rk.shape, rv.shape)) if i != 2)
    qs3 = (Hq * d, d, d) if query.stride(-1) != 1 else tuple(query.stride()[:3])
    qs = qs3[:2]
    few = B * Hkv < 16  # few KV heads in flight: longer programs (launch shapes below)
    cfg = {}
    for use_cuda in (False, True):
        bn, pps = block_n, programs_per_sm
        if use_cuda:  # a CTA step = warps x 16-token tiles
            from turboquant.kernels import cuda_decode

            shape = cuda_decode.launch_shape(few, cuda_config)
            bn = 16 * shape["warps"]
            pps = pps or shape["programs_per_sm"]
        bn = bn or (128 if few else 64)
        pps = pps or (2 if few else 3)
        want = None if num_splits is not None else max(1, (pps * _num_sms(dev)) // (B * Hkv))
        cfg[use_cuda] = (bn, want, num_splits)
    kc32, vc32 = k_codes.view(torch.int32), v_codes.view(torch.int32)
    qk_scale = float(scaling) * LOG2E
    qjl = None
    if k_qjl is not None:
        kq32 = k_qjl.qjl.view(torch.int32)
        s_t = k_qjl.S.to(torch.float32).T * (qk_scale * float(k_qjl.scale))
        qjl = (s_t.contiguous(), k_qjl.S, kq32.stride()[:3], k_qjl.rnorms.stride()[:3])
    kcs, vcs, kns, vns = kc32.stride()[:3], vc32.stride()[:3], k_norms.stride(), v_norms.stride()
    ssj, skq, skr = ((Hq * d, d), qjl[2], qjl[3]) if qjl is not None else (qs, kcs, kns)
    res = (rk.stride()[:3] + rv.stride()[:3]) if res_ok else None
    strides = {has_r: (*qs, *kcs, *kns, *vcs, *vns, *(res if has_r else qs3 + qs3), *ssj, *skq, *skr)
               for has_r in ((False, True) if res_ok else (False,))}
    (kba, kpa, ksa), (kbb, kpb, ksb) = k_tables.seg
    (vba, vpa, vsa), (vbb, vpb, vsb) = v_tables.seg
    const = {"G": G, "G_PAD": max(16, triton.next_power_of_2(G)), "D": d, "INV_SQRT_D": 1.0 / math.sqrt(d),
             "KBA": kba, "KPA": kpa, "KSA": ksa, "KBB": kbb, "KPB": kpb, "KSB": ksb,
             "VBA": vba, "VPA": vpa, "VSA": vsa, "VBB": vbb, "VPB": vpb, "VSB": vsb,
             "BLOCK_R": 32 if d <= 128 else 16, "USE_ASM": dev.type == "cuda",
             "K_ROW": k_tables.code_nbytes // 4, "V_ROW": v_tables.code_nbytes // 4,
             "K_ALIGN": _slab_align(kc32), "V_ALIGN": _slab_align(vc32), "K_QJL": k_qjl is not None}
    kq_t, krn_t = (k_qjl.qjl, k_qjl.rnorms) if k_qjl is not None else (k_codes, k_norms)
    ptrs = (k_tables.signs.data_ptr(), k_codes.data_ptr(), k_norms.data_ptr(), v_codes.data_ptr(),
            v_norms.data_ptr(), k_tables.lut32.data_ptr(), v_tables.lut32.data_ptr(),
            rk.data_ptr() if res_ok else 0, rv.data_ptr() if res_ok else 0, kq_t.data_ptr(), krn_t.data_ptr(),
            v_tables.signs.data_ptr())
    PLAN_STATS["built"] += 1
    return _Plan(
        token=next(_TOKENS), B=B, Hq=Hq, Hkv=Hkv, G=G, d=d, dev=dev, dtype=query.dtype,
        capacity=min(k_codes.shape[2], v_codes.shape[2]), k_tables=k_tables, v_tables=v_tables, qk_scale=qk_scale,
        backend=backend, q_contig=query.stride(-1) != 1, q_strides=qs, strides=strides, ptrs=ptrs, res_ok=res_ok,
        res_bf16_cpu=rk is not None and rk.dtype == torch.bfloat16 and rk.device.type == "cpu",
        res_ieee=res_ok and rk.dtype == torch.float32, qjl=qjl,
        const=const, options={"num_warps": num_warps or (8 if few else 4), "num_stages": num_stages},
        cfg=cfg, cuda_config=cuda_config, partial=LaunchCache(_decode_partial_kernel), combine=LaunchCache(_decode_combine_kernel),
    )


def _use_cuda(plan: _Plan, k_codes, k_norms, v_codes, v_norms, length: int, lk: int) -> bool:
    """Whether this call runs the CUDA partial kernel (mse keys and, for "auto", the measured
    crossover ``AUTO_CUDA_MIN_TOKEN_HEADS``: checked by the caller). ``length``: the grid's bound;
    ``lk``: the kernel's length variant (:func:`cuda_decode.len_kind`)."""
    backend = plan.backend
    cuda_decode = _cuda_decode()
    if lk in plan.cuda_launch:
        return True  # this plan's variant compiled and launched before
    if plan.cuda_why is None:  # the structural answer, once a plan ("": the kernel takes it)
        plan.cuda_why = cuda_decode.unsupported(plan.d, plan.G, plan.k_tables, plan.v_tables, k_codes, v_codes,
                                               k_norms, v_norms) or ""
    few = plan.B * plan.Hkv < 16
    # compile the variant (first use) before anything is launched
    return cuda_decode.choose(
        backend, plan.cuda_why or None,
        lambda: cuda_decode.variant(plan.dtype, plan.G, plan.k_tables, plan.v_tables, few, lk, plan.cuda_config),
        stacklevel=4) is not None


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _raw_stream(dev: torch.device) -> int:
    """The current stream of ``dev`` as an int (0 on CPU)."""
    if dev.type != "cuda":
        return 0
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is None:  # pragma: no cover - older torch
        return torch.cuda.current_stream(dev).cuda_stream
    return raw(dev.index if dev.index is not None else torch.cuda.current_device())


def _current_device_stream() -> tuple[int, int]:
    """(current CUDA device index, its current stream as an int): what ``JITFunction.run`` reads."""
    idx = torch._C._cuda_getDevice()
    return idx, torch._C._cuda_getCurrentRawStream(idx)


def _stream_state(dev: torch.device) -> tuple[tuple[int, int] | None, bool]:
    """``(current, capturing)`` of a call on ``dev``: :func:`_current_device_stream` and whether a
    CUDA graph is being captured on the current stream; ``(None, False)`` off CUDA (read once a call)."""
    if dev.type != "cuda":
        return None, False
    return _current_device_stream(), torch._C._cuda_isCurrentStreamCapturing()


def _split_buffers(plan: _Plan, S: int, workspace, capturing: bool = False, current: tuple | None = None) -> tuple:
    """``m``, ``l`` [B·H_kv, S, G], ``acc`` [B·H_kv, S, G, d] float32, the output [B, 1, H_q, d] and
    the four addresses.

    With a workspace: its buffers (the last set is remembered, so a repeated call looks nothing
    up). Without: the output is new; the split buffers are flat ones shared by every call on this
    device and stream (stream order makes reuse safe), or new ones while a CUDA graph is captured
    (the graph keeps them; a shared buffer could be replaced under it). ``capturing``: a CUDA graph
    is being captured on the current stream; ``current``: (device index, raw stream) of the call
    (:func:`_current_device_stream`; None on CPU)."""
    dev, bh, G = plan.dev, plan.B * plan.Hkv, plan.G
    if workspace is not None:
        if not isinstance(workspace, DecodeWorkspace):
            buffer(workspace, "m", (0,), torch.float32, dev)  # raises the named TypeError
        memo = workspace.memo
        if memo is not None and memo[0] == plan.token and memo[1] == S and memo[2] == workspace.version:
            return memo[3]
        bufs = (buffer(workspace, "m", (bh, S, G), torch.float32, dev),
                buffer(workspace, "l", (bh, S, G), torch.float32, dev),
                buffer(workspace, "acc", (bh, S, G, plan.d), torch.float32, dev),
                buffer(workspace, "out", (plan.B, 1, plan.Hq, plan.d), plan.dtype, dev))
        bufs = (*bufs, tuple(t.data_ptr() for t in bufs))
        workspace.memo = (plan.token, S, workspace.version, bufs)
        return bufs
    out = torch.empty((plan.B, 1, plan.Hq, plan.d), dtype=plan.dtype, device=dev)
    n = bh * S * G
    if capturing:
        sc = (n, torch.empty(n, dtype=torch.float32, device=dev), torch.empty(n, dtype=torch.float32, device=dev),
              torch.empty(n * plan.d, dtype=torch.float32, device=dev))
        return (*sc[1:], out, (sc[1].data_ptr(), sc[2].data_ptr(), sc[3].data_ptr(), out.data_ptr()))
    slot = (dev, 0) if current is None else current
    sc = _SCRATCH.get(slot)
    if sc is None or sc[0] < n:
        cap = max(n, 2 * sc[0]) if sc is not None else n
        bufs = (torch.empty(cap, dtype=torch.float32, device=dev), torch.empty(cap, dtype=torch.float32, device=dev),
                torch.empty(cap * plan.d, dtype=torch.float32, device=dev))
        sc = (cap, *bufs, tuple(t.data_ptr() for t in bufs))
        _SCRATCH[slot] = sc
    return sc[1], sc[2], sc[3], out, (*sc[4], out.data_ptr())


@dataclass
class _Step:
    """What one planned call launches, apart from the query: lengths, split-K shape, buffers and the
    launch arguments that do not depend on the query (:func:`_prepare_step`). A step stays valid
    while its plan, lengths, residual rows and workspace buffers do (:class:`DecodeAttentionCall`
    keeps one and reruns only :func:`_launch_step`)."""

    ln: LengthArgs
    rl: LengthArgs
    R: int
    lk: int  # the CUDA kernel's length variant (cuda_decode.len_kind)
    use_cuda: bool
    bn: int
    chunk: int
    S_C: int
    S: int
    bufs: tuple  # m, l, acc, out, their addresses (_split_buffers)
    ws_version: int | None  # the workspace's version when the buffers were taken (None: no workspace)
    tail: tuple  # the partial kernel's int / float arguments after the addresses
    len_spec: tuple  # what Triton specialises on of the device lengths (part of the launch key)


_CHUNK_R = 64  # residual-window tokens a split


def _prepare_step(plan: _Plan, k_codes, k_norms, v_codes, v_norms, length, residual_k, residual_v, max_length,
                  residual_length, workspace, capturing: bool, current) -> _Step:
    """The per-call checks (lengths, residual rows) and everything of the launches but the query."""
    B, dev = plan.B, plan.dev
    if type(length) is int and max_length is None and 0 <= length <= plan.capacity:
        ln = LengthArgs(length, length, None, 0)
    else:
        ln = resolve_length(length, max_length, B, plan.capacity, dev)
    R = 0 if residual_k is None else residual_k.shape[2]
    if R and (not plan.res_ok or residual_v.shape[2] != R):
        raise ValueError("`residual_k`/`residual_v` must both be [B, H_kv, R, d], one dtype, contiguous last dim")
    if R and plan.res_bf16_cpu:
        # Triton's interpreter (3.x) computes tl.dot on bfloat16 operands wrongly (a standalone 16x16
        # load + dot returns garbage): refuse instead of returning a silently wrong result
        raise ValueError("a bfloat16 residual window cannot run under Triton's interpreter (its tl.dot on "
                         "bfloat16 is wrong): pass float32/float16 windows on CPU; bfloat16 runs on CUDA")
    if residual_length is None:  # every residual row
        rl = _NO_RESIDUAL_LENGTH[R] if R < len(_NO_RESIDUAL_LENGTH) else LengthArgs(R, R, None, 0)
    else:
        rl = resolve_length(residual_length, R, B, R, dev, "residual_length")
    if ln.tensor is None and rl.tensor is None and ln.value == 0 and rl.value == 0:
        raise ValueError("nothing to attend to: length == 0 and no residual window")
    length = ln.bound  # sizes the grid; the kernels read ln.value / ln.tensor (clamped to it)
    lk = 0 if ln.tensor is None else _cuda_decode().len_kind(ln.tensor)  # the CUDA kernel's length variant
    # "auto" below the measured crossover: the Triton kernel is as fast or faster
    use_cuda = plan.backend != "triton" and length > 0 and plan.qjl is None \
        and (plan.backend != "auto" or B * plan.Hkv * length >= AUTO_CUDA_MIN_TOKEN_HEADS) \
        and _use_cuda(plan, k_codes, k_norms, v_codes, v_norms, length, lk)
    bn, want, fixed = plan.cfg[use_cuda]
    # split-K: ~`programs_per_sm` programs per SM over the packed tokens, residual in chunks of 64
    if length > 0:
        chunk = _cdiv(_cdiv(length, want or fixed), bn) * bn
        S_C = _cdiv(length, chunk)
    else:
        chunk, S_C = bn, 0
    S = S_C + _cdiv(R, _CHUNK_R)
    bufs = _split_buffers(plan, S, workspace, capturing, current)
    p = plan.ptrs
    lt_ptr = p[2] if ln.tensor is None else ln.tensor.data_ptr()
    rt_ptr = p[2] if rl.tensor is None else rl.tensor.data_ptr()
    # the partial kernel's arguments: query, k signs, k codes/norms, v codes/norms, k/v LUTs (plan.ptrs[:7]),
    # residual k/v (the query where R = 0), m, l, acc, the QJL query side (the query for mse keys), then
    # here: QJL words, ||r||, device lengths (k norms where none: never read), the ints and strides
    tail = (p[9], p[10], lt_ptr, rt_ptr, ln.value, chunk, S_C, S, rl.value, _CHUNK_R, plan.Hkv, plan.qk_scale,
            S_C if use_cuda else 0, ln.stride, rl.stride, *plan.strides[R > 0])
    # what Triton specialises on that the plan key does not fix, apart from the query's alignment:
    # the variant, the residual window's presence and the device lengths
    len_spec = (use_cuda, R > 0,
                None if ln.tensor is None else (ln.tensor.dtype, ptr_spec(lt_ptr), int_spec(ln.stride)),
                None if rl.tensor is None else (rl.tensor.dtype, ptr_spec(rt_ptr), int_spec(rl.stride)))
    return _Step(ln=ln, rl=rl, R=R, lk=lk, use_cuda=use_cuda, bn=bn, chunk=chunk, S_C=S_C, S=S, bufs=bufs,
                 ws_version=None if workspace is None else workspace.version, tail=tail, len_spec=len_spec)


def _launch_step(plan: _Plan, st: _Step, query, k_codes, k_norms, v_codes, v_norms, residual_k, residual_v, k_qjl,
                 capturing: bool, current) -> torch.Tensor:
    """The two or three launches of one prepared step for this query: Triton's partial kernel (every
    split, or the residual window's beside the CUDA kernel), the CUDA kernel, the combine."""
    if plan.q_contig:
        query = query.contiguous()
    LAST_LAUNCH["cuda"] = use_cuda = st.use_cuda
    R, S_C, S, B, p = st.R, st.S_C, st.S, plan.B, plan.ptrs
    m_part, l_part, acc_part, out, bp = st.bufs
    # prod keys: ``S q · √(π/2)/d · scaling · log2 e`` float16 [B, H_q, 1, d] (the query side of the QJL
    # score in the kernel's log2 units: one product with the plan's scaled S^T); a dummy (never read) for mse
    sqj = torch.matmul(query.to(torch.float32), plan.qjl[0]).to(torch.float16) if plan.qjl is not None else query
    side = None
    # while a CUDA graph is captured the residual-window splits (Triton) run beside the CUDA kernel
    # on a forked stream (free at replay); eager, the fork's stream and event calls would cost more
    # host time than the overlap saves GPU time (a few us), so they run first on the same stream
    if use_cuda and R and capturing:
        cur, side = _fork_side_stream(plan.dev)
    q_ptr = query.data_ptr()
    if not (use_cuda and R == 0):  # Triton: every split, or only the residual-window splits
        s_base = S_C if use_cuda else 0
        sqj_ptr = q_ptr if sqj is query else sqj.data_ptr()
        # the launcher takes addresses; Triton compiles from typed tensors (slow(): first call of a variant)
        fast = (q_ptr, *p[:7], p[7] if R else q_ptr, p[8] if R else q_ptr, *bp[:3], sqj_ptr, *st.tail)
        vkey = (ptr_spec(q_ptr), ptr_spec(sqj_ptr), st.len_spec)

        def slow():
            ln, rl = st.ln, st.rl
            kq = k_qjl.qjl.view(torch.int32) if k_qjl is not None else None
            kc32 = k_codes.view(torch.int32)
            head = (query, plan.k_tables.signs, kc32, k_norms, v_codes.view(torch.int32), v_norms,
                    plan.k_tables.lut32, plan.v_tables.lut32, residual_k if R else query, residual_v if R else query,
                    m_part, l_part, acc_part, sqj if sqj is not query else query[:, :, 0],
                    kq if kq is not None else kc32, k_qjl.rnorms if k_qjl is not None else k_norms,
                    ln.tensor if ln.tensor is not None else k_norms, rl.tensor if rl.tensor is not None else k_norms)
            return (head + st.tail[4:],
                    dict(plan.const, BLOCK_N=64 if use_cuda else st.bn, RES_IEEE=R > 0 and plan.res_ieee,
                         LEN_TENSOR=ln.tensor is not None, RLEN_TENSOR=rl.tensor is not None), plan.options)

        if side is None:
            handle = plan.partial.launch(vkey, (S - s_base, B * plan.Hkv), fast, slow, current)
        else:
            with torch.cuda.stream(side):
                handle = plan.partial.launch(vkey, (S - s_base, B * plan.Hkv), fast, slow)
        LAST_LAUNCH["partial"] = handle
    if use_cuda:
        ln, lk = st.ln, st.lk
        launch = plan.cuda_launch.get(lk)
        if launch is None:  # the CUDA kernel's argument block, built once a plan and length kind
            launch = plan.cuda_launch[lk] = _cuda_decode().PartialLaunch(
                query, k_codes, k_norms, v_codes, v_norms, plan.k_tables, plan.v_tables, plan.qk_scale,
                few=B * plan.Hkv < 16, lkind=lk, config=plan.cuda_config)
        launch(q_ptr, bp[0], bp[1], bp[2], ln.value, st.chunk, S_C, S, current[1],
               0 if ln.tensor is None else ln.tensor.data_ptr(), ln.stride)
    if side is not None:
        cur.wait_stream(side)
    Hq, d, G = plan.Hq, plan.d, plan.G
    plan.combine.launch(
        (ptr_spec(bp[3]),), (B * Hq, 1), (*bp[:3], p[11], bp[3], S_C, S, Hq, Hq * d, d),
        lambda: ((m_part, l_part, acc_part, plan.v_tables.signs, out, S_C, S, Hq, out.stride(0), out.stride(2)),
                 {"G": G, "D": d, "INV_SQRT_D": 1.0 / math.sqrt(d), "BLOCK_S": 16}, {"num_warps": 4}), current)
    return out


def _run_plan(plan: _Plan, query, k_codes, k_norms, v_codes, v_norms, length, residual_k, residual_v, k_qjl,
              max_length, residual_length, workspace) -> torch.Tensor:
    """One planned call: :func:`_prepare_step` then :func:`_launch_step`."""
    current, capturing = _stream_state(plan.dev)  # where Triton's own launch would go; under capture?
    st = _prepare_step(plan, k_codes, k_norms, v_codes, v_norms, length, residual_k, residual_v, max_length,
                       residual_length, workspace, capturing, current)
    return _launch_step(plan, st, query, k_codes, k_norms, v_codes, v_norms, residual_k, residual_v, k_qjl,
                        capturing, current)


@on_input_device
def decode_attention(
    query: torch.Tensor,
    k_codes: torch.Tensor,
    k_norms: torch.Tensor,
    v_codes: torch.Tensor,
    v_norms: torch.Tensor,
    length: int,
    k_tables: KernelTables,
    v_tables: KernelTables,
    scaling: float,
    residual_k: torch.Tensor | None = None,
    residual_v: torch.Tensor | None = None,
    block_n: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 1,
    programs_per_sm: int | None = None,
    backend: str = "auto",
    k_qjl: KeyQJL | None = None,
    k_outliers: torch.Tensor | None = None,
    v_outliers: torch.Tensor | None = None,
    max_length: int | None = None,
    residual_length: int | torch.Tensor | None = None,
    workspace: DecodeWorkspace | None = None,
    cuda_config: CudaConfig | None = None,
) -> torch.Tensor:
    """Decode attention of one query token over a packed TurboQuant KV store + residual window
    (mse keys and values; or prod keys: ``k_codes``/``k_norms``/``k_tables`` the MSE part at
    ``b-1`` bits plus ``k_qjl``).

    Args:
        query: [B, H_q, 1, d] float (bf16/fp16/fp32); H_q a multiple of H_kv.
        k_codes, v_codes: uint8 [B, H_kv, capacity, code_nbytes] (``PackedStore.codes``).
        k_norms, v_norms: float16 [B, H_kv, capacity] (``PackedStore.norms``).
        length: valid packed tokens ``[0, length)``.
        k_tables, v_tables: :class:`KernelTables` of the layer's K and V quantizers.
        scaling: softmax scale (1/sqrt(d) usually).
        residual_k, residual_v: [B, H_kv, R, d] full-precision recent tokens (after the codes), or None.
        block_n, num_warps, programs_per_sm: launch configuration (default: measured on H100 --
            few KV heads in flight (B·H_kv < 16): 128 tokens a block, 8 warps, 2 programs/SM;
            else 64 tokens, 4 warps, 3 programs/SM). num_splits overrides the split count.
        backend: "triton" (every supported shape), "cuda" (the tensor-core register-LUT kernel of
            :mod:`turboquant.kernels.cuda_decode`: head_dim 256, G <= 8, halves and outlier layouts
            of whole 32-coordinate words; raises where it does not apply) or "auto" (cuda where it
            applies and B·H_kv·length >= 65536, the measured crossover; else triton). The residual
            window and the combine step run in Triton.
            Prod keys (``k_qjl``) always run in Triton; backend="cuda" raises for them.
        k_qjl: the QJL part of TurboQuant-prod keys (:class:`KeyQJL`: bit plane uint8
            [B, H_kv, capacity, d/8], ``||r||`` float16 [B, H_kv, capacity], ``S`` [d, d] and
            ``√(π/2)/d``), or None for mse keys.
        k_outliers, v_outliers: outlier layouts (``k_tables``/``v_tables`` then
            :class:`~turboquant.kernels.codespace.CodeSpaceTables`, from ``KernelTables.from_layout``):
            the stores' outlier channels [H_kv, n_out]. Either tables object being code-space runs
            the code-space kernels (:func:`~turboquant.kernels.codespace.decode_attention_codespace`).
        length: an int, or an int32/int64 device tensor of shape [], [1] or [B] together with
            ``max_length`` (no host sync: CUDA-graph capturable; the grid is sized by
            ``max_length`` and programs past the valid length exit early; a CUDA tensor is clamped
            to ``max_length``, a CPU one checked). Device lengths run in Triton (not ``backend="cuda"``).
        max_length: the fixed grid bound (``length <= max_length <= capacity``).
        residual_length: valid tokens of the residual buffers (int, or a device tensor like
            ``length``; default all ``R`` rows).
        workspace: a :class:`~turboquant.kernels.workspace.DecodeWorkspace`: split buffers and the
            output reused across calls of one shape (no allocation; the output is overwritten by
            the next call with this workspace).
        cuda_config: the CUDA kernel's launch configuration
            (:class:`~turboquant.kernels.cuda_decode.CudaConfig`; None: ``DEFAULT_CONFIG``).
    Returns:
        [B, 1, H_q, d] in the query's dtype.
    """
    if not HAS_TRITON:
        raise RuntimeError("decode_attention needs Triton; use decode_attention_reference")
    if not isinstance(k_tables, KernelTables) or not isinstance(v_tables, KernelTables):
        from turboquant.kernels.codespace import as_codespace, decode_attention_codespace

        if k_qjl is not None:
            raise ValueError("TurboQuant-prod keys (`k_qjl`) run with one-group (halves-*/int-*) layouts only; "
                             "outlier layouts are mse")
        return decode_attention_codespace(
            query, k_codes, k_norms, v_codes, v_norms, length, as_codespace(k_tables, query.device),
            as_codespace(v_tables, query.device), scaling, residual_k, residual_v, k_outliers, v_outliers,
            max_length=max_length, residual_length=residual_length, workspace=workspace, block_n=block_n,
            num_splits=num_splits, backend=backend, cuda_config=cuda_config)
    key = plan = None
    if PLAN_CACHE:
        key = _plan_key(query, k_codes, k_norms, v_codes, v_norms, length, k_tables, v_tables, scaling, residual_k,
                        residual_v, block_n, num_splits, num_warps, num_stages, programs_per_sm, backend, k_qjl,
                        max_length, residual_length, cuda_config)
        try:
            plan = _PLANS.get(key)
        except TypeError:  # an unhashable argument: validated and launched without a plan
            key = None
    if plan is None:
        plan = _build_plan(query, k_codes, k_norms, v_codes, v_norms, length, k_tables, v_tables, scaling,
                           residual_k, residual_v, block_n, num_splits, num_warps, num_stages, programs_per_sm,
                           backend, k_qjl, residual_length, cuda_config)
        if key is not None:
            if len(_PLANS) >= MAX_PLANS:
                del _PLANS[next(iter(_PLANS))]  # oldest first
            _PLANS[key] = plan
    else:
        PLAN_STATS["hits"] += 1
    return _run_plan(plan, query, k_codes, k_norms, v_codes, v_norms, length, residual_k, residual_v, k_qjl,
                     max_length, residual_length, workspace)


def decode_attention_store(
    query: torch.Tensor,
    k_store,
    v_store,
    k_tables=None,
    v_tables=None,
    scaling: float | None = None,
    residual_k: torch.Tensor | None = None,
    residual_v: torch.Tensor | None = None,
    length: int | torch.Tensor | None = None,
    max_length: int | None = None,
    residual_length: int | torch.Tensor | None = None,
    workspace: DecodeWorkspace | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """:func:`decode_attention` over two ``PackedStore``-like objects (``.codes``, ``.norms``,
    ``.length``, ``.codec``; outlier layouts also ``.outliers`` [H_kv, n_out] and norms
    [B, H_kv, cap, groups]). ``k_tables``/``v_tables`` None: ``KernelTables.from_quantizer`` of the
    store's ``codec.mse`` (outlier layouts: its layout's code-space tables), cached on the codec.
    Keys: mse of any layout, or prod of a one-group layout (``.qjl``, ``.rnorms``, ``.codec.S``,
    ``.codec.qjl_scale``; ``k_tables`` then describe the MSE part), prod at ``b >= 2`` bits only.
    Values: mse only (``.qjl`` must be None). ``length`` default: ``k_store.length`` (a host int);
    pass a device tensor + ``max_length`` for the graph-capturable path."""
    if getattr(v_store, "qjl", None) is not None:
        raise NotImplementedError("the value store holds QJL (prod) codes: the kernels take TurboQuant-prod keys "
                                  "but mse values only (value_mode='mse'); use the torch reference for prod values")
    if scaling is None:
        raise ValueError("`scaling` (the softmax scale, usually 1/sqrt(d)) is required")
    k_qjl = None
    if getattr(k_store, "qjl", None) is not None:
        if k_store.codes is None:
            raise ValueError("prod keys at 1 bit have no MSE part (no codes): the kernels need TurboQuant-prod "
                             "keys of 2, 2.5, 3, 3.5 or 4 bits")
        k_qjl = KeyQJL.from_store(k_store)
    dev = query.device
    k_tables = k_tables if k_tables is not None else store_tables(k_store, dev)
    v_tables = v_tables if v_tables is not None else store_tables(v_store, dev)
    return decode_attention(
        query, k_store.codes, k_store.norms, v_store.codes, v_store.norms,
        int(k_store.length) if length is None else length,
        k_tables, v_tables, scaling, residual_k, residual_v, k_qjl=k_qjl, backend=backend,
        k_outliers=getattr(k_store, "outliers", None), v_outliers=getattr(v_store, "outliers", None),
        max_length=max_length, residual_length=residual_length, workspace=workspace,
    )


def store_tables(store, device: torch.device):
    """The kernel tables of a store's codec on ``device`` (its MSE part for prod keys), cached on
    the quantizer: :class:`KernelTables` for halves layouts, code-space tables for the others."""
    codec = store.codec
    quantizer = getattr(codec, "mse", None) or getattr(codec, "quantizer", None)
    if quantizer is None:
        raise ValueError("the store's codec has no TurboQuant-mse quantizer (prod keys at 1 bit)")
    return KernelTables.from_quantizer(quantizer, device)
