"""dequantize kernel (packed codes -> ``||x|| Π^T c[idx]``) vs the pure-torch reference and the
core quantizer's ``decode``; and the cache paths that use it (``PackedStore.dequantize``,
``TurboQuantLayer.dequantized``: the history a non-fused attention, e.g. sdpa in a chunked
prefill, reads).

Tolerance: the kernel looks centroids up as float16 pairs (the decode kernel's table), so a
coordinate before the rotation carries a relative error <= 2^-11; after the orthogonal un-rotation
the relative Frobenius error of a float32 output is ~3e-4: asserted < 1e-3 (a layout or sign error
gives O(1)). bf16 outputs are compared with bf16 rounding added (relative Frobenius < 5e-3).
"""

from __future__ import annotations

import pytest
import torch

from turboquant.kernels import KernelTables
from turboquant.kernels.dequantize import dequantize, dequantize_reference
from turboquant.quantizer import PackedMSE, TurboQuantMSE

TINY = [(64, 3.5), (64, 1.5), (128, 2.0), (64, 4.0)]
GPU = [(256, b) for b in (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)] + [(128, 3.5), (64, 2.5)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _store(dev, d: int, bits: float, b: int, h: int, cap: int, seed: int = 0):
    from turboquant.kernels import quantize_pack

    q = TurboQuantMSE(d, bits, seed=seed + 7)
    t = KernelTables.from_quantizer(q, dev)
    x = (torch.randn(b, h, cap, d, generator=torch.Generator().manual_seed(seed)) * 3).to(dev)
    codes, norms = quantize_pack(x, t)
    return q, t, codes, norms


def _check(dev, d, bits, b=2, h=3, cap=41, length=37):
    q, t, codes, norms = _store(dev, d, bits, b, h, cap, seed=d + int(bits * 2))
    out = dequantize(codes, norms, length, t, torch.float32)
    assert out.shape == (b, h, length, d) and out.dtype == torch.float32
    ref = dequantize_reference(codes[:, :, :length], norms[:, :, :length], t)
    core = q.decode(PackedMSE(codes=codes[:, :, :length].cpu(), norms=norms[:, :, :length].cpu()))
    assert _rel(ref.cpu(), core) < 1e-6, "reference disagrees with TurboQuantMSE.decode"
    rel = _rel(out, ref)
    assert rel < 1e-3, f"d={d} bits={bits}: relative error {rel:.2e}"
    out16 = dequantize(codes, norms, length, t, torch.bfloat16)
    assert out16.dtype == torch.bfloat16 and _rel(out16, ref) < 5e-3


@pytest.mark.integration
@pytest.mark.parametrize("d,bits", TINY, ids=[f"d{d}-b{b}" for d, b in TINY])
def test_dequantize_kernel_matches_reference(kdev, d, bits):
    _check(kdev, d, bits)


@pytest.mark.integration
def test_dequantize_writes_only_the_first_length_rows_of_out(kdev):
    """``out`` may be the front of a bigger buffer (the window is copied after the codes)."""
    _, t, codes, norms = _store(kdev, 64, 2.5, 1, 2, 20)
    out = torch.full((1, 2, 25, 64), 7.0, device=kdev)
    got = dequantize(codes, norms, 13, t, out=out)
    assert got.data_ptr() == out.data_ptr() and got.shape == (1, 2, 13, 64)
    assert torch.all(out[:, :, 13:] == 7.0)
    assert _rel(out[:, :, :13], dequantize_reference(codes[:, :, :13], norms[:, :, :13], t)) < 1e-3


@pytest.mark.integration
def test_store_and_layer_dequantize_through_the_kernel(kdev):
    """``PackedStore.dequantize`` (kernel) equals the pure-torch path on the same codes, and
    ``TurboQuantLayer.dequantized`` returns codes then window in one buffer."""
    from turboquant.cache import TurboQuantCache
    from turboquant.models import tiny_config

    cfg = tiny_config("qwen3_5_text", head_dim=64, num_layers=4, num_kv_heads=2, num_heads=4, hidden_size=64)
    cache = TurboQuantCache(cfg, key_bits=3.5, value_bits=2.5, residual_length=8, append_backend="triton")
    idx = cache.compressed_layers[0]
    gen = torch.Generator().manual_seed(1)
    k, v = (torch.randn(2, 2, 21, 64, generator=gen).to(kdev) for _ in range(2))
    cache.update(k, v, idx)
    layer = cache.layers[idx]
    ks, vs = layer.key_store, layer.value_store
    assert ks.length == 16 and layer._r == 5
    kk, vv = layer.dequantized()
    assert ks.kernel_dequantizes == 1 and vs.kernel_dequantizes == 1
    assert kk.shape == vv.shape == (2, 2, 21, 64) and kk.dtype == k.dtype
    assert torch.equal(kk[:, :, 16:], k[:, :, 16:]) and torch.equal(vv[:, :, 16:], v[:, :, 16:])
    for store, got in ((ks, kk), (vs, vv)):
        store.backend = "torch"
        ref = store.dequantize(torch.float32)
        store.backend = "triton"
        assert _rel(got[:, :, :16], ref) < 1e-3


# ------------------------------------------------------------------------------------------------
# input checks (no Triton needed: they run before the launch)
# ------------------------------------------------------------------------------------------------
def _cpu_tables(d=64, bits=3.0):
    return KernelTables.from_quantizer(TurboQuantMSE(d, bits, seed=0), "cpu")


@pytest.mark.synthetic
@pytest.mark.parametrize("what,match", [
    ("codes_dtype", r"`codes` must be uint8"),
    ("code_bytes", r"`codes` hold 20 bytes a vector, the tables 24"),
    ("norms", r"`norms` must be float16"),
    ("length", r"`length` must be in \[0, 10\]"),
    ("dtype", r"`dtype` must be one of"),
    ("out", r"`out` must be a"),
])
def test_dequantize_rejects_bad_input(what, match):
    t = _cpu_tables()
    codes = torch.zeros(1, 2, 10, 24, dtype=torch.uint8)
    norms = torch.ones(1, 2, 10, dtype=torch.float16)
    kw = {"codes": codes, "norms": norms, "length": 5, "tables": t}
    if what == "codes_dtype":
        kw["codes"] = codes.to(torch.int32)
    elif what == "code_bytes":
        kw["codes"] = torch.zeros(1, 2, 10, 20, dtype=torch.uint8)
    elif what == "norms":
        kw["norms"] = norms.float()
    elif what == "length":
        kw["length"] = 11
    elif what == "dtype":
        kw["dtype"] = torch.int8
    elif what == "out":
        kw["out"] = torch.empty(1, 2, 4, 64)
    with pytest.raises((TypeError, ValueError), match=match):
        dequantize(**kw)


# ------------------------------------------------------------------------------------------------
# GPU (compiled)
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("d,bits", GPU, ids=[f"d{d}-b{b}" for d, b in GPU])
def test_dequantize_kernel_matches_reference_gpu(cuda, d, bits):
    _check(cuda, d, bits, b=2, h=4, cap=3000, length=2999)


@pytest.mark.gpu
def test_chunked_prefill_logits_kernel_vs_torch_dequantize_gpu(cuda):
    """A tiny qwen3_5_text model on CUDA, prefilled in chunks under sdpa (every chunk after the
    first attends over the dequantized history): the kernel dequantize gives the torch path's logits."""
    from turboquant.cache import TurboQuantCache
    from turboquant.models import tiny_model

    m = tiny_model("qwen3_5_text", seed=0, head_dim=128, num_layers=4, num_kv_heads=2, num_heads=4, hidden_size=128).to(cuda)
    ids = torch.randint(3, 128, (2, 700), generator=torch.Generator().manual_seed(0)).to(cuda)
    logits, caches = {}, {}
    for backend in ("torch", "auto"):
        cache = TurboQuantCache(m.config, key_bits=3.5, value_bits=3.5, residual_length=64, append_backend=backend)
        with torch.no_grad():
            out = [m(input_ids=ids[:, s : s + 128], past_key_values=cache).logits[:, -1] for s in range(0, 700, 128)]
        logits[backend], caches[backend] = torch.stack(out, 1), cache
    layer = caches["auto"].layers[caches["auto"].compressed_layers[0]]
    assert layer.key_store.kernel_dequantizes >= 5
    diff = (logits["auto"] - logits["torch"]).abs().max().item()
    scale = logits["torch"].abs().max().item()
    print(f"kernel vs torch dequantize: max |Δlogit| {diff:.3g} (logit scale {scale:.3g})")
    assert diff <= 1e-2 * scale
