"""Bit packing of b-bit codes into uint8 storage (bit-plane layout, shared with the Triton kernels).

For ``n`` codes (``n % 8 == 0``) at ``b`` bits a packed row holds ``b`` planes of ``n / 8`` bytes:
byte ``k`` of plane ``j`` holds bit ``j`` of codes ``8k .. 8k+7`` (code ``8k + i`` in bit ``i``).
So a row costs exactly ``n · b / 8`` bytes and
``idx[m] = Σ_j ((packed[j · n/8 + m // 8] >> (m % 8)) & 1) << j``.
"""

from __future__ import annotations

import torch

MAX_PACK_BITS = 8
_SHIFTS = torch.arange(8, dtype=torch.uint8)


def _check_bits(bits: int) -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= MAX_PACK_BITS:
        raise ValueError(f"`bits` must be an int in 1..{MAX_PACK_BITS} for packing, got {bits!r}")
    return bits


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes for ``n`` codes at ``bits`` bits: ``n · bits / 8`` (``n`` a multiple of 8)."""
    _check_bits(bits)
    if n % 8:
        raise ValueError(f"the number of codes per row must be a multiple of 8, got n={n}")
    return n * bits // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[..., n]`` (values < 2^bits) into uint8 ``[..., n · bits / 8]``."""
    _check_bits(bits)
    if codes.dtype not in (torch.uint8, torch.int16, torch.int32, torch.int64):
        raise TypeError(f"`codes` must be an integer tensor (uint8/int16/int32/int64), got {codes.dtype}")
    n = codes.shape[-1]
    packed_nbytes(n, bits)
    if codes.numel() and int(codes.max()) >= 2**bits:
        raise ValueError(f"`codes` has value {int(codes.max())} >= 2^{bits}; codes must fit in `bits`")
    c = codes.to(torch.uint8).reshape(*codes.shape[:-1], n // 8, 8)
    shifts = _SHIFTS.to(c.device)
    planes = []
    for j in range(bits):
        bit = (c >> j) & 1  # [..., n/8, 8]
        planes.append((bit << shifts).sum(dim=-1, dtype=torch.uint8))  # [..., n/8]
    return torch.cat(planes, dim=-1)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 ``[..., n · bits / 8]`` -> uint8 codes ``[..., n]``."""
    nbytes = packed_nbytes(n, bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"`packed` must be uint8, got {packed.dtype}")
    if packed.shape[-1] != nbytes:
        raise ValueError(f"`packed` has last dim {packed.shape[-1]}, expected {nbytes} for n={n} at {bits} bits")
    planes = packed.reshape(*packed.shape[:-1], bits, n // 8, 1)
    shifts = _SHIFTS.to(packed.device)
    out = torch.zeros(*packed.shape[:-1], n // 8, 8, dtype=torch.uint8, device=packed.device)
    for j in range(bits):
        out |= ((planes[..., j, :, :] >> shifts) & 1) << j
    return out.reshape(*packed.shape[:-1], n)
