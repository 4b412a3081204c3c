"""Decode attention directly over TurboQuant packed codes (flash-decoding, GQA, residual window).

For one new query token per sequence, ``out = softmax(q K^T · scaling) V`` where the first
``length`` keys/values are TurboQuant-mse codes (``PackedStore``, bit planes, rotated domain) and
the last ``R`` are the full-precision residual window. Nothing is dequantized to memory:

1. ``q_rot = Π_k q · scaling · log2(e)`` (one [B·H_q, d] x [d, d] product);
2. split-K partial kernel, grid ``(splits, B·H_kv)``: each program streams a chunk of packed rows
   of one KV head, unpacks both segments into centroid values in registers (SWAR over 32-bit words
   of the bit planes, then one table load a code), scores all ``G = H_q/H_kv`` query heads of the
   group with one tensor-core product (``score = (q_rot · c[idx]) · ||k||``), runs the online
   softmax and accumulates ``p · ||v|| · c[idx_v]`` in the *rotated* value domain;
3. combine kernel, grid ``(B·H_q,)``: merges the splits, runs the residual window in the original
   domain, and writes both parts normalised by the common softmax denominator;
4. ``out = res + acc_rot @ Π_v`` un-rotates once per head (one [B·H_q, d] x [d, d] product).

Memory traffic per KV head and token: ``2 · (d·bits/8 + 2)`` bytes (K and V codes + norms), i.e.
228 B at d=256 / 3.5 bits against 1024 B for bf16 K/V (4.5x less); partials add
``splits · G · (d + 2) · 4`` bytes a KV head, written once and read once.

Reads top to bottom: pure-torch reference, Triton kernels, wrapper.
"""

from __future__ import annotations

import math

import torch

from turboquant.kernels._common import HAS_TRITON, LOG2E, KernelTables, check_head_dim
from turboquant.packing import unpack_bits

if HAS_TRITON:
    import triton
    import triton.language as tl


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
) -> torch.Tensor:
    """Materialising float32 reference: dequantize ``[0, length)``, append the residual window,
    GQA softmax attention. ``query`` [B, H_q, 1, d] -> [B, 1, H_q, d] (query dtype)."""
    B, Hq, Tq, d = query.shape
    Hkv = k_codes.shape[1]
    dev = query.device
    k = unpack_rotated_reference(k_codes[:, :, :length], k_norms[:, :, :length], k_tables) @ k_tables.rot.to(dev)
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
        # position p = ((w*4 + i)*4 + b)*2 + h  holds coordinate 32w + 8b + i + 4h (see _unpack_segment)
        p = tl.arange(0, D2)
        return 32 * (p // 32) + 8 * ((p // 2) % 4) + (p // 8) % 4 + 4 * (p % 2)

    @triton.jit
    def _unpack_segment(row_ptr, nmask, lut_ptr, BITS: tl.constexpr, BASE: tl.constexpr,
                        STRIDE: tl.constexpr, D2: tl.constexpr, BLOCK_N: tl.constexpr):
        """Centroid values (float16, unit scale) of one segment of ``BLOCK_N`` packed rows, in the
        permuted coordinate order of ``_perm_coords``. ``row_ptr``: int32 pointers to row starts.

        Reads ``BITS · d2/8`` bytes a row as 32-bit words. SWAR: ``(w >> i) & 0x11111111`` moves
        bit j of codes (8k+i, 8k+i+4) of every byte k to bits (0, 4); OR-ing the planes at << j
        leaves in each byte the pair (code 8k+i | code 8k+i+4 << 4): 2 integer ops per plane per
        8 codes. Each byte then indexes the 256-entry low/high centroid tables directly.
        """
        W: tl.constexpr = D2 // 32
        offs_w = tl.arange(0, W)
        i4 = tl.arange(0, 4)
        acc = tl.zeros((BLOCK_N, W, 4), dtype=tl.int32)
        for j in tl.static_range(BITS):
            wj = tl.load(row_ptr[:, None] + (BASE + j * STRIDE) // 4 + offs_w[None, :], mask=nmask[:, None], other=0)
            acc |= ((wj[:, :, None] >> i4[None, None, :]) & 0x11111111) << j
        byt = (acc[:, :, :, None] >> (i4 * 8)[None, None, None, :]) & 0xFF  # [BLOCK_N, W, 4(i), 4(b)]
        lo = tl.load(lut_ptr + byt)
        hi = tl.load(lut_ptr + 256 + byt)
        return tl.reshape(tl.join(lo, hi), (BLOCK_N, D2))

    @triton.jit
    def _decode_partial_kernel(
        qrot_ptr, kc_ptr, kn_ptr, vc_ptr, vn_ptr, klut_ptr, vlut_ptr,
        m_ptr, l_ptr, acc_ptr,
        length, chunk, S, Hkv,
        skc_b, skc_h, skc_n, skn_b, skn_h, skn_n,
        svc_b, svc_h, svc_n, svn_b, svn_h, svn_n,
        G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
        KBA: tl.constexpr, KPA: tl.constexpr, KSA: tl.constexpr,
        KBB: tl.constexpr, KPB: tl.constexpr, KSB: tl.constexpr,
        VBA: tl.constexpr, VPA: tl.constexpr, VSA: tl.constexpr,
        VBB: tl.constexpr, VPB: tl.constexpr, VSB: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # One program: one KV head of one sequence, `chunk` packed tokens, all G query heads.
        # Reads chunk · 2 · (d·bits/8 + 2) bytes; writes G · (d + 2) float32 partials.
        D2: tl.constexpr = D // 2
        pid_s = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // Hkv
        h = pid_bh % Hkv
        start = pid_s * chunk
        end = tl.minimum(start + chunk, length)

        g = tl.arange(0, G_PAD)
        gmask = g < G
        coords = _perm_coords(D2)
        q_row = qrot_ptr + (pid_bh * G + g) * D  # q_rot is [B, Hq, D] contiguous, Hq = Hkv·G
        qa = tl.load(q_row[:, None] + coords[None, :], mask=gmask[:, None], other=0.0)
        qb = tl.load(q_row[:, None] + D2 + coords[None, :], mask=gmask[:, None], other=0.0)

        m_i = tl.full((G_PAD,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((G_PAD,), dtype=tl.float32)
        acc_a = tl.zeros((G_PAD, D2), dtype=tl.float32)
        acc_b = tl.zeros((G_PAD, D2), dtype=tl.float32)

        kc_base = kc_ptr + b * skc_b + h * skc_h
        vc_base = vc_ptr + b * svc_b + h * svc_h
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            nmask = offs_n < end
            krow = kc_base + offs_n * skc_n
            ka = _unpack_segment(krow, nmask, klut_ptr, KBA, KPA, KSA, D2, BLOCK_N)
            kb = _unpack_segment(krow, nmask, klut_ptr + 512, KBB, KPB, KSB, D2, BLOCK_N)
            s = tl.dot(qa, tl.trans(ka)) + tl.dot(qb, tl.trans(kb))  # [G_PAD, BLOCK_N], log2 units
            kn = tl.load(kn_ptr + b * skn_b + h * skn_h + offs_n * skn_n, mask=nmask, other=0.0).to(tl.float32)
            s = tl.where(nmask[None, :], s * kn[None, :], float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            vn = tl.load(vn_ptr + b * svn_b + h * svn_h + offs_n * svn_n, mask=nmask, other=0.0).to(tl.float32)
            pv = (p * vn[None, :]).to(tl.float16)
            vrow = vc_base + offs_n * svc_n
            va = _unpack_segment(vrow, nmask, vlut_ptr, VBA, VPA, VSA, D2, BLOCK_N)
            vb = _unpack_segment(vrow, nmask, vlut_ptr + 512, VBB, VPB, VSB, D2, BLOCK_N)
            acc_a = acc_a * alpha[:, None] + tl.dot(pv, va)
            acc_b = acc_b * alpha[:, None] + tl.dot(pv, vb)
            m_i = m_new

        part = (pid_bh * S + pid_s) * G + g
        tl.store(m_ptr + part, m_i, mask=gmask)
        tl.store(l_ptr + part, l_i, mask=gmask)
        tl.store(acc_ptr + part[:, None] * D + coords[None, :], acc_a, mask=gmask[:, None])
        tl.store(acc_ptr + part[:, None] * D + D2 + coords[None, :], acc_b, mask=gmask[:, None])

    @triton.jit
    def _decode_combine_kernel(
        m_ptr, l_ptr, acc_ptr, q_ptr, rk_ptr, rv_ptr, out_rot_ptr, out_res_ptr,
        S, R, Hq, qk_scale,
        sq_b, sq_h, srk_b, srk_h, srk_n, srv_b, srv_h, srv_n,
        G: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        # One program per (sequence, query head). Reads S·(d+2) float32 partials and R·d residual
        # K and V values; writes 2·d float32.
        pid = tl.program_id(0)
        b = pid // Hq
        hq = pid % Hq
        Hkv = Hq // G
        hk = hq // G
        g = hq % G
        bh = b * Hkv + hk
        offs_d = tl.arange(0, D)
        offs_s = tl.arange(0, BLOCK_S)

        # compressed part: merge the splits (two passes: max, then weighted sums)
        m_c = float("-inf")
        for s0 in range(0, S, BLOCK_S):
            sm = s0 + offs_s < S
            m = tl.load(m_ptr + (bh * S + s0 + offs_s) * G + g, mask=sm, other=float("-inf"))
            m_c = tl.maximum(m_c, tl.max(m, axis=0))
        l_c = 0.0
        acc_c = tl.zeros((D,), dtype=tl.float32)
        for s0 in range(0, S, BLOCK_S):
            sm = s0 + offs_s < S
            part = (bh * S + s0 + offs_s) * G + g
            m = tl.load(m_ptr + part, mask=sm, other=float("-inf"))
            w = tl.where(sm, tl.exp2(m - m_c), 0.0)
            l_c += tl.sum(w * tl.load(l_ptr + part, mask=sm, other=0.0), axis=0)
            a = tl.load(acc_ptr + part[:, None] * D + offs_d[None, :], mask=sm[:, None], other=0.0)
            acc_c += tl.sum(w[:, None] * a, axis=0)

        # residual window, original domain
        q = tl.load(q_ptr + b * sq_b + hq * sq_h + offs_d).to(tl.float32) * qk_scale
        offs_r = tl.arange(0, BLOCK_R)
        m_r = float("-inf")
        l_r = 0.0
        acc_r = tl.zeros((D,), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            rm = r0 + offs_r < R
            k = tl.load(rk_ptr + b * srk_b + hk * srk_h + (r0 + offs_r)[:, None] * srk_n + offs_d[None, :],
                        mask=rm[:, None], other=0.0).to(tl.float32)
            sc = tl.where(rm, tl.sum(k * q[None, :], axis=1), float("-inf"))
            m_new = tl.maximum(m_r, tl.max(sc, axis=0))
            alpha = tl.exp2(m_r - m_new)
            p = tl.exp2(sc - m_new)
            l_r = l_r * alpha + tl.sum(p, axis=0)
            v = tl.load(rv_ptr + b * srv_b + hk * srv_h + (r0 + offs_r)[:, None] * srv_n + offs_d[None, :],
                        mask=rm[:, None], other=0.0).to(tl.float32)
            acc_r = acc_r * alpha + tl.sum(p[:, None] * v, axis=0)
            m_r = m_new

        m_t = tl.maximum(m_c, m_r)
        wc = tl.exp2(m_c - m_t)
        wr = tl.exp2(m_r - m_t)
        inv = 1.0 / (l_c * wc + l_r * wr)
        tl.store(out_rot_ptr + pid * D + offs_d, acc_c * (wc * inv))
        tl.store(out_res_ptr + pid * D + offs_d, acc_r * (wr * inv))


# ------------------------------------------------------------------------------------------------
# wrapper
# ------------------------------------------------------------------------------------------------
_SM_COUNT: dict = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device]


def _check_store(name: str, codes: torch.Tensor, norms: torch.Tensor, tables: KernelTables, B: int, length: int) -> None:
    if codes.dtype != torch.uint8 or codes.dim() != 4:
        raise TypeError(f"`{name}_codes` must be uint8 [B, H_kv, capacity, code_nbytes], got {codes.dtype} {tuple(codes.shape)}")
    if codes.shape[0] != B or codes.shape[-1] != tables.code_nbytes:
        raise ValueError(f"`{name}_codes` shape {tuple(codes.shape)} does not match B={B}, code_nbytes={tables.code_nbytes}")
    if codes.stride(-1) != 1 or any(s % 4 for s in codes.stride()[:-1]) or codes.storage_offset() % 4:
        raise ValueError(f"`{name}_codes` rows must be contiguous and 4-byte aligned (the kernel reads 32-bit words)")
    if norms.dtype != torch.float16 or tuple(norms.shape) != tuple(codes.shape[:3]):
        raise ValueError(f"`{name}_norms` must be float16 {tuple(codes.shape[:3])}, got {norms.dtype} {tuple(norms.shape)}")
    if length > codes.shape[2]:
        raise ValueError(f"length {length} exceeds the {name} store capacity {codes.shape[2]}")


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
    block_n: int = 64,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Decode attention of one query token over a packed TurboQuant-mse KV store + residual window.

    Args:
        query: [B, H_q, 1, d] float (bf16/fp16/fp32); H_q a multiple of H_kv.
        k_codes, v_codes: uint8 [B, H_kv, capacity, code_nbytes] (``PackedStore.codes``).
        k_norms, v_norms: float16 [B, H_kv, capacity] (``PackedStore.norms``).
        length: valid packed tokens ``[0, length)``.
        k_tables, v_tables: :class:`KernelTables` of the layer's K and V quantizers.
        scaling: softmax scale (1/sqrt(d) usually).
        residual_k, residual_v: [B, H_kv, R, d] full-precision recent tokens (after the codes), or None.
    Returns:
        [B, 1, H_q, d] in the query's dtype.
    """
    if not HAS_TRITON:
        raise RuntimeError("decode_attention needs Triton; use decode_attention_reference")
    if query.dim() != 4 or query.shape[2] != 1:
        raise ValueError(f"`query` must be [B, H_q, 1, d] (one decode token), got {tuple(query.shape)}")
    B, Hq, _, d = query.shape
    check_head_dim(d)
    if k_tables.d != d or v_tables.d != d:
        raise ValueError(f"tables built for d={k_tables.d}/{v_tables.d}, query has d={d}")
    _check_store("k", k_codes, k_norms, k_tables, B, length)
    _check_store("v", v_codes, v_norms, v_tables, B, length)
    Hkv = k_codes.shape[1]
    if Hq % Hkv:
        raise ValueError(f"H_q={Hq} must be a multiple of H_kv={Hkv}")
    G = Hq // Hkv
    R = 0 if residual_k is None else residual_k.shape[2]
    if R and (residual_v is None or residual_v.shape != residual_k.shape or residual_k.stride(-1) != 1
              or residual_v.stride(-1) != 1):
        raise ValueError("`residual_k`/`residual_v` must both be [B, H_kv, R, d] with a contiguous last dim")
    if length == 0 and R == 0:
        raise ValueError("nothing to attend to: length == 0 and no residual window")
    dev = query.device
    qk_scale = float(scaling) * LOG2E

    q2 = query.reshape(B * Hq, d)
    out_rot = torch.empty(B * Hq, d, dtype=torch.float32, device=dev)
    out_res = torch.empty(B * Hq, d, dtype=torch.float32, device=dev)

    if length > 0:
        # 1. rotate the query once: q_rot = Π_k q · scaling · log2 e   ([B·Hq, d] @ [d, d])
        q_rot = torch.mm(q2.to(torch.float32), k_tables.rot_t).mul_(qk_scale).to(torch.float16)
        # 2. split-K over the packed tokens: ~2 programs per SM
        if num_splits is None:
            want = max(1, (2 * _num_sms(dev)) // (B * Hkv))
            chunk = triton.cdiv(triton.cdiv(length, want), block_n) * block_n
            chunk = max(chunk, 4 * block_n)
        else:
            chunk = triton.cdiv(triton.cdiv(length, num_splits), block_n) * block_n
        S = triton.cdiv(length, chunk)
        g_pad = max(16, triton.next_power_of_2(G))
        m_part = torch.empty(B * Hkv, S, G, dtype=torch.float32, device=dev)
        l_part = torch.empty_like(m_part)
        acc_part = torch.empty(B * Hkv, S, G, d, dtype=torch.float32, device=dev)
        kc32 = k_codes.view(torch.int32)
        vc32 = v_codes.view(torch.int32)
        (kba, kpa, ksa), (kbb, kpb, ksb) = k_tables.seg
        (vba, vpa, vsa), (vbb, vpb, vsb) = v_tables.seg
        _decode_partial_kernel[(S, B * Hkv)](
            q_rot, kc32, k_norms, vc32, v_norms, k_tables.lut, v_tables.lut,
            m_part, l_part, acc_part,
            length, chunk, S, Hkv,
            kc32.stride(0), kc32.stride(1), kc32.stride(2), k_norms.stride(0), k_norms.stride(1), k_norms.stride(2),
            vc32.stride(0), vc32.stride(1), vc32.stride(2), v_norms.stride(0), v_norms.stride(1), v_norms.stride(2),
            G=G, G_PAD=g_pad, D=d,
            KBA=kba, KPA=kpa, KSA=ksa, KBB=kbb, KPB=kpb, KSB=ksb,
            VBA=vba, VPA=vpa, VSA=vsa, VBB=vbb, VPB=vpb, VSB=vsb,
            BLOCK_N=block_n, num_warps=4, num_stages=2,
        )
    else:
        S = 0
        m_part = l_part = acc_part = out_rot  # never read
    # 3. merge splits + residual window
    rk = residual_k if R else out_rot.view(1, 1, -1, d)
    rv = residual_v if R else out_rot.view(1, 1, -1, d)
    _decode_combine_kernel[(B * Hq,)](
        m_part, l_part, acc_part, query, rk, rv, out_rot, out_res,
        S, R, Hq, qk_scale,
        query.stride(0), query.stride(1),
        rk.stride(0), rk.stride(1), rk.stride(2), rv.stride(0), rv.stride(1), rv.stride(2),
        G=G, D=d, BLOCK_S=16, BLOCK_R=16 if d == 256 else 32, num_warps=4,
    )
    # 4. un-rotate the compressed part once per head and add the residual part
    out = torch.addmm(out_res, out_rot, v_tables.rot)
    return out.view(B, 1, Hq, d).to(query.dtype)


def decode_attention_store(
    query: torch.Tensor,
    k_store,
    v_store,
    k_tables: KernelTables,
    v_tables: KernelTables,
    scaling: float,
    residual_k: torch.Tensor | None = None,
    residual_v: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`decode_attention` over two ``PackedStore``-like objects (``.codes``, ``.norms``,
    ``.length``; MSE mode: ``.qjl`` must be None)."""
    for name, st in (("k", k_store), ("v", v_store)):
        if getattr(st, "qjl", None) is not None:
            raise NotImplementedError(f"{name} store holds QJL (prod) codes: the kernels support mode='mse' only")
    return decode_attention(
        query, k_store.codes, k_store.norms, v_store.codes, v_store.norms, int(k_store.length),
        k_tables, v_tables, scaling, residual_k, residual_v,
    )
