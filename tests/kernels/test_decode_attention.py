"""decode_attention kernel vs the materialising reference (dequantize, append residual, softmax).

Tolerance: the kernel multiplies float16 rotated queries by float16 centroids and float16
probabilities by float16 centroids (tensor cores, float32 accumulation), so outputs agree with the
float32 reference to ~1e-3 relative: asserted as ``assert_close(atol=2e-3, rtol=1e-2)`` on O(1)
outputs plus relative Frobenius error < 2e-3. The reference itself is checked against the core
quantizer's ``decode`` and torch SDPA.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from turboquant.quantizer import PackedMSE, TurboQuantMSE

TINY = [  # (d, k_bits, v_bits, Hq, Hkv, length, R, B) — about a second each under the interpreter
    (64, 3.5, 3.5, 6, 2, 45, 5, 1),
    (64, 4, 2, 2, 1, 0, 9, 1),
]
SMALL = [  # interpreter cases of a few seconds each: no marker, run wherever kernels can run
    (64, 3.5, 3.5, 6, 2, 77, 5, 2),
    (128, 2.5, 4, 4, 4, 40, 0, 1),
]
FULL = [
    (256, 3.5, 3.5, 24, 4, 4097, 128, 1),
    (256, 2.5, 2.5, 24, 4, 1000, 37, 3),
    (256, 4, 3, 24, 4, 63, 1, 2),
    (128, 3.5, 3.5, 32, 8, 3333, 0, 2),
    (128, 2.5, 3.5, 24, 4, 1, 16, 1),
    (64, 3.5, 2.5, 12, 4, 2049, 64, 2),
    (64, 1.5, 2, 8, 8, 513, 3, 1),
    (256, 3, 3, 6, 1, 0, 50, 2),
]


def _ids(grid):
    return [f"d{d}-k{kb}-v{vb}-{hq}x{hkv}-L{n}-R{r}-B{b}" for d, kb, vb, hq, hkv, n, r, b in grid]


def _case(dev, d, kb, vb, hq, hkv, n, r, b, cap_extra=11):
    from turboquant.kernels import KernelTables, quantize_pack

    kq, vq = TurboQuantMSE(d, kb, seed=5), TurboQuantMSE(d, vb, seed=6)
    kt, vt = KernelTables.from_quantizer(kq, dev), KernelTables.from_quantizer(vq, dev)
    gen = torch.Generator().manual_seed(n * 7 + d)
    cap = n + cap_extra
    k = torch.randn(b, hkv, cap, d, generator=gen).to(dev)
    v = torch.randn(b, hkv, cap, d, generator=gen).to(dev)
    kc, kn = quantize_pack(k, kt)
    vc, vn = quantize_pack(v, vt)
    q = (torch.randn(b, hq, 1, d, generator=gen) * 2).to(dev)
    rk = torch.randn(b, hkv, r, d, generator=gen).to(dev) if r else None
    rv = torch.randn(b, hkv, r, d, generator=gen).to(dev) if r else None
    return q, kc, kn, vc, vn, kt, vt, kq, vq, rk, rv


def _check(dev, d, kb, vb, hq, hkv, n, r, b, **kw):
    from turboquant.kernels import decode_attention, decode_attention_reference

    q, kc, kn, vc, vn, kt, vt, kq, vq, rk, rv = _case(dev, d, kb, vb, hq, hkv, n, r, b)
    scale = 1 / math.sqrt(d)
    out = decode_attention(q, kc, kn, vc, vn, n, kt, vt, scale, rk, rv, **kw)
    ref = decode_attention_reference(q, kc, kn, vc, vn, n, kt, vt, scale, rk, rv)
    assert out.shape == (b, 1, hq, d) and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=1e-2)
    rel = float((out - ref).norm() / ref.norm())
    assert rel < 2e-3, f"relative error {rel:.2e}"
    # the reference agrees with the core quantizer's decode + torch SDPA
    ks = [kq.decode(PackedMSE(codes=kc[:, :, :n].cpu(), norms=kn[:, :, :n].cpu()))]
    vs = [vq.decode(PackedMSE(codes=vc[:, :, :n].cpu(), norms=vn[:, :, :n].cpu()))]
    if r:
        ks.append(rk.cpu())
        vs.append(rv.cpu())
    sd = F.scaled_dot_product_attention(q.cpu(), torch.cat(ks, 2), torch.cat(vs, 2), scale=scale, enable_gqa=True)
    torch.testing.assert_close(ref.cpu(), sd.transpose(1, 2), atol=1e-4, rtol=1e-4)


@pytest.mark.integration
@pytest.mark.parametrize("d,kb,vb,hq,hkv,n,r,b", TINY, ids=_ids(TINY))
def test_decode_attention_tiny(kdev, d, kb, vb, hq, hkv, n, r, b):
    _check(kdev, d, kb, vb, hq, hkv, n, r, b, block_n=32)


@pytest.mark.integration
@pytest.mark.parametrize("d,kb,vb,hq,hkv,n,r,b", SMALL, ids=_ids(SMALL))
def test_decode_attention_small(kdev, d, kb, vb, hq, hkv, n, r, b):
    _check(kdev, d, kb, vb, hq, hkv, n, r, b, block_n=32)


@pytest.mark.integration
def test_decode_attention_interpreter_splits(kdev):
    """Several splits and partial last blocks (slower under the interpreter than the tiny cases)."""
    _check(kdev, 256, 3.5, 3.5, 24, 4, 300, 20, 1, block_n=32, num_splits=4)


@pytest.mark.integration
@pytest.mark.parametrize("g", [5, 7, 8])
def test_decode_attention_odd_and_full_gqa_groups_under_the_interpreter(kdev, g):
    """G = H_q / H_kv of 5, 7 and 8 query heads a KV head (padded head rows masked) under the
    interpreter; the GPU test below runs every G from 1 to 8 through both backends."""
    _check(kdev, 64, 3.5, 3.5, g, 1, 45, 5, 1, block_n=32)


GQA_RATIOS = range(1, 9)  # G = H_q / H_kv: the CUDA kernel takes G <= 8 (one MMA n-tile of query heads)


CUDA_CASES = [  # the CUDA (tensor-core register-LUT) kernel: head_dim 256, every segment width, G in {1, 6, 8}
    (256, 3.5, 3.5, 24, 4, 4097, 128, 1),
    (256, 2.5, 2.5, 24, 4, 1000, 37, 3),
    (256, 4, 4, 16, 2, 333, 0, 2),
    (256, 3, 3, 8, 1, 65, 5, 1),
    (256, 2, 2, 4, 4, 17, 0, 1),
    (256, 1.5, 1.5, 12, 2, 1, 3, 2),
    (256, 4, 3, 24, 4, 3001, 64, 2),  # K and V rows of different widths (K4/V3)
    (256, 3.5, 2.5, 8, 1, 777, 0, 1),
]


@pytest.mark.gpu
@pytest.mark.parametrize("d,kb,vb,hq,hkv,n,r,b", FULL, ids=_ids(FULL))
def test_decode_attention_gpu(cuda, d, kb, vb, hq, hkv, n, r, b):
    _check(cuda, d, kb, vb, hq, hkv, n, r, b, backend="triton")
    _check(cuda, d, kb, vb, hq, hkv, n, r, b, backend="auto")


@pytest.mark.gpu
@pytest.mark.parametrize("d,kb,vb,hq,hkv,n,r,b", CUDA_CASES, ids=_ids(CUDA_CASES))
def test_decode_attention_cuda_backend(cuda, d, kb, vb, hq, hkv, n, r, b):
    _check(cuda, d, kb, vb, hq, hkv, n, r, b, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("g", GQA_RATIOS)
def test_decode_attention_every_gqa_ratio_gpu(cuda, g, backend):
    """Every group size G = H_q / H_kv from 1 to 8 (each its own CUDA variant; odd G leave MMA
    rows of the query tile empty) against the reference, 4-bit + 3-bit rounds, a partial last tile."""
    _check(cuda, 256, 3.5, 3.5, 2 * g, 2, 301, 7, 2, backend=backend)


@pytest.mark.gpu
def test_cuda_backend_rejects_unsupported_shapes(cuda):
    from turboquant.kernels import decode_attention

    q, kc, kn, vc, vn, kt, vt, *_ = _case(cuda, 128, 3.5, 3.5, 8, 2, 40, 0, 1)
    with pytest.raises(ValueError, match="head_dim"):
        decode_attention(q, kc, kn, vc, vn, 40, kt, vt, 0.09, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        decode_attention(q, kc, kn, vc, vn, 40, kt, vt, 0.09, backend="cutlass")


@pytest.mark.gpu
def test_decode_attention_gpu_bf16_long(cuda):
    """bf16 query, 32k packed tokens at the Qwen3.6 shape, split count forced both ways."""
    from turboquant.kernels import decode_attention, decode_attention_reference

    q, kc, kn, vc, vn, kt, vt, _, _, rk, rv = _case(cuda, 256, 3.5, 3.5, 24, 4, 32768, 128, 1)
    q = q.to(torch.bfloat16)
    rk, rv = rk.to(torch.bfloat16), rv.to(torch.bfloat16)
    ref = decode_attention_reference(q.float(), kc, kn, vc, vn, 32768, kt, vt, 1 / 16, rk, rv)
    for backend in ("triton", "cuda"):
        for splits in (None, 1, 7):
            out = decode_attention(q, kc, kn, vc, vn, 32768, kt, vt, 1 / 16, rk, rv, num_splits=splits, backend=backend)
            torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=2e-2)  # bf16 output rounding


@pytest.mark.integration
def test_decode_attention_rejects_bad_input(kdev):
    from turboquant.kernels import decode_attention

    q, kc, kn, vc, vn, kt, vt, *_ = _case(kdev, 64, 3.5, 3.5, 4, 2, 8, 0, 1)
    with pytest.raises(ValueError, match="one decode token"):
        decode_attention(torch.cat([q, q], 2), kc, kn, vc, vn, 8, kt, vt, 0.125)
    with pytest.raises(ValueError, match="capacity"):
        decode_attention(q, kc, kn, vc, vn, 10_000, kt, vt, 0.125)
    with pytest.raises(ValueError, match="multiple"):
        decode_attention(q[:, :3], kc, kn, vc, vn, 8, kt, vt, 0.125)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [3.5, 2.5])
def test_hook_matches_cache_reference(cuda, bits):
    """``compressed_attention_cuda`` over the cache's real PackedStore equals the torch reference."""
    from types import SimpleNamespace

    from turboquant.attention import compressed_attention_reference
    from turboquant.cache import PackedStore, TensorCodec
    from turboquant.kernels import compressed_attention_cuda

    B, hq, hkv, d, n, r = 2, 24, 4, 256, 3001, 17
    stores = []
    for kind, seed in (("k", 11), ("v", 12)):
        st = PackedStore(TensorCodec(d, bits, "mse", "hadamard", seed, 0, "beta", cuda), chunk_tokens=256)
        st.append(torch.randn(B, hkv, n - 1000, d, device=cuda, dtype=torch.bfloat16))
        st.append(torch.randn(B, hkv, 1000, d, device=cuda, dtype=torch.bfloat16))  # grows in chunks
        stores.append(st)
    rk = torch.randn(B, hkv, 64, d, device=cuda, dtype=torch.bfloat16)[:, :, :r]
    rv = torch.randn(B, hkv, 64, d, device=cuda, dtype=torch.bfloat16)[:, :, :r]
    layer = SimpleNamespace(key_store=stores[0], value_store=stores[1], num_heads=hkv,
                            residual_keys=lambda: rk, residual_values=lambda: rv)
    q = torch.randn(B, hq, 1, d, device=cuda, dtype=torch.bfloat16)
    out = compressed_attention_cuda(q, layer, 1 / 16, None)
    assert out is not None
    ref = compressed_attention_reference(q, layer, 1 / 16, None)
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=2e-2)
    assert compressed_attention_cuda(torch.cat([q, q], 2), layer, 1 / 16, None) is None  # prefill: reference


@pytest.mark.integration
def test_bf16_window_is_refused_under_the_interpreter(kdev):
    """Triton's interpreter gets tl.dot on bfloat16 operands wrong, so the CPU path refuses a
    bfloat16 residual window instead of returning garbage (CUDA runs it: the gpu tests)."""
    if kdev.type != "cpu":
        pytest.skip("the interpreter runs on CPU only")
    from turboquant.kernels import decode_attention

    q, kc, kn, vc, vn, kt, vt, _, _, rk, rv = _case(kdev, 64, 3.5, 3.5, 4, 2, 20, 5, 1)
    with pytest.raises(ValueError, match="bfloat16 residual window cannot run under Triton's interpreter"):
        decode_attention(q, kc, kn, vc, vn, 20, kt, vt, 0.125, rk.bfloat16(), rv.bfloat16())
