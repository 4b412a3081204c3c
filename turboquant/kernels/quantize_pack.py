"""Quantize + pack: rotate (signed FWHT), nearest centroid, float16 norm, bit-plane packing.

One pass over the input: read ``M·d`` floats, write ``M·d·bits/8`` code bytes and ``M`` float16
norms. Used for keys/values as they are appended to the cache (prefill blocks and single decode
tokens); the output is byte-identical to ``TurboQuantMSE.pack(TurboQuantMSE.quantize(x))`` up to
coordinates that fall within float32 rounding of a codebook boundary.

Reads top to bottom: pure-torch reference, Triton kernel, wrapper.
"""

from __future__ import annotations

import math

import torch

from turboquant.kernels._common import HAS_TRITON, KernelTables, check_head_dim, on_input_device
from turboquant.packing import pack_bits

if HAS_TRITON:
    import triton
    import triton.language as tl

    from turboquant.kernels._common import fwht_tile

_NORM_MAX = torch.finfo(torch.float16).max


# ------------------------------------------------------------------------------------------------
# reference
# ------------------------------------------------------------------------------------------------
def quantize_pack_reference(x: torch.Tensor, tables: KernelTables) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch quantize + pack. ``x`` [..., d] float -> (codes uint8 [..., code_nbytes], norms float16 [...])."""
    d = tables.d
    xf = x.to(torch.float32)
    norms = torch.linalg.vector_norm(xf, dim=-1)
    y = (xf / norms.clamp_min(1e-30).unsqueeze(-1)) @ tables.rot_t.to(x.device)  # Π x / ||x||
    half = d // 2
    idx = []
    for s in range(2):
        nb = tables.seg[s][0]
        bnd = tables.boundaries[s, : 2**nb - 1].to(x.device)
        idx.append(torch.bucketize(y[..., s * half : (s + 1) * half].contiguous(), bnd).to(torch.uint8))
    (ba, _, sa), (bb, _, _) = tables.seg
    if sa == d // 8:  # integer bits: one b-bit plane set over all d coordinates
        codes = pack_bits(torch.cat(idx, dim=-1), ba)
    else:  # fractional: (b+1)-bit segment, then b-bit segment
        codes = torch.cat([pack_bits(idx[0], ba), pack_bits(idx[1], bb)], dim=-1)
    return codes, norms.to(torch.float16)


# ------------------------------------------------------------------------------------------------
# kernel
# ------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _pack_segment(y, row_ptr, rmask, bnd_ptr, BITS: tl.constexpr, BASE: tl.constexpr,
                      STRIDE: tl.constexpr, D2: tl.constexpr, BLOCK_M: tl.constexpr):
        # nearest centroid = number of boundaries below y (ties go to the lower code, as bucketize)
        idx = tl.zeros((BLOCK_M, D2), dtype=tl.int32)
        for k in tl.static_range((1 << BITS) - 1):
            idx += (y > tl.load(bnd_ptr + k)).to(tl.int32)
        idx3 = tl.reshape(idx, (BLOCK_M, D2 // 8, 8))
        sh = tl.arange(0, 8)
        offs_b = tl.arange(0, D2 // 8)
        for j in tl.static_range(BITS):
            # plane j, byte k: bit j of codes 8k..8k+7, code 8k+i in bit i
            byte = tl.sum(((idx3 >> j) & 1) << sh[None, None, :], axis=2)
            tl.store(row_ptr[:, None] + BASE + j * STRIDE + offs_b[None, :], byte.to(tl.uint8), mask=rmask[:, None])

    @triton.jit
    def _quantize_pack_kernel(
        x_ptr, codes_ptr, norms_ptr, signs_ptr, bnd_ptr, pos_ptr,
        n_rows, H, T, cap, pos_sb,
        sx_b, sx_h, sx_t, sc_b, sc_h, sc_t, sn_b, sn_h, sn_t,
        D: tl.constexpr, INV_SQRT_D: tl.constexpr,
        BITS_A: tl.constexpr, BASE_A: tl.constexpr, STRIDE_A: tl.constexpr,
        BITS_B: tl.constexpr, BASE_B: tl.constexpr, STRIDE_B: tl.constexpr,
        BLOCK_M: tl.constexpr, HAS_POS: tl.constexpr,
    ):
        # HAS_POS: row t of sequence b is written at t + pos[b] (a device tensor: a static cache's
        # write offset, no host sync); rows past `cap` are dropped.
        # Memory traffic per row: read d input values (2 or 4 B each), write d·bits/8 code bytes
        # and one 2-byte norm. The rotation, search and packing stay in registers.
        pid = tl.program_id(0)
        rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # 64-bit offsets: buffers may exceed 2 GiB
        rmask = rows < n_rows
        t = rows % T
        bh = rows // T
        h = bh % H
        b = bh // H
        offs_d = tl.arange(0, D)
        x = tl.load(x_ptr + (b * sx_b + h * sx_h + t * sx_t)[:, None] + offs_d[None, :],
                    mask=rmask[:, None], other=0.0).to(tl.float32)
        norm = tl.sqrt(tl.sum(x * x, axis=1))
        u = x / tl.maximum(norm, 1e-30)[:, None]
        s = tl.load(signs_ptr + offs_d)
        y = fwht_tile(u * s[None, :], BLOCK_M, D) * INV_SQRT_D  # y = Π x / ||x||
        y3 = tl.permute(tl.reshape(y, (BLOCK_M, 2, D // 2)), (0, 2, 1))
        ya, yb = tl.split(y3)  # coordinates [0, d/2) and [d/2, d)
        tw = t
        wmask = rmask
        if HAS_POS:
            tw = t + tl.load(pos_ptr + b * pos_sb, mask=rmask, other=0).to(tl.int64)
            wmask = rmask & (tw < cap)
        row_ptr = codes_ptr + b * sc_b + h * sc_h + tw * sc_t
        _pack_segment(ya, row_ptr, wmask, bnd_ptr, BITS_A, BASE_A, STRIDE_A, D // 2, BLOCK_M)
        _pack_segment(yb, row_ptr, wmask, bnd_ptr + 16, BITS_B, BASE_B, STRIDE_B, D // 2, BLOCK_M)
        tl.store(norms_ptr + b * sn_b + h * sn_h + tw * sn_t, norm.to(tl.float16), mask=wmask)


# ------------------------------------------------------------------------------------------------
# wrapper
# ------------------------------------------------------------------------------------------------
def _as4d(t: torch.Tensor, lead: int) -> torch.Tensor:
    """View with exactly 3 leading dims (size-1 dims prepended) + the trailing ``lead`` dims."""
    while t.dim() < 3 + lead:
        t = t.unsqueeze(0)
    return t


@on_input_device
def quantize_pack(
    x: torch.Tensor,
    tables: KernelTables,
    out_codes: torch.Tensor | None = None,
    out_norms: torch.Tensor | None = None,
    check_range: bool = True,
    outliers: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize and pack ``x`` [..., d] (at most 3 leading dims, e.g. ``[B, H_kv, T, d]``).

    ``positions``: an int32/int64 device tensor ([], [1] or [B]) for a static cache: ``x``
    [B, H, T, d] is written at rows ``positions[b] + [0, T)`` of the *whole* buffers ``out_codes``
    [B, H, cap, code_nbytes] / ``out_norms`` [B, H, cap(, groups)] (no host sync, CUDA-graph
    capturable); rows past ``cap`` are dropped (a CPU tensor is checked, a CUDA one cannot be).

    ``tables`` from ``KernelTables.from_layout``: halves layouts run this kernel; outlier layouts
    (code-space tables) run :func:`turboquant.kernels.codespace.quantize_pack_codespace` (``x``
    [B, H, T, d], ``outliers`` [H, n_out], norms [B, H, T, groups]).

    Writes into ``out_codes`` uint8 [..., code_nbytes] / ``out_norms`` float16 [...] when given
    (e.g. ``store.codes[:, :, L:L+T]``: any strides, last dim contiguous), else allocates them.
    ``check_range`` raises like the core quantizer when a norm exceeds float16 (one host sync;
    pass False on the decode hot path). Returns ``(codes, norms)``.
    """
    if not isinstance(tables, KernelTables):
        from turboquant.kernels.codespace import quantize_pack_codespace

        return quantize_pack_codespace(x, tables, outliers, out_codes, out_norms, check_range, positions)
    if not HAS_TRITON:
        raise RuntimeError("quantize_pack needs Triton (pip install triton); use quantize_pack_reference")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"`x` must be float32/float16/bfloat16, got {x.dtype}")
    d = check_head_dim(x.shape[-1])
    if d != tables.d:
        raise ValueError(f"`x` has last dim {d}, the tables were built for d={tables.d}")
    if x.dim() > 4 or x.dim() < 1:
        raise ValueError(f"`x` must have 1..4 dims ([B, H, T, d] at most), got shape {tuple(x.shape)}")
    if check_range and x.numel() and float(torch.linalg.vector_norm(x.float(), dim=-1).max()) > _NORM_MAX:
        raise ValueError(f"a vector norm exceeds the float16 norm storage range ({_NORM_MAX:.0f})")
    lead = x.shape[:-1]
    pos, pos_sb, cap = None, 0, 0
    if positions is not None:
        pos, pos_sb, cap, lead = check_positions(positions, x, out_codes, out_norms)
    if out_codes is None:
        out_codes = torch.empty(*lead, tables.code_nbytes, dtype=torch.uint8, device=x.device)
    if out_norms is None:
        out_norms = torch.empty(*lead, dtype=torch.float16, device=x.device)
    if tuple(out_codes.shape) != (*lead, tables.code_nbytes) or out_codes.dtype != torch.uint8:
        raise ValueError(f"`out_codes` must be uint8 {(*lead, tables.code_nbytes)}, got {out_codes.dtype} {tuple(out_codes.shape)}")
    if tuple(out_norms.shape) != tuple(lead) or out_norms.dtype != torch.float16:
        raise ValueError(f"`out_norms` must be float16 {tuple(lead)}, got {out_norms.dtype} {tuple(out_norms.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if out_codes.stride(-1) != 1:
        raise ValueError("`out_codes` must be contiguous in its last dim")
    n_rows = math.prod(x.shape[:-1]) if x.dim() > 1 else 1
    if n_rows == 0:
        return out_codes, out_norms
    x4, c4 = _as4d(x, 1), _as4d(out_codes, 1)
    n4 = out_norms
    while n4.dim() < 3:
        n4 = n4.unsqueeze(0)
    _, H, T, _ = x4.shape
    (ba, pa, sa), (bb, pb, sb) = tables.seg
    block_m = 16 if d <= 128 else 8
    grid = (triton.cdiv(n_rows, block_m),)
    _quantize_pack_kernel[grid](
        x4, c4, n4, tables.signs, tables.boundaries, pos if pos is not None else n4,
        n_rows, H, T, cap, pos_sb,
        x4.stride(0), x4.stride(1), x4.stride(2),
        c4.stride(0), c4.stride(1), c4.stride(2),
        n4.stride(0), n4.stride(1), n4.stride(2),
        D=d, INV_SQRT_D=1.0 / math.sqrt(d),
        BITS_A=ba, BASE_A=pa, STRIDE_A=sa, BITS_B=bb, BASE_B=pb, STRIDE_B=sb,
        BLOCK_M=block_m, HAS_POS=pos is not None, num_warps=4,
    )
    return out_codes, out_norms


def check_positions(positions: torch.Tensor, x: torch.Tensor, out_codes, out_norms):
    """Validate a device write offset for :func:`quantize_pack`; returns ``(positions, batch
    stride, capacity, buffer lead dims)``."""
    if x.dim() != 4:
        raise ValueError(f"`positions` needs `x` as [B, H, T, d], got shape {tuple(x.shape)}")
    if out_codes is None or out_norms is None:
        raise ValueError("`positions` writes into whole buffers: pass `out_codes` and `out_norms`")
    B, H, T, _ = x.shape
    if out_codes.dim() != 4 or tuple(out_codes.shape[:2]) != (B, H):
        raise ValueError(f"`out_codes` must be [B={B}, H={H}, capacity, code_nbytes], got {tuple(out_codes.shape)}")
    cap = out_codes.shape[2]
    if not isinstance(positions, torch.Tensor) or positions.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"`positions` must be an int32/int64 tensor, got {positions!r}")
    if positions.dim() > 1 or positions.numel() not in (1, B) or positions.device != x.device:
        raise ValueError(f"`positions` must have shape [], [1] or [B]=[{B}] on {x.device}, got "
                         f"{tuple(positions.shape)} on {positions.device}")
    if positions.device.type == "cpu" and (int(positions.min()) < 0 or int(positions.max()) + T > cap):
        raise ValueError(f"`positions` + T={T} must stay in [0, capacity={cap}], got {positions.tolist()}")
    pos = positions.reshape(-1)
    return pos, 0 if pos.numel() == 1 else int(pos.stride(0)), cap, (B, H, cap)
