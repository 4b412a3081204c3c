"""Code layouts in the cache: the paper's outlier recipe (§4.3) next to the halves split."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from turboquant.cache import (
    TurboQuantCache,
    TurboQuantCacheConfig,
    cache_nbytes,
    ideal_kv_nbytes,
    turboquant_attention,
)
from turboquant.layout import LAYOUT_NAMES
from turboquant.models import tiny_model

pytestmark = pytest.mark.synthetic

ARCHS = ["llama", "qwen3_5_text"]
SHAPES = {
    "llama": {"head_dim": 64, "num_layers": 2, "num_kv_heads": 2, "num_heads": 4, "hidden_size": 64},
    "qwen3_5_text": {"head_dim": 64, "num_layers": 4, "num_kv_heads": 2, "num_heads": 4, "hidden_size": 64},
}
RECIPES = [
    ("paper-3.5", "paper-3.5"),
    ("paper-2.5", "paper-2.5"),
    ("paper-3.5", "halves-2.5"),
    ((16, 4, 2), 3),
]


@pytest.fixture(scope="module")
def models():
    return {arch: tiny_model(arch, seed=0, **SHAPES[arch]) for arch in ARCHS}


def _ids(n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _teacher_forced(model, cache, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    out = [model(input_ids=ids[:, :prefill], past_key_values=cache).logits[:, -1]]
    for t in range(prefill, ids.shape[1]):
        out.append(model(input_ids=ids[:, t : t + 1], past_key_values=cache).logits[:, -1])
    return torch.stack(out, 1)


def _kv(b: int, h: int, t: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(b, h, t, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kl, vl", RECIPES, ids=lambda r: str(r))
def test_outlier_layouts_fused_attention_equals_dequantized_sdpa(models, arch, kl, vl):
    """Per-group scores and per-group un-rotation in the 'turboquant' attention give the same
    logits as sdpa over the dequantized cache, and differ from full precision (really compressed)."""
    m, ids = models[arch], _ids(80, batch=2, seed=3)
    kw = {"key_layout": kl, "value_layout": vl, "residual_length": 16}
    a = _teacher_forced(m, TurboQuantCache(m.config, **kw), ids, 40)
    with turboquant_attention(m):
        b = _teacher_forced(m, TurboQuantCache(m.config, **kw), ids, 40)
    exact = _teacher_forced(m, DynamicCache(config=m.config), ids, 40)
    diff = (a - b).abs().max().item()
    assert diff < 1e-4, (
        f"{arch} K{kl}/V{vl}: fused vs dequantized max |Δlogit| = {diff:.3g} (> 1e-4)"
    )
    assert torch.equal(a[:, 0], exact[:, 0]), "prefill logits must be exact"
    assert (a[:, 1:] - exact[:, 1:]).abs().max().item() > 1e-6, (
        "decode equals full precision: nothing compressed?"
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_paper_layouts_generate(models, arch):
    m = models[arch]
    cache = TurboQuantCache(
        m.config, key_layout="paper-3.5", value_layout="paper-2.5", residual_length=8
    )
    with turboquant_attention(m), torch.no_grad():
        out = m.generate(_ids(30), past_key_values=cache, max_new_tokens=12, do_sample=False)
    assert out.shape == (1, 42)
    layer = cache.layers[cache.compressed_layers[0]]
    assert layer.get_seq_length() == 41 and layer.key_store.outliers.shape == (2, 16)


@pytest.mark.parametrize("kl, vl", RECIPES + [("halves-3.5", "int-4")], ids=lambda r: str(r))
def test_measured_bytes_equal_the_layouts_formula_with_outlier_indices(models, kl, vl):
    m = models["llama"]
    cache = TurboQuantCache(m.config, key_layout=kl, value_layout=vl, residual_length=32)
    with torch.no_grad():
        m(input_ids=_ids(300, batch=2), past_key_values=cache)
    ks = cache.layers[0].key_store
    rep = cache_nbytes(cache)
    held = rep.used["codes"] + rep.used["norms"] + rep.used.get("outlier_index", 0)
    assert held == ideal_kv_nbytes(cache, ks.length, batch=2), (
        f"{held} != {ideal_kv_nbytes(cache, ks.length, batch=2)}"
    )
    grouped = ks.codec.layout.is_grouped or cache.layers[0].value_store.codec.layout.is_grouped
    assert ("outlier_index" in rep.used) == grouped
    assert ks.codes.shape[-1] == ks.codec.layout.code_nbytes


def test_a_planted_10x_channel_is_selected_per_head_and_stays_fixed(models):
    m = models["llama"]
    cache = TurboQuantCache(
        m.config, key_layout="paper-3.5", value_layout="paper-3.5", residual_length=0
    )
    k, v = _kv(1, 2, 64, 64, 1), _kv(1, 2, 64, 64, 2)
    k[:, 0, :, 7] *= 10
    k[:, 1, :, 50] *= 10
    v[:, :, :, 33] *= 10
    layer = cache.layers[0]
    layer.append(k, v)
    ko, vo = layer.key_store.outliers.tolist(), layer.value_store.outliers.tolist()
    assert 7 in ko[0] and 50 in ko[1] and all(33 in h for h in vo), (ko, vo)
    later = _kv(1, 2, 16, 64, 3)
    later[:, :, :, 1] *= 100  # a new outlier after the prompt does not move the selection
    layer.append(later, later)
    assert layer.key_store.outliers.tolist() == ko and layer.key_store.length == 80


def test_selection_and_codes_are_deterministic_for_a_fixed_seed(models):
    m = models["llama"]
    stores = []
    for seed in (5, 5, 6):
        cache = TurboQuantCache(
            m.config, key_layout="paper-2.5", value_layout="paper-2.5", seed=seed, residual_length=0
        )
        cache.layers[0].append(_kv(2, 2, 40, 64, 0), _kv(2, 2, 40, 64, 1))
        stores.append(cache.layers[0].key_store)
    a, b, c = stores
    assert (
        torch.equal(a.outliers, b.outliers)
        and torch.equal(a.codes, b.codes)
        and torch.equal(a.norms, b.norms)
    )
    assert torch.equal(a.outliers, c.outliers)  # selection is data, not seed
    assert not torch.equal(a.codes, c.codes)  # the rotations are seeded


def test_key_bits_still_map_to_the_halves_and_integer_layouts():
    assert TurboQuantCacheConfig(key_bits=3.5, value_bits=2).recipe() == "Khalves-3.5/Vint-2"
    s = TurboQuantCacheConfig(key_layout="halves-2.5", value_layout="paper-3.5")
    assert (s.key_bits, s.value_bits, s.recipe()) == (2.5, 3.5, "Khalves-2.5/Vpaper-3.5")
    assert TurboQuantCacheConfig(key_layout=(32, 4, 3)).key_layout == "outliers-32-4-3"


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"key_layout": "paper-3"}, "valid layouts are"),
        ({"value_layout": "outliers-24-4-3"}, "`n_out`=24"),
        ({"key_layout": "paper-3.5", "key_mode": "prod"}, "key_mode"),
        ({"key_bits": 16, "value_bits": 16, "key_layout": "paper-3.5"}, "passthrough"),
    ],
)
def test_bad_layout_settings_are_named_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        TurboQuantCacheConfig(**kw)
    assert "paper-3.5" in LAYOUT_NAMES


def test_n_out_not_below_head_dim_is_a_named_error(models):
    m = models["llama"]
    with pytest.raises(ValueError, match="`n_out`=64"):
        TurboQuantCache(m.config, key_layout=(64, 4, 3))


def test_explicit_triton_backend_raises_naming_the_outlier_layout():
    """A layout the kernels cannot run (head_dim 96: no kernel tiles it) with append_backend='triton'
    raises naming the layout and the reason (``turboquant.kernels.layout_unsupported``)."""
    from turboquant.models import tiny_config

    cfg = tiny_config("llama", head_dim=96, num_layers=2, num_kv_heads=2, num_heads=4, hidden_size=64)
    cache = TurboQuantCache(cfg, key_layout="outliers-32-4-3", value_layout="outliers-32-4-3",
                            rotation="dense", append_backend="triton", residual_length=0)
    with pytest.raises(ValueError, match=r"outliers-32-4-3.*head_dim 96"):
        cache.layers[0].append(_kv(1, 2, 4, 96, 0), _kv(1, 2, 4, 96, 0))


@pytest.mark.integration
def test_explicit_triton_backend_runs_the_paper_layout_like_torch(models):
    """paper-3.5 / paper-2.5 run in the Triton kernels (code-space quantize_pack and dequantize):
    same codes and reconstructions as the pure-torch store, up to float32 rounding at a boundary."""
    m = models["llama"]
    kw = {"key_layout": "paper-3.5", "value_layout": "paper-2.5", "residual_length": 0}
    kern = TurboQuantCache(m.config, append_backend="triton", **kw)
    ref = TurboQuantCache(m.config, append_backend="torch", **kw)
    k, v = _kv(1, 2, 9, 64, 0) * 3, _kv(1, 2, 9, 64, 1)
    for c in (kern, ref):
        c.layers[0].append(k, v)
    for kind in ("key_store", "value_store"):
        a, b = getattr(kern.layers[0], kind), getattr(ref.layers[0], kind)
        assert a.kernel_appends == 1 and b.kernel_appends == 0
        assert torch.equal(a.outliers, b.outliers)
        assert (a.codes != b.codes).float().mean() < 1e-2
        torch.testing.assert_close(a.norms.float(), b.norms.float(), rtol=1e-3, atol=0)
        torch.testing.assert_close(a.dequantize(torch.float32), b.dequantize(torch.float32), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_auto_backend_falls_back_to_torch_with_one_warning_for_an_outlier_layout():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: append_backend='auto' considers the kernels on CUDA only")
    import turboquant.cache.backends as cache_mod

    # head_dim 96: a layout no kernel runs (paper-3.5 at head_dim 64 runs in the code-space kernels)
    m = tiny_model("llama", seed=0, **{**SHAPES["llama"], "head_dim": 96}).cuda()
    cache_mod._WARNED_LAYOUTS.discard("outliers-32-4-3")
    cache = TurboQuantCache(
        m.config, key_layout="outliers-32-4-3", value_layout="outliers-32-4-3", rotation="dense",
        residual_length=0,
    )
    import warnings

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for layer in cache.compressed_layers:  # 2 layers x K and V: one warning for the layout
            cache.layers[layer].append(_kv(1, 2, 8, 96, 0).cuda(), _kv(1, 2, 8, 96, 1).cuda())
    hits = [w for w in rec if issubclass(w.category, RuntimeWarning) and "outliers-32-4-3" in str(w.message)]
    assert len(hits) == 1, [str(w.message) for w in rec]
    store = cache.layers[cache.compressed_layers[0]].key_store
    assert store.kernel_appends == 0 and store.length == 8


@pytest.mark.parametrize(
    "kl, vl", [("paper-3.5", "paper-2.5"), ("paper-2.5", "halves-3.5")], ids=str
)
def test_outlier_layout_attention_with_and_without_the_cpu_kernel(models, monkeypatch, kl, vl):
    """The C kernel scores an outlier layout one channel group at a time; it matches the torch
    path and sdpa over the dequantized cache."""
    import turboquant.attention as att
    from turboquant.attention import compressed_attention_reference, cpu_backend

    if cpu_backend() != "c":
        pytest.skip("no C compiler: the CPU kernel is not built (TURBOQUANT_CPU_KERNEL=0 or no cc)")
    m = models["llama"]
    cache = TurboQuantCache(m.config, key_layout=kl, value_layout=vl, residual_length=8)
    with torch.no_grad():
        m(input_ids=_ids(77), past_key_values=cache)
    layer = cache.layers[0]
    query = torch.randn(1, 4, 1, 64, generator=torch.Generator().manual_seed(1))
    calls = []
    real = att._c_call
    monkeypatch.setattr(att, "_c_call", lambda *a: calls.append(1) or real(*a))
    a = compressed_attention_reference(query, layer, 0.125, None)
    expected = sum(2 if name.startswith("paper") else 1 for name in (kl, vl))  # one C call a group
    assert len(calls) == expected, (
        f"expected {expected} C calls (one a channel group), got {len(calls)}"
    )
    monkeypatch.setattr(att, "_use_c_groups", lambda x, c: False)
    b = compressed_attention_reference(query, layer, 0.125, None)
    k, v = layer.dequantized()
    ref = torch.nn.functional.scaled_dot_product_attention(
        query, k, v, scale=0.125, enable_gqa=True
    ).transpose(1, 2)
    assert (a - b).abs().max() < 1e-5 and (b - ref).abs().max() < 1e-5, (
        f"|C - torch| {(a - b).abs().max():.3g}, |torch - sdpa(dequantized)| {(b - ref).abs().max():.3g}"
    )
