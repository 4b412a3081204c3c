"""Packed K/V stores of random vectors for the decode-kernel tests (tiny shapes: CPU interpreter
or GPU). One set of quantizers a width is shared by every store of a process, as the stores of one
cache layer share its codec, so only the tensors tell two stores apart."""

from __future__ import annotations

import functools

import torch

from turboquant.quantizer import TurboQuantMSE, TurboQuantProd


@functools.cache
def quantizers(d: int, kbits: float, vbits: float) -> tuple:
    """(key mse, value mse, key prod) quantizers of one width pair (cached: shared kernel tables)."""
    return TurboQuantMSE(d, kbits, seed=5), TurboQuantMSE(d, vbits, seed=6), TurboQuantProd(d, kbits, seed=7)


def packed_store(dev, cap: int, seed: int, *, b: int, hkv: int, d: int, kbits: float = 3.5,
                 vbits: float | None = None, prod: bool = False) -> dict:
    """Codes + norms [b, hkv, cap] of random keys and values (``quantize_pack``), their tables, and
    for ``prod`` the TurboQuant-prod keys' MSE part and QJL part instead of the mse keys."""
    from turboquant.kernels import KernelTables, KeyQJL, quantize_pack

    g = torch.Generator().manual_seed(seed)
    kq, vq, pq = quantizers(d, kbits, kbits if vbits is None else vbits)
    kt, vt = KernelTables.from_quantizer(kq, dev), KernelTables.from_quantizer(vq, dev)
    k = torch.randn(b, hkv, cap, d, generator=g)
    v = torch.randn(b, hkv, cap, d, generator=g)
    kc, kn = quantize_pack(k.to(dev), kt)
    vc, vn = quantize_pack(v.to(dev), vt)
    kj = None
    if prod:
        kt = KernelTables.from_quantizer(pq.mse, dev)
        pk = pq.encode(k.to(dev))
        kc, kn = pk.mse.codes, pk.mse.norms
        kj = KeyQJL(qjl=pk.qjl, rnorms=pk.rnorms, S=pq.S.to(dev), scale=float(pq.qjl_scale))
    return {"kc": kc, "kn": kn, "vc": vc, "vn": vn, "kt": kt, "vt": vt, "kj": kj}
