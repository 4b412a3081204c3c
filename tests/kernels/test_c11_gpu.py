"""C11 on GPU: decode attention over packed 3.5-bit codes vs torch SDPA on bf16 K/V, at 32k context.

Shape of one Qwen3.6-27B full-attention layer (24 query heads, 4 KV heads, head_dim 256, a
128-token bf16 residual window), batch 1 and 8. Both latencies are medians of CUDA-graph replays
over rotating buffer sets larger than L2 (``turboquant.kernels.timing.graph_time_ms``), measured in
the same run; the claim is the ratio. DESIGN threshold (GPU with fused kernels): >= 1.0x at 32k.
``decode_attention(backend="auto")`` runs the CUDA tensor-core kernel (``turboquant.kernels.cuda_decode``)
at this shape; the Triton kernel alone measured 0.7-0.8x (``results/gpu_decode_attention.md``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

CONTEXT = 32768
SHAPE = {"hq": 24, "hkv": 4, "d": 256, "residual": 128}


def _ratio(dev: torch.device, B: int, bits: float) -> dict:
    from turboquant.kernels import KernelTables, decode_attention, quantize_pack
    from turboquant.kernels.timing import graph_time_ms
    from turboquant.quantizer import TurboQuantMSE

    hq, hkv, d, R, N = SHAPE["hq"], SHAPE["hkv"], SHAPE["d"], SHAPE["residual"], CONTEXT
    scale = 1 / math.sqrt(d)
    gen = torch.Generator(device=dev).manual_seed(0)
    n_sdpa = max(1, math.ceil(200e6 / (B * hkv * (N + R) * d * 4)))
    q = [torch.randn(B, hq, 1, d, device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(n_sdpa)]
    kv = [(torch.randn(B, hkv, N + R, d, device=dev, dtype=torch.bfloat16, generator=gen),
           torch.randn(B, hkv, N + R, d, device=dev, dtype=torch.bfloat16, generator=gen)) for _ in range(n_sdpa)]
    t_sdpa = graph_time_ms(
        lambda i: (lambda: F.scaled_dot_product_attention(q[i], kv[i][0], kv[i][1], scale=scale, enable_gqa=True)),
        n_sdpa)
    kt = KernelTables.from_quantizer(TurboQuantMSE(d, bits, seed=1), dev)
    vt = KernelTables.from_quantizer(TurboQuantMSE(d, bits, seed=2), dev)
    n_tq = max(1, math.ceil(200e6 / (B * hkv * N * 2 * (kt.code_nbytes + 2))))
    stores = []
    for i in range(n_tq):
        k, v = kv[i % n_sdpa]
        kc, kn = quantize_pack(k[:, :, :N], kt)
        vc, vn = quantize_pack(v[:, :, :N], vt)
        stores.append((q[i % n_sdpa], kc, kn, vc, vn, k[:, :, N:].contiguous(), v[:, :, N:].contiguous()))
    t_tq = graph_time_ms(
        lambda i: (lambda: decode_attention(stores[i][0], *stores[i][1:5], N, kt, vt, scale, stores[i][5], stores[i][6])),
        n_tq)
    return {"sdpa_bf16_ms": round(t_sdpa, 5), "turboquant_ms": round(t_tq, 5), "ratio": round(t_sdpa / t_tq, 3)}


@pytest.mark.gpu
@pytest.mark.claim("C11", "decode throughput")
def test_c11_gpu_decode_attention_vs_sdpa_32k(cuda, claim):
    import triton

    res = {f"b{B}_{bits}bit": _ratio(cuda, B, bits) for B in (1, 8) for bits in (3.5, 2.5)}
    claim.setting(level="kernel (one full-attention layer, decode step)", context=CONTEXT, **SHAPE,
                  baseline="torch SDPA, bf16 K/V, enable_gqa", timing="CUDA-graph replay median, L2 rotated",
                  gpu=torch.cuda.get_device_name(cuda), torch=torch.__version__, triton=triton.__version__,
                  kernel="turboquant.kernels.cuda_decode (backend='auto')")
    claim.measured(**res)
    claim.threshold(min_ratio_at_32k=1.0, bits=3.5, batches=[1, 8])
    worst = min(res["b1_3.5bit"]["ratio"], res["b8_3.5bit"]["ratio"])
    if worst < 1.0:
        claim.note("the kernel is bound by integer work decoding codes (ncu on H100: ALU pipe ~63% busy, "
                   "DRAM ~26%), not by reading the packed bytes; see results/gpu_decode_attention.md")
    assert worst >= 1.0, f"3.5-bit decode attention at 32k: {worst:.2f}x of bf16 SDPA (need >= 1.0x): {res}"
