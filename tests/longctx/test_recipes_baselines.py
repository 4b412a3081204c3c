"""Recipes and baselines through one cache interface: codecs, measured bits, generate, KL plumbing."""

from __future__ import annotations

import pytest
import torch

from turboquant.baselines import Fp8Codec, RotatedIntCodec, kv_bits
from turboquant.eval.recipes import (
    RECIPES,
    available,
    get_recipe,
    recipe_cache_factory,
    verdict_recipe,
)
from turboquant.eval.runner import attention_context, cache_argument

pytestmark = pytest.mark.synthetic
D = 64


def _unit(n: int = 2000, d: int = D, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=-1, keepdim=True)


def test_fp8_per_token_codec_round_trip_and_bytes() -> None:
    x = _unit() * torch.logspace(-3, 2, 2000).unsqueeze(-1)  # per-token scale handles any magnitude
    codec = Fp8Codec(D)
    parts = codec.encode(x)
    y = codec.decode(parts, torch.float32)
    rel = ((y - x).norm(dim=-1) / x.norm(dim=-1)).max().item()
    assert rel < 0.05, f"fp8 e4m3 (3 mantissa bits) relative error {rel:.4f} >= 0.05"
    assert codec.nbytes(parts) == 2000 * (D + 2)


@pytest.mark.parametrize("bits", [2, 2.5, 3, 3.5, 4])
def test_rotated_int_codec_bytes_equal_turboquant_error_falls_with_bits_and_exceeds_lloyd_max(bits: float) -> None:
    from turboquant.quantizer import TurboQuantMSE

    x = _unit()
    codec = RotatedIntCodec(D, bits)
    parts = codec.encode(x)
    assert codec.nbytes(parts) == 2000 * TurboQuantMSE(D, bits).nbytes_per_vector
    mse = ((codec.decode(parts, torch.float32) - x) ** 2).sum(-1).mean().item()
    finer = RotatedIntCodec(D, min(bits + 1, 4)) if bits < 4 else None
    if finer is not None:
        mse_finer = ((finer.decode(finer.encode(x), torch.float32) - x) ** 2).sum(-1).mean().item()
        assert mse_finer < mse / 2, f"rot-int {bits}->{bits + 1} bits: MSE {mse:.4f} -> {mse_finer:.4f}"
    tq = TurboQuantMSE(D, bits)
    mse_tq = ((tq.dequantize(tq.quantize(x)) - x) ** 2).sum(-1).mean().item()
    # same rotation, same bytes: the Lloyd-Max codebook is MSE-optimal for the rotated marginal
    assert mse_tq < mse < 1.0, f"rot-int-{bits} MSE {mse:.4f} vs TurboQuant-mse {mse_tq:.4f} at the same bytes"


@pytest.mark.parametrize("codec", [Fp8Codec(D), RotatedIntCodec(D, 3.5)], ids=["fp8", "rot-int-3.5"])
def test_codec_layer_history_equals_decoding_every_stored_code_at_once(codec) -> None:
    """The layer decodes each flushed block once and keeps it; what attention sees must equal
    decoding all the stored codes in one call (the definition of the baseline), step by step."""
    from turboquant.baselines.layers import CodecLayer

    g = torch.Generator().manual_seed(3)
    layer = CodecLayer(codec, codec, residual_length=8)
    layer.update(torch.randn(2, 3, 21, D, generator=g), torch.randn(2, 3, 21, D, generator=g))
    for step in range(12):
        k, v = layer.update(torch.randn(2, 3, 1, D, generator=g), torch.randn(2, 3, 1, D, generator=g))
        stored = layer.compressed_tokens
        assert k.shape[-2] == v.shape[-2] == 21 + step + 1
        for kind, got in (("k", k), ("v", v)):
            whole = codec.decode(layer._codes[kind], torch.float32)
            assert whole.shape[-2] == stored
            assert torch.allclose(got[:, :, :stored], whole, rtol=0, atol=1e-6), (kind, step)
            assert torch.equal(got[:, :, stored:], layer.keys if kind == "k" else layer.values)


def test_bad_names_list_the_valid_ones() -> None:
    with pytest.raises(KeyError, match=r"unknown recipe/baseline 'int4'; valid: \['full', 'paper-3.5'"):
        get_recipe("int4")
    with pytest.raises(ValueError, match=r"`bits` for the rotated int baseline must be one of"):
        RotatedIntCodec(D, 1.5)
    with pytest.raises(ValueError, match="verdict bits must be one of"):
        verdict_recipe("3", None)


@pytest.fixture(scope="module")
def tiny():
    from turboquant.models import tiny_model

    torch.manual_seed(0)
    return tiny_model("llama", head_dim=D, num_layers=2)


QUANTO = tuple(n for n in RECIPES if n.startswith("quanto"))


def _generate_and_measure(tiny, names: list[str]) -> None:
    ids = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(1))
    factory = recipe_cache_factory(tiny)
    expected = {"halves-3.5": 3.5 + 16 / D, "halves-2.5": 2.5 + 16 / D, "K4/V3": 3.5 + 16 / D,
                "fp8-e4m3": 8 + 16 / D, "rot-int-3.5": 3.5 + 16 / D, "rot-int-2.5": 2.5 + 16 / D, "full": 16.0}
    for name in names:
        cache = factory(name)
        with attention_context(tiny, cache):
            out = tiny.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **{cache_argument(tiny): cache},
                                max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert out.shape[1] == 104 and cache.get_seq_length() == 103, name
        bits = kv_bits(cache)["bits_per_coordinate"]
        if name in expected:
            assert bits == pytest.approx(expected[name]), f"{name}: measured {bits} bits a coordinate"
        else:
            assert bits is not None and 0 < bits < 16, f"{name}: measured {bits}"


def test_every_recipe_generates_through_one_interface_with_measured_bits(tiny) -> None:
    names, skipped = available([n for n in RECIPES if n not in QUANTO], tiny.config)
    for name, reason in skipped.items():
        assert reason, f"{name} skipped without a reason"
    assert {"full", "halves-3.5", "halves-2.5", "K4/V3", "fp8-e4m3", "rot-int-3.5", "rot-int-2.5"} <= set(names)
    _generate_and_measure(tiny, names)


@pytest.mark.slow
def test_transformers_quantized_cache_baseline_generates_with_measured_bits(tiny) -> None:
    """quanto builds a C++ extension at first use (minutes on 2 cores): ``slow``."""
    names, skipped = available(list(QUANTO), tiny.config)
    if skipped:
        pytest.skip(f"{sorted(skipped)}: {next(iter(skipped.values()))}")
    _generate_and_measure(tiny, names)


def test_paper_recipes_enabled_exactly_when_the_cache_has_layouts(tiny) -> None:
    import dataclasses

    from turboquant.cache import TurboQuantCacheConfig

    has = "key_layout" in {f.name for f in dataclasses.fields(TurboQuantCacheConfig)}
    name, note = verdict_recipe("3.5", tiny.config)
    assert (name == "paper-3.5") == has and (note is None) == has
    if not has:
        assert "key_layout" in get_recipe("paper-3.5").unavailable(tiny.config)
        with pytest.raises(ValueError, match="cannot run on this model"):
            recipe_cache_factory(tiny)("paper-3.5")


def test_baselines_refuse_hybrid_models_with_a_reason() -> None:
    from turboquant.models import tiny_config

    cfg = tiny_config("qwen3_5_text", head_dim=64, num_layers=4)
    names, skipped = available(["fp8-e4m3", "rot-int-3.5", "quanto-int4", "halves-3.5"], cfg)
    assert names == ["halves-3.5"]
    assert all("full-attention" in r or "optimum-quanto" in r for r in skipped.values())


def test_teacher_forced_kl_is_zero_for_full_and_positive_when_compressed(tiny) -> None:
    from turboquant.eval.quality import teacher_forced_kl

    prompts = [torch.randint(0, 128, (120,), generator=torch.Generator().manual_seed(s)).tolist() for s in (2, 3)]
    res = teacher_forced_kl(tiny, prompts, ["halves-2.5", "fp8-e4m3"], n_tokens=4)
    assert res["full"]["kl"] == 0.0 and res["full"]["top1"] == 1.0
    assert res["halves-2.5"]["kl"] > 0, "a 2.5-bit cache must change the next-token distribution"
    assert res["halves-2.5"]["kl"] > res["fp8-e4m3"]["kl"], "fp8 must be closer to full than 2.5 bits"
    assert res["halves-2.5"]["n_positions"] == 8 and res["halves-2.5"]["bits_measured"] == pytest.approx(2.75)


def test_claim_records_file_baselines_apart_and_skip_rows_carry_the_reason() -> None:
    from turboquant.eval.claim_rows import file_row, skip_rows

    measured = {"recipes": {"halves-3.5": {"status": "WARN"}, "fp8-e4m3": {"status": "PASS"}}}
    for name in ("halves-3.5", "fp8-e4m3"):
        file_row(measured, name)
    skip_rows(measured, {"quanto-int4": "needs `pip install optimum-quanto`", "paper-2.5": "no layouts"})
    assert set(measured["recipes"]) == {"halves-3.5", "paper-2.5"}
    assert measured["baselines"]["fp8-e4m3"] == {"status": "PASS"}
    assert measured["baselines"]["quanto-int4"] == {"status": "SKIP", "reason": "needs `pip install optimum-quanto`"}
    with pytest.raises(ValueError, match="without a reason"):
        skip_rows(measured, {"hqq-int2": ""})
    with pytest.raises(KeyError, match="valid: "):
        skip_rows(measured, {"int4": "?"})


def test_hqq_baselines_skip_with_the_install_hint_when_hqq_is_absent(tiny, monkeypatch) -> None:
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_hqq_available", lambda: False)
    names, skipped = available(["hqq-int4", "hqq-int2"], tiny.config)
    assert names == [] and all("pip install hqq" in r for r in skipped.values())
