"""decode_attention with TurboQuant-prod keys (MSE at b-1 bits + 1-bit QJL) vs the references.

Prod keys are scored as ``<q, k̃> = ||k|| (Π q)·c[idx] + √(π/2)/d · ||r|| · (S q)·z``; the kernel
adds the QJL term with float16 tensor-core products, one per 32-bit word column of the QJL plane
(``S q`` rounded to float16 in log2 units, ``z = ±1`` exact, float32 accumulation). The reference materialises
``k̃ = ||k|| Π^T c[idx] + √(π/2)/d · ||r|| · S^T z`` in float32 and is itself checked against the
core ``TurboQuantProd.decode`` + torch SDPA (to 1e-4).

Tolerance: the thresholds of ``test_decode_attention.py`` unchanged, ``assert_close(atol=2e-3,
rtol=1e-2)`` on O(1) outputs plus relative Frobenius error < 2e-3. Measured under the Triton
interpreter (CPU) on the tiny cases below: max |kernel - reference| <= 1.1e-3, relative Frobenius
error <= 6e-4 (ten cases, d 64/128/256, prod bits 2 ... 4; the mse-only kernel on the same codes:
<= 6e-4), while dropping the QJL term moves the output by 50-100 % relative: a reversed bit order
or a 1 % error in the QJL scale fails. Model logits (tiny Llama, decode through the hook's body vs
the torch reference path): max |Δlogit| 6e-5 at logit scale 0.55 under the interpreter, asserted
<= 2e-3 · scale (a reversed QJL bit order gives 8e-3 · scale).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from turboquant.quantizer import PackedMSE, PackedProd, TurboQuantMSE, TurboQuantProd

# (d, prod key bits, value bits, Hq, Hkv, length, R, B)
TINY = [  # interpreter, under a second each
    (64, 3.5, 3.5, 6, 2, 45, 5, 1),
    (64, 3, 4, 2, 1, 40, 0, 1),
]
SMALL = [  # interpreter, about a second each: no marker
    (64, 2.5, 3.5, 8, 2, 77, 7, 2),
    (64, 2, 3, 4, 4, 33, 0, 1),
    (128, 4, 3.5, 4, 1, 50, 3, 1),
    (64, 3.5, 2.5, 4, 2, 0, 9, 1),  # residual window only: the QJL path is compiled but never runs
]
FULL = [  # compiled, gpu
    (256, 3.5, 3.5, 24, 4, 4097, 128, 1),
    (256, 2.5, 2.5, 24, 4, 1000, 37, 3),
    (256, 3, 3.5, 24, 4, 2049, 0, 2),
    (256, 4, 3, 6, 1, 63, 1, 2),
    (128, 3.5, 3.5, 32, 8, 3333, 16, 2),
    (128, 2.5, 4, 24, 4, 1, 16, 1),
    (64, 2, 2.5, 12, 4, 2049, 64, 2),
]


def _ids(grid: list[tuple]) -> list[str]:
    return [f"d{d}-kprod{kb}-v{vb}-{hq}x{hkv}-L{n}-R{r}-B{b}" for d, kb, vb, hq, hkv, n, r, b in grid]


def _case(dev, d, kb, vb, hq, hkv, n, r, b, cap_extra=11) -> SimpleNamespace:
    """Prod keys encoded by the core quantizer (the torch path the cache uses), mse values by the kernel."""
    from turboquant.kernels import KernelTables, quantize_pack
    from turboquant.kernels.decode_attention import KeyQJL

    kq, vq = TurboQuantProd(d, kb, seed=5), TurboQuantMSE(d, vb, seed=6)
    kt, vt = KernelTables.from_quantizer(kq.mse, dev), KernelTables.from_quantizer(vq, dev)
    gen = torch.Generator().manual_seed(n * 7 + d)
    cap = n + cap_extra
    k = torch.randn(b, hkv, cap, d, generator=gen).to(dev)
    v = torch.randn(b, hkv, cap, d, generator=gen).to(dev)
    pk = kq.encode(k)
    vc, vn = quantize_pack(v, vt)
    q = (torch.randn(b, hq, 1, d, generator=gen) * 2).to(dev)
    rk = torch.randn(b, hkv, r, d, generator=gen).to(dev) if r else None
    rv = torch.randn(b, hkv, r, d, generator=gen).to(dev) if r else None
    kj = KeyQJL(qjl=pk.qjl, rnorms=pk.rnorms, S=kq.S.to(dev), scale=kq.qjl_scale)
    return SimpleNamespace(q=q, kc=pk.mse.codes, kn=pk.mse.norms, vc=vc, vn=vn, kt=kt, vt=vt, kq=kq, vq=vq,
                           rk=rk, rv=rv, kj=kj)


def _args(c: SimpleNamespace, n: int) -> tuple:
    """The positional arguments of decode_attention(_reference) up to the tables."""
    return (c.q, c.kc, c.kn, c.vc, c.vn, n, c.kt, c.vt)


def _core_sdpa(c: SimpleNamespace, n: int, scale: float) -> torch.Tensor:
    """Torch SDPA over the core quantizers' decode (``TurboQuantProd.decode`` of the stored parts)."""
    sl = (slice(None), slice(None), slice(0, n))
    pk = PackedProd(mse=PackedMSE(codes=c.kc[sl].cpu(), norms=c.kn[sl].cpu()), qjl=c.kj.qjl[sl].cpu(),
                    rnorms=c.kj.rnorms[sl].cpu())
    ks = [c.kq.decode(pk)]
    vs = [c.vq.decode(PackedMSE(codes=c.vc[sl].cpu(), norms=c.vn[sl].cpu()))]
    if c.rk is not None:
        ks.append(c.rk.cpu())
        vs.append(c.rv.cpu())
    out = F.scaled_dot_product_attention(c.q.cpu().float(), torch.cat(ks, 2), torch.cat(vs, 2), scale=scale,
                                         enable_gqa=True)
    return out.transpose(1, 2)


def _check(dev, d, kb, vb, hq, hkv, n, r, b, case=None, **kw) -> torch.Tensor:
    """Kernel vs reference (asserted tolerances), reference vs core decode + SDPA; returns the kernel output."""
    from turboquant.kernels import decode_attention, decode_attention_reference

    c = case if case is not None else _case(dev, d, kb, vb, hq, hkv, n, r, b)
    scale = 1 / math.sqrt(d)
    out = decode_attention(*_args(c, n), scale, c.rk, c.rv, k_qjl=c.kj, **kw)
    ref = decode_attention_reference(*_args(c, n), scale, c.rk, c.rv, k_qjl=c.kj)
    assert out.shape == (b, 1, hq, d) and out.dtype == c.q.dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=1e-2)
    rel = float((out - ref).norm() / ref.norm())
    assert rel < 2e-3, f"relative error {rel:.2e}"
    torch.testing.assert_close(ref.cpu(), _core_sdpa(c, n, scale), atol=1e-4, rtol=1e-4)
    if n >= 32:  # the QJL term matters: the mse-only reference is far off (guards against a no-op QJL path)
        ref0 = decode_attention_reference(*_args(c, n), scale, c.rk, c.rv)
        assert float((ref0 - ref).norm() / ref.norm()) > 20 * rel
    return out


# ------------------------------------------------------------------------------------------------
# interpreter (CPU) or compiled: no gpu marker
# ------------------------------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize("d,kb,vb,hq,hkv,n,r,b", TINY, ids=_ids(TINY))
def test_decode_attention_prod_tiny(kdev, d, kb, vb, hq, hkv, n, r, b):
    _check(kdev, d, kb, vb, hq, hkv, n, r, b, block_n=32)


@pytest.mark.integration
@pytest.mark.parametrize("d,kb,vb,hq,hkv,n,r,b", SMALL, ids=_ids(SMALL))
def test_decode_attention_prod_small(kdev, d, kb, vb, hq, hkv, n, r, b):
    _check(kdev, d, kb, vb, hq, hkv, n, r, b, block_n=16 if n < 40 else 32)


@pytest.mark.integration
def test_decode_attention_prod_splits(kdev):
    """Several splits, a partial last block and auto backend (Triton for QJL keys)."""
    _check(kdev, 64, 3.5, 3.5, 8, 2, 150, 4, 1, block_n=32, num_splits=3)


def _prod_layer(dev, d, kbits, vmode, hkv, n, r, b, seed=0) -> SimpleNamespace:
    """A layer-like object over the cache's own ``PackedStore``s: prod keys, ``vmode`` values."""
    from turboquant.cache import PackedStore, TensorCodec

    gen = torch.Generator().manual_seed(seed)
    stores = []
    for kind, mode, bits, s in (("k", "prod", kbits, 11), ("v", vmode, 3.5, 12)):
        st = PackedStore(TensorCodec(d, bits, mode, "hadamard", s, 0, "beta", dev), chunk_tokens=16)
        st.append(torch.randn(b, hkv, n - n // 3, d, generator=gen).to(dev))
        st.append(torch.randn(b, hkv, n // 3, d, generator=gen).to(dev))  # grows in chunks
        stores.append(st)
    rk = torch.randn(b, hkv, r, d, generator=gen).to(dev) if r else None
    rv = torch.randn(b, hkv, r, d, generator=gen).to(dev) if r else None
    return SimpleNamespace(key_store=stores[0], value_store=stores[1], num_heads=hkv,
                           residual_keys=lambda: rk, residual_values=lambda: rv)


@pytest.mark.integration
def test_store_prod_keys_match_cache_reference(kdev):
    """``decode_attention_store`` over the cache's real prod key store (shared ``codec.S``, the
    ``qjl``/``rnorms`` fields) equals the cache's torch attention (``_store_scores`` QJL path)."""
    from turboquant.attention import compressed_attention_reference
    from turboquant.kernels import KernelTables, decode_attention_store

    layer = _prod_layer(kdev, 64, 3.5, "mse", 2, 40, 5, 1)
    ks, vs = layer.key_store, layer.value_store
    assert ks.qjl is not None and ks.codec.mode == "prod"
    kt = KernelTables.from_quantizer(ks.codec.mse, kdev)
    vt = KernelTables.from_quantizer(vs.codec.mse, kdev)
    q = torch.randn(1, 6, 1, 64, generator=torch.Generator().manual_seed(3)).to(kdev)
    out = decode_attention_store(q, ks, vs, kt, vt, 0.125, layer.residual_keys(), layer.residual_values())
    ref = compressed_attention_reference(q, layer, 0.125, None)
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=1e-2)
    assert float((out - ref).norm() / ref.norm()) < 2e-3


@pytest.mark.integration
@pytest.mark.parametrize("value_mode", ["mse", "prod"])
def test_model_decode_through_hook_interpreted(kdev, monkeypatch, value_mode):
    """Tiny Llama with ``key_mode="prod"``, teacher-forced decode under the "turboquant" attention,
    with ``compressed_attention`` routed through the hook's body (:func:`fused_decode`, the Triton
    kernel; under the interpreter on CPU): same logits as the torch reference path. Prod values:
    the hook declines every call."""
    import turboquant.attention as A
    from turboquant.cache import TurboQuantCache, turboquant_attention
    from turboquant.kernels.hook import fused_decode
    from turboquant.models import tiny_model

    m = tiny_model("llama", seed=0, head_dim=64, num_layers=1, num_kv_heads=2, num_heads=8, hidden_size=64).to(kdev)
    ids = torch.randint(3, 128, (2, 50), generator=torch.Generator().manual_seed(0)).to(kdev)
    reference, used = A.compressed_attention, []

    def through_hook(query, layer, scaling, mask):
        out = fused_decode(query, layer, scaling, mask)
        used.append(out is not None)
        return out if out is not None else reference(query, layer, scaling, mask)

    logits = {}
    for path, fn in (("reference", reference), ("kernel", through_hook)):
        monkeypatch.setattr(A, "compressed_attention", fn)
        cache = TurboQuantCache(m.config, key_mode="prod", key_bits=3, value_mode=value_mode, value_bits=3.5,
                                residual_length=16)
        with torch.no_grad(), turboquant_attention(m):
            out = [m(input_ids=ids[:, :46], past_key_values=cache).logits[:, -1]]
            for t in range(46, 50):  # 32 tokens stored + 14 in the window; the window flushes at 48
                out.append(m(input_ids=ids[:, t : t + 1], past_key_values=cache).logits[:, -1])
        logits[path] = torch.stack(out, 1)
    assert len(used) == 4 and all(u == (value_mode == "mse") for u in used)
    diff = (logits["kernel"] - logits["reference"]).abs().max().item()
    scale = logits["reference"].abs().max().item()
    print(f"prod keys, {value_mode} values: kernel vs reference max |Δlogit| {diff:.3g} (scale {scale:.3g})")
    assert diff <= 2e-3 * scale, f"max |Δlogit| {diff:.3g} (logit scale {scale:.3g})"


@pytest.mark.integration
def test_hook_off_cuda_returns_none_for_prod():
    """Off CUDA (and without Triton) the hook declines: the torch reference runs."""
    from turboquant.kernels import compressed_attention_cuda

    layer = _prod_layer(torch.device("cpu"), 64, 3.5, "mse", 2, 20, 0, 1)
    assert compressed_attention_cuda(torch.randn(1, 4, 1, 64), layer, 0.125, None) is None


# ------------------------------------------------------------------------------------------------
# refusals (CPU)
# ------------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_prod_rejects_bad_qjl(kdev):
    from dataclasses import replace

    from turboquant.kernels import decode_attention

    c = _case(kdev, 64, 3.5, 3.5, 4, 2, 8, 0, 1)
    bad = {
        "k_qjl.qjl": replace(c.kj, qjl=c.kj.qjl.to(torch.int32)),
        "k_qjl.qjl` must be uint8": replace(c.kj, qjl=c.kj.qjl[..., :4]),
        "k_qjl.rnorms": replace(c.kj, rnorms=c.kj.rnorms.float()),
        "k_qjl.S": replace(c.kj, S=c.kj.S[:32]),
        "k_qjl.scale": replace(c.kj, scale=0.0),
    }
    for what, kj in bad.items():
        with pytest.raises(ValueError, match=what.replace(".", r"\.")):
            decode_attention(*_args(c, 8), 0.125, k_qjl=kj)
    with pytest.raises(ValueError, match=r"k_qjl\.rnorms"):
        decode_attention(*_args(c, 8), 0.125, k_qjl=replace(c.kj, rnorms=c.kj.rnorms[:, :, :5]))
    with pytest.raises(TypeError, match="KeyQJL"):
        decode_attention(*_args(c, 8), 0.125, k_qjl=(c.kj.qjl, c.kj.rnorms))
    with pytest.raises(ValueError, match="does not support TurboQuant-prod"):
        decode_attention(*_args(c, 8), 0.125, k_qjl=c.kj, backend="cuda")


@pytest.mark.integration
def test_store_refuses_prod_values_and_1bit_prod_keys():
    from turboquant.kernels import decode_attention_store

    layer = _prod_layer(torch.device("cpu"), 64, 3.5, "prod", 2, 20, 0, 1)
    q = torch.randn(1, 4, 1, 64)
    with pytest.raises(NotImplementedError, match="value store holds QJL"):
        decode_attention_store(q, layer.key_store, layer.value_store, None, None, 0.125)
    one = _prod_layer(torch.device("cpu"), 64, 1, "mse", 2, 20, 0, 1)
    assert one.key_store.codes is None
    with pytest.raises(ValueError, match="1 bit"):
        decode_attention_store(q, one.key_store, one.value_store, None, None, 0.125)


# ------------------------------------------------------------------------------------------------
# GPU (compiled)
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("d,kb,vb,hq,hkv,n,r,b", FULL, ids=_ids(FULL))
def test_decode_attention_prod_gpu(cuda, d, kb, vb, hq, hkv, n, r, b):
    from turboquant.kernels import decode_attention

    c = _case(cuda, d, kb, vb, hq, hkv, n, r, b)
    out = _check(cuda, d, kb, vb, hq, hkv, n, r, b, case=c, backend="triton")
    auto = decode_attention(*_args(c, n), 1 / math.sqrt(d), c.rk, c.rv, k_qjl=c.kj, backend="auto")
    assert torch.equal(out, auto), "backend='auto' must run the Triton kernel for prod keys"


@pytest.mark.gpu
def test_decode_attention_prod_gpu_bf16_long(cuda):
    """bf16 query, 32k packed prod keys (3.5 bits) at the Qwen3.6 shape, split count forced both ways."""
    from turboquant.kernels import decode_attention, decode_attention_reference

    c = _case(cuda, 256, 3.5, 3.5, 24, 4, 32768, 128, 1)
    q = c.q.to(torch.bfloat16)
    rk, rv = c.rk.to(torch.bfloat16), c.rv.to(torch.bfloat16)
    ref = decode_attention_reference(q.float(), *_args(c, 32768)[1:], 1 / 16, rk, rv, k_qjl=c.kj)
    for splits in (None, 1, 7):
        out = decode_attention(q, *_args(c, 32768)[1:], 1 / 16, rk, rv, num_splits=splits, k_qjl=c.kj)
        torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=2e-2)  # bf16 query/window rounding


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [3.5, 2.5, 3])
def test_hook_prod_keys_match_cache_reference(cuda, bits):
    """``compressed_attention_cuda`` over real prod key stores equals the torch reference; prod
    values make it decline (None)."""
    from turboquant.attention import compressed_attention_reference
    from turboquant.kernels import compressed_attention_cuda

    layer = _prod_layer(cuda, 256, bits, "mse", 4, 3001, 17, 2)
    q = torch.randn(2, 24, 1, 256, device=cuda)
    out = compressed_attention_cuda(q, layer, 1 / 16, None)
    assert out is not None
    ref = compressed_attention_reference(q, layer, 1 / 16, None)
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=1e-2)
    pv = _prod_layer(cuda, 256, bits, "prod", 4, 300, 0, 1)
    assert compressed_attention_cuda(q[:1], pv, 1 / 16, None) is None


@pytest.mark.gpu
@pytest.mark.parametrize("value_mode", ["mse", "prod"])
def test_model_prod_keys_kernel_matches_reference_gpu(cuda, monkeypatch, value_mode):
    """Tiny qwen3_5_text model (head_dim 256) with prod keys, teacher-forced decode under the
    "turboquant" attention: the fused kernel path gives the torch reference path's logits (prod
    values: the hook declines every call and the logits are identical)."""
    import turboquant.kernels as tk
    from turboquant.cache import TurboQuantCache, turboquant_attention
    from turboquant.models import tiny_model

    m = tiny_model("qwen3_5_text", seed=0, head_dim=256, num_layers=4, num_kv_heads=2, num_heads=8,
                   hidden_size=128).to(cuda)
    ids = torch.randint(3, 128, (2, 260), generator=torch.Generator().manual_seed(0)).to(cuda)
    hook, used = tk.compressed_attention_cuda, []

    def counting(*a):
        out = hook(*a)
        used.append(out is not None)
        return out

    logits = {}
    for path, fn in (("reference", lambda *a: None), ("kernel", counting)):
        monkeypatch.setattr(tk, "compressed_attention_cuda", fn)
        cache = TurboQuantCache(m.config, key_mode="prod", key_bits=3.5, value_mode=value_mode, value_bits=3.5,
                                residual_length=32)
        with torch.no_grad(), turboquant_attention(m):
            out = [m(input_ids=ids[:, :200], past_key_values=cache).logits[:, -1]]
            for t in range(200, 260):
                out.append(m(input_ids=ids[:, t : t + 1], past_key_values=cache).logits[:, -1])
        logits[path] = torch.stack(out, 1)
    assert used and all(used) == (value_mode == "mse") and any(used) == (value_mode == "mse")
    diff = (logits["kernel"] - logits["reference"]).abs().max().item()
    scale = logits["reference"].abs().max().item()
    print(f"prod keys, {value_mode} values: kernel vs reference max |Δlogit| {diff:.3g} (scale {scale:.3g})")
    if value_mode == "prod":
        assert diff <= 1e-5 * scale  # the same torch reference ran both times
    else:
        assert diff <= 2e-3 * scale, f"max |Δlogit| {diff:.3g} (logit scale {scale:.3g})"
