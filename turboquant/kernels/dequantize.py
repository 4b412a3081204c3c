"""Dequantize packed TurboQuant-mse codes to full vectors in one pass (``x̃ = ||x|| · Π^T c[idx]``).

What a full-precision attention over the cache needs: a chunked prefill runs SDPA over the whole
history, so every chunk after the first reads the packed stores back as ``[B, H, L, d]`` tensors.
The pure-torch path (``CentroidTable.gather`` + a GEMM against ``Π``) makes several passes over
float32 intermediates; this kernel reads ``d·bits/8 + 2`` bytes a vector, unpacks both code
segments into centroids in registers (the decode kernel's SWAR unpack and pair table), un-rotates
with one tensor-core product against the ±1 matrix ``H diag(s)`` (rows in the kernel's coordinate
order; exact in float16), scales by ``||x|| / sqrt(d)`` and writes ``d`` values of the output
dtype straight into the caller's buffer (e.g. the front of the tensor the
residual window is appended to).

Reads top to bottom: pure-torch reference, Triton kernel, wrapper.
"""

from __future__ import annotations

import math

import torch

from turboquant.kernels._common import (
    HAS_TRITON,
    KernelTables,
    check_head_dim,
    on_input_device,
    position_coords,
)
from turboquant.kernels.decode_attention import _slab_align

if HAS_TRITON:
    import triton
    import triton.language as tl

    from turboquant.kernels.decode_attention import _unpack_segment

OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------------
# reference
# ------------------------------------------------------------------------------------------------
def dequantize_reference(codes: torch.Tensor, norms: torch.Tensor, tables: KernelTables,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x̃ = ||x|| c[idx] Π`` (row vectors) from codes uint8 [..., code_nbytes] and norms [...];
    float32 math, cast to ``dtype`` at the end."""
    from turboquant.kernels.decode_attention import unpack_rotated_reference

    y = unpack_rotated_reference(codes, norms, tables)
    return (y @ tables.rot.to(codes.device)).to(dtype)


# ------------------------------------------------------------------------------------------------
# kernel
# ------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit(do_not_specialize=["length"])
    def _dequantize_kernel(
        c_ptr, n_ptr, lut_ptr, p_ptr, out_ptr,
        length, H,
        sc_b, sc_h, sn_b, sn_h, sn_t, so_b, so_h, so_t,
        D: tl.constexpr, INV_SQRT_D: tl.constexpr,
        BA: tl.constexpr, PA: tl.constexpr, SA: tl.constexpr,
        BB: tl.constexpr, PB: tl.constexpr, SB: tl.constexpr,
        ROW: tl.constexpr, ALIGN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr,
        USE_ASM: tl.constexpr,
    ):
        # grid (cdiv(length, BLOCK_T), B·H): BLOCK_T rows of one (sequence, head).
        # Reads BLOCK_T · (d·bits/8 + 2) bytes, writes BLOCK_T · d output values.
        D2: tl.constexpr = D // 2
        pid_t = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)  # 64-bit offsets: stores and outputs may exceed 2 GiB
        h = (pid_bh % H).to(tl.int64)
        offs_t = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        tmask = offs_t < length
        rows = c_ptr + tl.multiple_of(b * sc_b + h * sc_h, ALIGN) + offs_t * ROW
        ya = _unpack_segment(rows, tmask, lut_ptr, BA, PA, SA, D2, BLOCK_T, USE_ASM)
        yb = _unpack_segment(rows, tmask, lut_ptr + 256, BB, PB, SB, D2, BLOCK_T, USE_ASM)
        # kernel position order: [segment A | segment B], each in _perm_coords order (float16 centroids)
        y = tl.reshape(tl.permute(tl.join(ya, yb), (0, 2, 1)), (BLOCK_T, D))
        scale = tl.load(n_ptr + b * sn_b + h * sn_h + offs_t * sn_t, mask=tmask, other=0.0).to(tl.float32) * INV_SQRT_D
        # x̃ = ||x|| y Π = ||x|| / sqrt(d) · y_pos (H diag(s))[nat, :]: ±1 float16 entries, so the
        # tensor-core product of float16 centroids is exact up to float32 accumulation
        offs_k = tl.arange(0, D)
        out_rows = out_ptr + b * so_b + h * so_h + offs_t * so_t
        for j0 in tl.static_range(0, D, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            pm = tl.load(p_ptr + offs_k[:, None] * D + offs_j[None, :])
            x = tl.dot(y, pm) * scale[:, None]
            tl.store(out_rows[:, None] + offs_j[None, :], x.to(out_ptr.dtype.element_ty), mask=tmask[:, None])


# ------------------------------------------------------------------------------------------------
# wrapper
# ------------------------------------------------------------------------------------------------
def signed_hadamard_positions(tables: KernelTables) -> torch.Tensor:
    """float16 [d, d] ``(H diag(s))[nat, :]`` (entries ±1): row ``k`` is the row of ``H diag(s)``
    of the coordinate the kernels hold at position ``k``; cached on ``tables``."""
    cache = tables.__dict__.setdefault("_dequantize", {})
    if "pm" not in cache:
        d = tables.d
        pm = tables.rot.detach().cpu().double() * math.sqrt(d)  # Π·sqrt(d) = H diag(s), ±1
        cache["pm"] = pm[position_coords(d)].round().to(torch.float16).contiguous().to(tables.device)
    return cache["pm"]


@on_input_device
def dequantize(
    codes: torch.Tensor,
    norms: torch.Tensor,
    length: int,
    tables: KernelTables,
    dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
    block_t: int | None = None,
    outliers: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x̃`` [B, H, length, d] of the first ``length`` packed vectors of a store.

    ``tables`` from ``KernelTables.from_layout``: outlier layouts (code-space tables) run
    :func:`turboquant.kernels.codespace.dequantize_codespace` (norms [B, H, cap, groups],
    ``outliers`` [H, n_out]: the store's).

    Args:
        codes: uint8 [B, H, capacity, code_nbytes] (``PackedStore.codes``, rows contiguous).
        norms: float16 [B, H, capacity] (``PackedStore.norms``).
        length: vectors to dequantize, ``0 <= length <= capacity``.
        tables: :class:`KernelTables` of the store's quantizer (mse mode, Hadamard rotation).
        dtype: output dtype (float32 / float16 / bfloat16) when ``out`` is None.
        out: optional [B, H, >= length, d] destination (unit stride in d); rows ``[0, length)``
            are written, the rest left as they are.
    Returns:
        ``out[:, :, :length]`` (or a new tensor).
    """
    if not isinstance(tables, KernelTables):
        from turboquant.kernels.codespace import dequantize_codespace

        return dequantize_codespace(codes, norms, length, tables, outliers, dtype, out, block_t or 32)
    if codes.dtype != torch.uint8 or codes.dim() != 4:
        raise TypeError(f"`codes` must be uint8 [B, H, capacity, code_nbytes], got {codes.dtype} {tuple(codes.shape)}")
    B, H, cap, nb = codes.shape
    d = check_head_dim(tables.d)
    if nb != tables.code_nbytes:
        raise ValueError(f"`codes` hold {nb} bytes a vector, the tables {tables.code_nbytes} (d={d}, bits={tables.bits})")
    if codes.stride(-1) != 1 or codes.stride(2) != nb or any(s % 4 for s in codes.stride()[:2]) or codes.storage_offset() % 4:
        raise ValueError("`codes` rows must be contiguous and 4-byte aligned (the kernel reads 32-bit words)")
    if norms.dtype != torch.float16 or tuple(norms.shape) != (B, H, cap):
        raise ValueError(f"`norms` must be float16 {(B, H, cap)}, got {norms.dtype} {tuple(norms.shape)}")
    if not 0 <= length <= cap:
        raise ValueError(f"`length` must be in [0, {cap}] (the store capacity), got {length}")
    if out is None:
        if dtype not in OUT_DTYPES:
            raise ValueError(f"`dtype` must be one of {OUT_DTYPES}, got {dtype}")
        out = torch.empty(B, H, length, d, dtype=dtype, device=codes.device)
    elif (out.dim() != 4 or tuple(out.shape[:2]) != (B, H) or out.shape[2] < length or out.shape[3] != d
          or out.stride(-1) != 1 or out.dtype not in OUT_DTYPES or out.device != codes.device):
        raise ValueError(f"`out` must be a {OUT_DTYPES} tensor [{B}, {H}, >= {length}, {d}] on {codes.device} "
                         f"with unit stride in d, got {out.dtype} {tuple(out.shape)} strides {out.stride()}")
    if length == 0:
        return out[:, :, :0]
    if not HAS_TRITON:
        raise RuntimeError("dequantize needs Triton; use dequantize_reference")
    block_t = block_t or 64
    c32 = codes.view(torch.int32)
    (ba, pa, sa), (bb, pb, sb) = tables.seg
    pm = signed_hadamard_positions(tables)
    if pm.device != codes.device:
        raise ValueError(f"`tables` live on {pm.device}, the codes on {codes.device}")
    _dequantize_kernel[(triton.cdiv(length, block_t), B * H)](
        c32, norms, tables.lut32, pm, out,
        length, H,
        c32.stride(0), c32.stride(1), norms.stride(0), norms.stride(1), norms.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        D=d, INV_SQRT_D=1.0 / math.sqrt(d),
        BA=ba, PA=pa, SA=sa, BB=bb, PB=pb, SB=sb,
        ROW=nb // 4, ALIGN=_slab_align(c32), BLOCK_T=block_t, BLOCK_J=min(d, 64),
        USE_ASM=codes.device.type == "cuda",
        num_warps=4,
    )
    return out[:, :, :length]
