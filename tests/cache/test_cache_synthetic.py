"""TurboQuantCache plumbing on tiny random-init models (Llama and Qwen3.6's qwen3_5_text hybrid)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, QuantizedCache

from turboquant.attention import CentroidTable, compressed_attention_reference, cpu_backend
from turboquant.cache import (
    ExactLayer,
    TurboQuantCache,
    TurboQuantLayer,
    cache_nbytes,
    ideal_kv_nbytes,
    turboquant_attention,
)
from turboquant.models import tiny_config, tiny_model
from turboquant.quantizer import TurboQuantMSE

pytestmark = pytest.mark.synthetic

ARCHS = ["llama", "qwen3_5_text"]
SHAPES = {  # 4 layers: qwen3_5_text = 3 Gated DeltaNet + 1 full attention (Qwen3.6's pattern)
    "llama": {"head_dim": 64, "num_layers": 2, "num_kv_heads": 2, "num_heads": 4, "hidden_size": 64},
    "qwen3_5_text": {"head_dim": 64, "num_layers": 4, "num_kv_heads": 2, "num_heads": 4, "hidden_size": 64},
}


@pytest.fixture(scope="module")
def models():
    # synthetic tests already run on one thread (root conftest's autouse fixture)
    return {arch: tiny_model(arch, seed=0, **SHAPES[arch]) for arch in ARCHS}


def _ids(n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _teacher_forced_logits(model, cache, ids: torch.Tensor, prefill: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Prefill ``prefill`` tokens, then feed the rest one at a time; logits of every step."""
    am = None if mask is None else mask[:, :prefill]
    out = [model(input_ids=ids[:, :prefill], attention_mask=am, past_key_values=cache).logits[:, -1]]
    for t in range(prefill, ids.shape[1]):
        am = None if mask is None else mask[:, : t + 1]
        out.append(model(input_ids=ids[:, t : t + 1], attention_mask=am, past_key_values=cache).logits[:, -1])
    return torch.stack(out, 1)


@pytest.mark.parametrize("arch", ARCHS)
def test_passthrough_logits_equal_dynamic_cache(models, arch):
    """16-bit passthrough: bit-identical logits to DynamicCache (guards hybrid models against silent corruption)."""
    m, ids = models[arch], _ids(40, batch=2)
    ref = _teacher_forced_logits(m, DynamicCache(config=m.config), ids, 24)
    cache = TurboQuantCache(m.config, key_bits=16, value_bits=16)
    with turboquant_attention(m):
        got = _teacher_forced_logits(m, cache, ids, 24)
    assert all(isinstance(l, ExactLayer) for l in cache.layers if type(l).__name__ != "LinearAttentionLayer")
    assert torch.equal(got, ref), f"{arch}: passthrough max |Δlogit| = {(got - ref).abs().max().item():.3g} (must be 0)"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("bits", [4, 3.5, 2.5])
def test_fused_attention_equals_dequantized_sdpa(models, arch, bits):
    """The 'turboquant' attention (codes scored in the rotated domain) computes exactly the attention
    of sdpa over the dequantized cache: same numbers up to float32 rounding."""
    m, ids = models[arch], _ids(90, batch=2, seed=1)
    a = _teacher_forced_logits(m, TurboQuantCache(m.config, key_bits=bits, value_bits=bits, residual_length=16), ids, 50)
    with turboquant_attention(m):
        b = _teacher_forced_logits(m, TurboQuantCache(m.config, key_bits=bits, value_bits=bits, residual_length=16), ids, 50)
    exact = _teacher_forced_logits(m, DynamicCache(config=m.config), ids, 50)
    diff = (a - b).abs().max().item()
    assert diff < 1e-4, f"{arch} {bits} bits: fused vs dequantized-sdpa max |Δlogit| = {diff:.3g} (> 1e-4)"
    # prefill is exact; decode differs from full precision (compression is real, not a no-op)
    assert torch.equal(a[:, 0], exact[:, 0]), "prefill logits must be exact"
    assert (a[:, 1:] - exact[:, 1:]).abs().max().item() > 1e-6, "compressed decode equals full precision: nothing stored compressed?"


@pytest.mark.parametrize("mode", ["mse", "prod"])
def test_prod_and_asymmetric_modes_match_dequantized(models, mode):
    m, ids = models["llama"], _ids(60, seed=2)
    kw = {"key_bits": 4, "value_bits": 2.5, "key_mode": mode, "value_mode": "mse", "residual_length": 8}
    a = _teacher_forced_logits(m, TurboQuantCache(m.config, **kw), ids, 30)
    with turboquant_attention(m):
        b = _teacher_forced_logits(m, TurboQuantCache(m.config, **kw), ids, 30)
    diff = (a - b).abs().max().item()
    assert diff < 1e-4, f"K4 {mode} / V2.5 mse: fused vs dequantized max |Δlogit| = {diff:.3g}"


def test_storage_is_packed_codes_not_full_precision(models):
    """Resident storage: uint8 bit planes + float16 norms; the window holds < residual_length tokens."""
    m = models["llama"]
    cache = TurboQuantCache(m.config, key_bits=3.5, value_bits=2.5, residual_length=32)
    with torch.no_grad():
        m(input_ids=_ids(300), past_key_values=cache)
    layer = cache.layers[0]
    assert isinstance(layer, TurboQuantLayer)
    ks, vs = layer.key_store, layer.value_store
    assert ks.codes.dtype == torch.uint8 and ks.codes.shape[-1] == 64 * 3.5 / 8, f"key codes {ks.codes.dtype} {tuple(ks.codes.shape)}"
    assert vs.codes.shape[-1] == 64 * 2.5 / 8 and ks.norms.dtype == torch.float16
    assert ks.length == 288 and layer._r == 12, f"stored {ks.length} + window {layer._r}, expected 288 + 12 (blocks of 32)"
    rep = cache_nbytes(cache)
    assert set(rep.pinned) >= {"codes", "norms", "residual"} and "exact_kv" not in rep.pinned, rep.pinned
    ideal = ideal_kv_nbytes(cache, 288)
    coded = rep.used["codes"] + rep.used["norms"]
    assert coded == ideal, f"code+norm bytes {coded} != layout ideal {ideal}"


def test_memory_report_of_dynamic_cache(models):
    m = models["llama"]
    cache = DynamicCache(config=m.config)
    with torch.no_grad():
        m(input_ids=_ids(100), past_key_values=cache)
    expect = sum(2 * l.keys.numel() * 4 for l in cache.layers)
    rep = cache_nbytes(cache)
    assert rep.total_used == expect and rep.total_pinned >= expect, f"DynamicCache report {rep.as_dict()} vs {expect}"


def test_hybrid_only_full_attention_layers_compressed(models):
    """qwen3_5_text: Gated DeltaNet layers keep transformers' exact LinearAttentionLayer; QuantizedCache refuses."""
    m = models["qwen3_5_text"]
    cache = TurboQuantCache(m.config, key_bits=3.5, value_bits=3.5)
    kinds = [type(l).__name__ for l in cache.layers]
    assert kinds == ["LinearAttentionLayer"] * 3 + ["TurboQuantLayer"], kinds
    with pytest.raises(Exception, match="full attention"):
        QuantizedCache(backend="quanto", config=m.config)
    with torch.no_grad(), turboquant_attention(m):
        out = m.generate(input_ids=_ids(20), cache=cache, max_new_tokens=6, do_sample=False)
    assert out.shape[1] == 26 and cache.get_seq_length() == 25, f"generated {out.shape}, cache length {cache.get_seq_length()}"


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_batch_left_padding(models, arch):
    """Batched generate with left padding: each row's logits match the unpadded single-row run."""
    m = models[arch]
    m.generation_config.pad_token_id = 0
    a, b = _ids(30, seed=3), _ids(22, seed=4)
    batch = torch.zeros(2, 30, dtype=torch.long)
    batch[0], batch[1, 8:] = a[0], b[0]
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :8] = 0
    kw = {"max_new_tokens": 8, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    with torch.no_grad(), turboquant_attention(m):
        both = m.generate(input_ids=batch, attention_mask=mask, past_key_values=TurboQuantCache(m.config, key_bits=4, value_bits=4, residual_length=4), **kw)
        single = m.generate(input_ids=b, past_key_values=TurboQuantCache(m.config, key_bits=4, value_bits=4, residual_length=4), **kw)
    s_both = torch.stack(both.scores, 1)[1]
    s_single = torch.stack(single.scores, 1)[0]
    diff = (s_both - s_single).abs().max().item()
    assert torch.equal(both.sequences[1, 30:], single.sequences[0, 22:]), "padded row generated different tokens"
    assert diff < 1e-3, f"{arch}: left-padded row vs single run max |Δscore| = {diff:.3g}"


def test_beam_search_and_reorder_are_exact(models):
    m = models["llama"]
    ids = _ids(20, seed=5)
    kw = {"max_new_tokens": 6, "num_beams": 3, "do_sample": False}
    with torch.no_grad(), turboquant_attention(m):
        ref = m.generate(input_ids=ids, past_key_values=DynamicCache(config=m.config), **kw)
        got = m.generate(input_ids=ids, past_key_values=TurboQuantCache(m.config, key_bits=16, value_bits=16), **kw)
        tq = m.generate(input_ids=ids, past_key_values=TurboQuantCache(m.config, key_bits=4, value_bits=4), **kw)
    assert torch.equal(ref, got), "passthrough beam search differs from DynamicCache"
    assert tq.shape == ref.shape
    # reorder of the packed batch is exact (no requantization)
    cache = TurboQuantCache(m.config, key_bits=3.5, value_bits=3.5, residual_length=8)
    with torch.no_grad():
        m(input_ids=_ids(45, batch=3, seed=6), past_key_values=cache)
    layer = cache.layers[1]
    before = layer.dequantized()
    idx = torch.tensor([2, 0, 0])
    cache.reorder_cache(idx)
    after = layer.dequantized()
    assert torch.equal(after[0], before[0][idx]) and torch.equal(after[1], before[1][idx]), "reorder changed the stored values"


def test_crop_removes_window_then_codes(models):
    m = models["llama"]
    cache = TurboQuantCache(m.config, key_bits=3.5, value_bits=3.5, residual_length=16)
    with torch.no_grad():
        m(input_ids=_ids(70), past_key_values=cache)
    layer = cache.layers[0]
    k_full, _ = layer.dequantized()
    assert cache.is_croppable
    cache.crop(-10)
    k, _ = layer.dequantized()
    assert cache.get_seq_length() == 60 and torch.equal(k, k_full[:, :, :60]), f"after crop(-10): length {cache.get_seq_length()}"


@pytest.mark.parametrize("bits", [1, 1.5, 2, 2.5, 3, 3.5, 4])
def test_centroid_table_matches_quantizer(bits):
    """Fast unpacking (torch gathers) equals the core's unpack + centroid lookup; the CPU kernel's scores match."""
    q = TurboQuantMSE(64, bits, seed=3)
    x = torch.randn(2, 3, 37, 64, generator=torch.Generator().manual_seed(0))
    packed = q.pack(q.quantize(x))
    table = CentroidTable.from_segments(64, q.segments, torch.device("cpu"))
    ref = q.centroid_values(q.unpack(packed).idx)
    assert torch.equal(table.gather(packed.codes), ref)


def test_compressed_attention_with_and_without_cpu_kernel(models, monkeypatch):
    m = models["llama"]
    cache = TurboQuantCache(m.config, key_bits=3.5, value_bits=2.5, residual_length=8)
    with torch.no_grad():
        m(input_ids=_ids(77), past_key_values=cache)
    layer = cache.layers[0]
    query = torch.randn(1, 4, 1, 64, generator=torch.Generator().manual_seed(1))
    a = compressed_attention_reference(query, layer, 0.125, None)
    import turboquant.attention as att

    monkeypatch.setattr(att, "_use_c", lambda x, c: False)
    b = compressed_attention_reference(query, layer, 0.125, None)
    k, v = layer.dequantized()
    ref = torch.nn.functional.scaled_dot_product_attention(query, k, v, scale=0.125, enable_gqa=True).transpose(1, 2)
    assert (a - b).abs().max() < 1e-5 and (b - ref).abs().max() < 1e-5, (
        f"backend {cpu_backend()}: |C - torch| {(a - b).abs().max():.3g}, |torch - sdpa(dequantized)| {(b - ref).abs().max():.3g}"
    )


# -- bad input ------------------------------------------------------------------------------------
def test_bad_head_dim_is_rejected():
    with pytest.raises(ValueError, match="head_dim.*48.*power of two"):
        TurboQuantCache(tiny_config("llama", head_dim=48), key_bits=3.5, value_bits=3.5)


@pytest.mark.parametrize("field,value", [("key_bits", 3.3), ("value_bits", 5), ("key_mode", "qjl")])
def test_bad_bits_or_mode_is_rejected(field, value):
    with pytest.raises(ValueError, match=f"`{field}` must be one of"):
        TurboQuantCache(tiny_config("llama"), **{field: value})


def test_cache_from_another_model_is_rejected(models):
    m = models["llama"]  # 2 layers, 2 KV heads
    with torch.no_grad():
        other = TurboQuantCache(tiny_config("llama", num_layers=1))
        with pytest.raises(ValueError, match="built for a model of 1 layers"):
            m(input_ids=_ids(5), past_key_values=other)
        heads = TurboQuantCache(tiny_config("llama", num_kv_heads=1, num_heads=4))
        with pytest.raises(ValueError, match="num_key_value_heads=1"):
            m(input_ids=_ids(5), past_key_values=heads)


def test_model_without_full_attention_is_rejected():
    cfg = tiny_config("qwen3_5_text", num_layers=2)
    cfg.layer_types = ["linear_attention", "linear_attention"]
    with pytest.raises(ValueError, match="has none"):
        TurboQuantCache(cfg)


def test_protected_layers_stay_exact(models):
    m = models["llama"]
    cache = TurboQuantCache(m.config, key_bits=2.5, value_bits=2.5, protected_layers=(-1,))
    assert isinstance(cache.layers[0], TurboQuantLayer) and isinstance(cache.layers[1], ExactLayer)
    with pytest.raises(ValueError, match="protected_layers"):
        TurboQuantCache(m.config, protected_layers=(5,))


def test_reserve_tokens_allocates_once_and_keeps_the_codes():
    """``reserve_tokens``: the first allocation holds the reserved length, later appends within it
    write in place (no growth copy), and the stored codes equal those of an unreserved cache."""
    cfg = tiny_config("qwen3_5_text", **SHAPES["qwen3_5_text"])
    gen = torch.Generator().manual_seed(4)
    kv = [(torch.randn(2, 2, t, 64, generator=gen), torch.randn(2, 2, t, 64, generator=gen)) for t in (40, 1, 300, 7)]
    layers = {}
    for reserve in (0, 1000):
        cache = TurboQuantCache(cfg, key_bits=3.5, value_bits=3.5, residual_length=0, reserve_tokens=reserve)
        layer = cache.layers[cache.compressed_layers[0]]
        buffers = []
        for k, v in kv:
            layer.append(k, v)
            buffers.append(layer.key_store.codes.data_ptr())
        layers[reserve] = (layer, buffers)
    grown, reserved = layers[0][0], layers[1000][0]
    assert reserved.key_store.capacity == 1000 and len(set(layers[1000][1])) == 1, "reserved buffer was reallocated"
    assert grown.key_store.capacity < 1000 and len(set(layers[0][1])) > 1
    n = grown.key_store.length
    assert n == reserved.key_store.length == 348
    assert torch.equal(grown.key_store.codes[:, :, :n], reserved.key_store.codes[:, :, :n])
    assert torch.equal(grown.value_store.norms[:, :, :n], reserved.value_store.norms[:, :, :n])
    with pytest.raises(ValueError, match=r"`reserve_tokens` must be an int >= 0"):
        TurboQuantCache(cfg, reserve_tokens=-1)
