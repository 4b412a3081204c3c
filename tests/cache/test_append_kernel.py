"""``PackedStore.append`` through the Triton ``quantize_pack`` kernel vs the pure-torch quantizer.

``append_backend="auto"`` (the default) encodes with the kernel on CUDA, straight into the store's
code/norm buffers; ``"torch"`` forces the pure-torch quantizer (the reference); ``"triton"``
forces the kernel (on CPU under ``TRITON_INTERPRET=1``, as the kernel tests do).

The two paths are not byte-identical by construction: the kernel rotates with FWHT butterflies,
the torch path with one GEMM against the ±1 Sylvester matrix, so ``Π x / ||x||`` differs in the last
float32 bits and a coordinate within that rounding of a codebook boundary may take the neighbouring
code; the norms are summed in another order and may differ by one float16 ulp. The tests allow
exactly that: every differing code sits within 1e-5 of a boundary, and few differ.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from turboquant.cache import (
    TurboQuantCache,
    TurboQuantCacheConfig,
    TurboQuantLayer,
    turboquant_attention,
)
from turboquant.models import tiny_config, tiny_model
from turboquant.quantizer import PackedMSE

# Triton decides at import whether kernels are interpreted: on a CPU machine turn the interpreter on
# at collection, before anything imports Triton (as tests/kernels/conftest.py does; process-wide,
# harmless to the rest: the cache takes the kernel on CPU tensors only with append_backend='triton').
_INTERPRET_USABLE = False
if not torch.cuda.is_available():
    _already = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    _INTERPRET_USABLE = _already or "triton" not in sys.modules
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def interpreted() -> torch.device:
    """The CPU with Triton's interpreter on. Skips on CUDA machines (the gpu tests cover the
    compiled kernel), without Triton, or if Triton was imported before the interpreter was set."""
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the compiled kernel is checked by the gpu tests")
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("needs Triton (its interpreter runs the kernel on CPU tensors)")
    if not _INTERPRET_USABLE:
        pytest.skip("Triton was imported before TRITON_INTERPRET=1 was set: run with TRITON_INTERPRET=1")
    return torch.device("cpu")


@pytest.fixture
def cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set: GPU tests need the compiled kernel")
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("needs Triton (pip install triton)")
    return torch.device("cuda")


def _full_layer(cache: TurboQuantCache) -> TurboQuantLayer:
    return cache.layers[cache.compressed_layers[0]]


def _feed(cache: TurboQuantCache, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> TurboQuantLayer:
    idx = cache.compressed_layers[0]
    for k, v in kv:
        cache.update(k, v, idx)
    return cache.layers[idx]


def _random_kv(b: int, h: int, d: int, sizes: list[int], device, dtype, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in sizes:
        k = torch.randn(b, h, t, d, generator=gen) * 2
        v = torch.randn(b, h, t, d, generator=gen)
        k[:, :, :1] = 0  # zero vectors round-trip on both paths
        out.append((k.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)))
    return out


def assert_same_store(ref, got, what: str) -> dict:
    """``got`` (kernel) holds ``ref``'s (torch) codes: identical, or differing only within float32
    rounding of a codebook boundary (and rarely); norms within one float16 ulp. Returns counts."""
    assert got.length == ref.length and got.capacity == ref.capacity, f"{what}: length/capacity differ"
    q = ref.codec.quantizer
    n = ref.length
    rc, gc = ref.codes[:, :, :n].cpu(), got.codes[:, :, :n].cpu()
    rn, gn = ref.norms[:, :, :n].cpu(), got.norms[:, :, :n].cpu()
    torch.testing.assert_close(gn.float(), rn.float(), rtol=1e-3, atol=0, msg=f"{what}: norms differ by more than a float16 ulp")
    ri, gi = q.unpack(PackedMSE(codes=rc, norms=rn)).idx, q.unpack(PackedMSE(codes=gc, norms=gn)).idx
    diff = (ri != gi) & (rn > 0).unsqueeze(-1)  # a zero vector decodes to 0 whatever its codes
    stats = {"bytes": rc.numel(), "bytes_differ": int((rc != gc).sum()), "codes": ri.numel(),
             "codes_differ": int(diff.sum()), "norms_differ": int((rn != gn).sum())}
    assert stats["codes_differ"] <= max(2, stats["codes"] // 10_000), f"{what}: {stats}"
    return stats


def assert_flips_on_boundaries(x: torch.Tensor, store_ref, store_got) -> None:
    """Every code the two paths disagree on belongs to a coordinate within 1e-5 of a boundary."""
    q = store_ref.codec.quantizer
    n = store_ref.length
    ri = q.unpack(PackedMSE(codes=store_ref.codes[:, :, :n].cpu(), norms=store_ref.norms[:, :, :n].cpu())).idx
    gi = q.unpack(PackedMSE(codes=store_got.codes[:, :, :n].cpu(), norms=store_got.norms[:, :, :n].cpu())).idx
    xf = x.cpu().float()
    nz = torch.linalg.vector_norm(xf, dim=-1) > 0
    diff = (ri != gi) & nz.unsqueeze(-1)
    if not diff.any():
        return
    y = q.rotation.apply(xf / torch.linalg.vector_norm(xf, dim=-1, keepdim=True).clamp_min(1e-30))
    bnd = torch.cat([q._table(torch.device("cpu"))[s][0] for s in range(len(q.segments))])
    dist = (y.unsqueeze(-1) - bnd).abs().amin(-1)
    assert float(dist[diff].max()) < 1e-5, f"{int(diff.sum())} codes differ away from codebook boundaries"


def _compare_paths(device, dtype, d: int, h: int, bits: float, sizes: list[int], residual: int, seed: int = 0) -> list[dict]:
    cfg = tiny_config("qwen3_5_text", head_dim=d, num_layers=4, num_kv_heads=h, num_heads=2 * h, hidden_size=64)
    kv = _random_kv(2, h, d, sizes, device, dtype, seed)
    caches = {b: TurboQuantCache(cfg, key_bits=bits, value_bits=bits, residual_length=residual, append_backend=b)
              for b in ("torch", "triton")}
    layers = {b: _feed(c, kv) for b, c in caches.items()}
    ref, got = layers["torch"], layers["triton"]
    assert ref.key_store.kernel_appends == 0 and got.key_store.kernel_appends > 0
    assert ref.get_seq_length() == got.get_seq_length() == sum(sizes)
    stats = []
    n = ref.key_store.length
    for which, i in (("key_store", 0), ("value_store", 1)):
        r, g = getattr(ref, which), getattr(got, which)
        stats.append(assert_same_store(r, g, f"{which} d={d} bits={bits}"))
        x = torch.cat([p[i] for p in kv], dim=-2)[:, :, :n]
        assert_flips_on_boundaries(x, r, g)
    # the window (full precision) is the same on both paths
    assert torch.equal(ref.residual_keys(), got.residual_keys()) if ref._r else got._r == 0
    return stats


# ------------------------------------------------------------------------------------------------
# CPU (Triton interpreter), tiny
# ------------------------------------------------------------------------------------------------
TINY = [(64, 3.5), (64, 2.5), (128, 4.0)]


@pytest.mark.integration
@pytest.mark.parametrize("d,bits", TINY, ids=[f"d{d}-b{b}" for d, b in TINY])
def test_triton_append_matches_torch_interpreted(interpreted, d, bits):
    """Prefill 21 tokens then 14 decode tokens through a 16-token window (flushes at 16 and 32):
    the kernel-written store equals the torch-written one (up to boundary flips)."""
    _compare_paths(interpreted, torch.float32, d, 2, bits, [21] + [1] * 14, residual=16)


@pytest.mark.integration
def test_triton_append_norm_overflow_raises_like_torch(interpreted):
    cfg = tiny_config("qwen3_5_text", head_dim=64, num_layers=4, num_kv_heads=2, num_heads=4, hidden_size=64)
    for backend in ("torch", "triton"):
        cache = TurboQuantCache(cfg, key_bits=3.5, value_bits=3.5, residual_length=0, append_backend=backend)
        layer = _full_layer(cache)
        k = torch.randn(1, 2, 3, 64)
        layer.append(k, k)
        with pytest.raises(ValueError, match="float16"):
            layer.append(k * 1e5, k)
        assert layer.key_store.length == 3, f"{backend}: a failed append must not commit tokens"
        with pytest.raises(ValueError, match="float16"):  # norms ~1e-6: float16 subnormals or zeros
            layer.append(k * 1e-7, k)
        assert layer.key_store.length == layer.value_store.length == 3, f"{backend}: tiny norms committed"


# ------------------------------------------------------------------------------------------------
# CPU, no Triton needed
# ------------------------------------------------------------------------------------------------
@pytest.mark.synthetic
def test_auto_backend_is_torch_on_cpu():
    """``auto`` never takes the kernel on CPU tensors (even with the interpreter on): CPU stays pure torch."""
    cfg = tiny_config("qwen3_5_text", head_dim=64, num_layers=4, num_kv_heads=2, num_heads=4, hidden_size=64)
    cache = TurboQuantCache(cfg, key_bits=3.5, value_bits=3.5, residual_length=4)
    assert cache.settings.append_backend == "auto"
    layer = _feed(cache, _random_kv(1, 2, 64, [9, 1, 1, 1], "cpu", torch.float32, 0))
    assert layer.key_store.length == 12 and layer.key_store.kernel_appends == 0


@pytest.mark.synthetic
def test_append_backend_is_validated():
    with pytest.raises(ValueError, match=r"`append_backend` must be one of \('auto', 'torch', 'triton'\)"):
        TurboQuantCacheConfig(append_backend="cuda")


@pytest.mark.synthetic
@pytest.mark.parametrize("override,why", [({"key_mode": "prod", "value_mode": "prod"}, "mode 'prod'"),
                                          ({"rotation": "dense"}, "rotation 'dense'")])
def test_triton_backend_refuses_what_the_kernel_cannot_encode(override, why):
    cfg = tiny_config("qwen3_5_text", head_dim=64, num_layers=4, num_kv_heads=2, num_heads=4, hidden_size=64)
    cache = TurboQuantCache(cfg, key_bits=3, value_bits=3, residual_length=0, append_backend="triton", **override)
    k = torch.randn(1, 2, 5, 64)
    with pytest.raises(ValueError, match=f"`append_backend`='triton' cannot encode this append: {why}"):
        cache.update(k, k, cache.compressed_layers[0])


@pytest.mark.synthetic
def test_layer_append_fills_like_update_and_checks_shapes():
    """``TurboQuantLayer.append`` (filling without attention) stores what ``update`` stores."""
    cfg = tiny_config("qwen3_5_text", head_dim=64, num_layers=4, num_kv_heads=2, num_heads=4, hidden_size=64)
    kv = _random_kv(2, 2, 64, [30, 7, 1], "cpu", torch.float32, 3)
    a = _feed(TurboQuantCache(cfg, key_bits=2.5, value_bits=2.5, residual_length=16), kv)
    b = _full_layer(TurboQuantCache(cfg, key_bits=2.5, value_bits=2.5, residual_length=16))
    for k, v in kv:
        b.append(k, v)
    assert b.get_seq_length() == a.get_seq_length() == 38
    assert torch.equal(a.key_store.codes[:, :, :32], b.key_store.codes[:, :, :32])
    assert torch.equal(a.residual_values(), b.residual_values()) and torch.equal(b.keys, b.residual_keys())
    with pytest.raises(ValueError, match="num_key_value_heads=2"):
        b.append(torch.randn(2, 3, 1, 64), torch.randn(2, 3, 1, 64))


# ------------------------------------------------------------------------------------------------
# GPU: the compiled kernel at Qwen3.6's full-attention shape
# ------------------------------------------------------------------------------------------------
GPU_BITS = [1.5, 2.0, 2.5, 3.0, 3.5, 4.0]


@pytest.mark.gpu
@pytest.mark.parametrize("bits", GPU_BITS)
def test_kernel_append_matches_torch_gpu(cuda, bits):
    """head_dim 256, 4 KV heads, batch 2, bf16: a 1000-token prefill, then 300 decode tokens through
    a 128-token window (two flushes), then a 517-token chunk."""
    stats = _compare_paths(cuda, torch.bfloat16, 256, 4, bits, [1000] + [1] * 300 + [517], residual=128, seed=int(bits * 2))
    print(f"bits={bits}: {stats}")


@pytest.mark.gpu
def test_kernel_append_model_logits_gpu(cuda):
    """Tiny qwen3_5_text model on CUDA, teacher-forced through prefill + decode with the fused
    attention: the kernel-appended cache gives the torch-appended cache's logits."""
    m = tiny_model("qwen3_5_text", seed=0, head_dim=128, num_layers=4, num_kv_heads=2, num_heads=4, hidden_size=128).to(cuda)
    ids = torch.randint(3, 128, (2, 300), generator=torch.Generator().manual_seed(0)).to(cuda)
    logits, caches = {}, {}
    for backend in ("torch", "auto"):
        cache = TurboQuantCache(m.config, key_bits=3.5, value_bits=3.5, residual_length=32, append_backend=backend)
        with torch.no_grad(), turboquant_attention(m):
            out = [m(input_ids=ids[:, :200], past_key_values=cache).logits[:, -1]]
            for t in range(200, 300):
                out.append(m(input_ids=ids[:, t : t + 1], past_key_values=cache).logits[:, -1])
        logits[backend], caches[backend] = torch.stack(out, 1), cache
    assert _full_layer(caches["auto"]).key_store.kernel_appends > 0
    assert _full_layer(caches["torch"]).key_store.kernel_appends == 0
    diff = (logits["auto"] - logits["torch"]).abs().max().item()
    scale = logits["torch"].abs().max().item()
    print(f"kernel vs torch append: max |Δlogit| {diff:.3g} (logit scale {scale:.3g})")
    # a layout error would scramble the compressed attention; boundary flips move logits by far less
    assert diff <= 1e-2 * scale, f"kernel vs torch append: max |Δlogit| {diff:.3g} (logit scale {scale:.3g})"


@pytest.mark.gpu
def test_kernel_append_norm_overflow_is_raised_without_a_host_sync_gpu(cuda):
    """CUDA kernel appends read the float16 norm-range verdict asynchronously: an overflowing
    append is reported at the latest by the layer's next update (or ``cache.check_norms()``), the
    store cropped to the tokens before it; the check itself adds no host synchronisation."""
    cfg = tiny_config("qwen3_5_text", head_dim=64, num_layers=4, num_kv_heads=2, num_heads=4, hidden_size=64)
    cache = TurboQuantCache(cfg, key_bits=3.5, value_bits=3.5, residual_length=0)
    idx = cache.compressed_layers[0]
    k = torch.randn(1, 2, 3, 64, device=cuda)
    cache.update(k, k, idx)
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call in the append path raises
    early = None
    try:
        cache.update(k * 1e5, k, idx)  # enqueued; the verdict lands later (or already, if the GPU was quick)
    except ValueError as err:  # landed before this update's own read of the store: reported right here
        early = err
    finally:
        torch.cuda.set_sync_debug_mode("default")
    if early is None:
        with pytest.raises(ValueError, match=r"layer \d+: a vector norm appended at tokens \[3, 6\) lies outside the float16"):
            cache.check_norms()
    else:
        assert "a vector norm appended at tokens [3, 6) lies outside the float16" in str(early)
    layer = cache.layers[idx]
    assert layer.key_store.length == 3, "the store keeps only the tokens before the failed append"
    # a layer that is only appended to (no read in between) reports it at its next update
    cache2 = TurboQuantCache(cfg, key_bits=3.5, value_bits=3.5, residual_length=0)
    layer2 = cache2.layers[idx]
    layer2.append(k, k)
    layer2.append(k * 1e5, k)
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match=r"tokens \[3, 6\) lies outside the float16"):
        cache2.update(k, k, idx)
    assert layer2.key_store.length == 3
