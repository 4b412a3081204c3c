"""Claims on the selected real model (default: the embedded SmolLM2-135M-Instruct): C07, C08, C11."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from tests.claim_checks import (
    C08_MAX_DISTORTION,
    C08_MAX_OVER_IDEAL,
    c08_distortion_bounds,
    check_c08_distortion,
    check_kv_bytes,
)
from turboquant.attention import compressed_attention, cpu_backend, register_attention, take_handoff
from turboquant.cache import TurboQuantCache, cache_nbytes, ideal_kv_nbytes, turboquant_attention
from turboquant.eval.throughput import decode_throughput, fill_from_prefill, profile_decode
from turboquant.models import EMBEDDED_NAME

pytestmark = pytest.mark.model

SEED_C08 = {3.5: {"distortion": 0.0196, "ip_sqerr_d256": 0.000076}, 2.5: {"distortion": 0.0673, "ip_sqerr_d256": 0.000261}}
# Next-token KL / top-1 agreement vs full precision over the 16 teacher-forced positions: absolute
# thresholds about 2-3x above what SmolLM2 measured (README: K4/V3 KL 0.017 and top-1 1.00,
# symmetric 3.5 KL 0.41, 2.5 KL 0.76); a cache returning wrong codes measures several nats.
C08_MAX_KL = {"K4 V3 mse": 0.05, "mse 3.5": 0.8, "mse 2.5": 1.5}
C08_MIN_TOP1 = {"K4 V3 mse": 0.9}
TAIL = 16  # teacher-forced decode positions for KL / attention-output error


# -- C07 --------------------------------------------------------------------------------------------
class _ZeroedCodesCache(TurboQuantCache):
    """Deliberately broken cache: every stored code is zeroed after each update (norms and the
    full-precision window kept). C07 asserts that it does not answer, so the compressed cache's
    right answer is evidence that the codes carry the history."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        layer = self.layers[layer_idx]
        for store in (getattr(layer, "key_store", None), getattr(layer, "value_store", None)):
            if store is not None and store.codes is not None:
                store.codes.zero_()
        return out


C07_ANSWERING = {"key_bits": 4, "value_bits": 3}  # K4/V3: 3.5 bits on average, answers (README)


@pytest.mark.claim("C07", "model loads")
def test_c07_model_loads_and_generates(lm, tq_options, claim):
    """Loads and answers; with a K4/V3 TurboQuantCache (3.5 bits on average) the embedded model
    still names Paris, and a cache whose codes are zeroed does not. Symmetric 3.5 bits is
    recorded: on this short prompt it drifts off topic (README), a measured note, not hidden."""
    tok, model = lm.tokenizer, lm.model
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    kw = {"do_sample": False, "pad_token_id": tok.pad_token_id or tok.eos_token_id}

    def answer(cache=None, new_tokens=24) -> str:
        with torch.no_grad():
            if cache is None:
                out = model.generate(input_ids=ids, max_new_tokens=new_tokens, **kw)
            else:
                with turboquant_attention(model):
                    out = model.generate(input_ids=ids, cache=cache, max_new_tokens=new_tokens, **kw)
        assert out.shape[1] > ids.shape[1], "generate produced no tokens"
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    full = answer()
    sym = answer(TurboQuantCache(model.config, key_bits=3.5, value_bits=3.5))
    k4v3 = answer(TurboQuantCache(model.config, **C07_ANSWERING), new_tokens=16)
    broken = answer(_ZeroedCodesCache(model.config, **C07_ANSWERING), new_tokens=16)
    names = {k: "paris" in v.lower() for k, v in (("full", full), ("sym", sym), ("k4v3", k4v3), ("broken", broken))}
    claim.setting(model=lm.name, source=lm.source, torch_dtype=str(lm.dtype), attn_implementation=lm.attn_implementation,
                  prompt_tokens=int(ids.shape[1]), residual_length=TurboQuantCache(model.config).settings.residual_length)
    claim.measured(load_seconds=round(lm.load_seconds, 1), answer=full, answer_tq_3_5_bits=sym,
                   tq_3_5_answer_names_paris=names["sym"], answer_tq_k4_v3=k4v3, answer_zeroed_codes_k4_v3=broken,
                   parameters=sum(p.numel() for p in model.parameters()))
    claim.threshold(loads_with_requested_dtype_and_attention=True, generates_tokens=True,
                    embedded_model_names_paris=["full precision", "TurboQuant K4/V3"],
                    zeroed_codes_cache_names_paris=False)
    if not names["sym"]:
        claim.note(f"symmetric 3.5-bit cache drifts on this prompt: {sym!r} (K4/V3 at the same 3.5 bits answers)")
    assert model.dtype == lm.dtype and model.config._attn_implementation == tq_options.attn_implementation
    assert full.strip(), f"no text generated: {full!r}"
    if lm.name == EMBEDDED_NAME:
        assert names["full"], f"embedded model answered {full!r}"
        assert names["k4v3"], f"embedded model with a K4/V3 TurboQuantCache answered {k4v3!r}"
        assert not names["broken"], f"a cache with zeroed codes still answered {broken!r}: the check cannot see the codes"


# -- C08 --------------------------------------------------------------------------------------------
def _rel_errors(x: torch.Tensor, xt: torch.Tensor, queries: torch.Tensor) -> tuple[float, float]:
    """Unit-norm distortion E||x - x̃||²/||x||² and attention IP squared error E<q, (x - x̃)/||x||>² (unit q)."""
    x, xt = x.float().reshape(-1, x.shape[-1]), xt.float().reshape(-1, x.shape[-1])
    n = x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    e = (x - xt) / n
    return float((e * e).sum(-1).mean()), float(((e @ queries.T) ** 2).mean())


def _kv_errors(prefill, cache: TurboQuantCache, queries: torch.Tensor) -> dict:
    dist, ip = [], []
    for idx, layer in enumerate(cache.layers):
        kt, vt = layer.dequantized()
        ref = prefill.cache.layers[idx]
        for x, xt in ((ref.keys, kt), (ref.values, vt)):
            d, i = _rel_errors(x, xt, queries)
            dist.append(d)
            ip.append(i)
    return {"distortion": sum(dist) / len(dist), "ip_sqerr": sum(ip) / len(ip)}


@pytest.fixture(scope="module")
def c08_caches(lm, prefill_2048) -> dict:
    out = {}
    for bits in (3.5, 2.5):
        out[bits] = fill_from_prefill(TurboQuantCache(lm.model.config, key_bits=bits, value_bits=bits), prefill_2048)
    return out


@pytest.mark.claim("C08", "real KV proxy")
@pytest.mark.parametrize("bits", [3.5, 2.5])
def test_c08_real_kv_distortion_and_bytes(lm, prefill_2048, c08_caches, bits, claim):
    cache = c08_caches[bits]
    d = cache.shape.head_dim
    g = torch.Generator().manual_seed(0)
    queries = F.normalize(torch.randn(64, d, generator=g), dim=-1)
    err = _kv_errors(prefill_2048, cache, queries)
    tokens = prefill_2048.input_ids.shape[1]
    rep = cache_nbytes(cache)
    ideal = ideal_kv_nbytes(cache, tokens)
    n_elems = sum(2 * l.keys.numel() for l in prefill_2048.cache.layers)
    bf16 = 2 * n_elems
    ratio_bf16 = bf16 / rep.total_pinned
    ideal_ratio = bf16 / ideal
    over_ideal = rep.total_pinned / ideal - 1
    claim.setting(model=lm.name, seq=tokens, bits=bits, mode="mse", head_dim=d, layers=len(cache.layers),
                  kv_heads=cache.shape.num_kv_heads, residual_length=cache.settings.residual_length, queries=64, seed=0)
    claim.measured(**{f"distortion_{bits}": round(err["distortion"], 5), f"ip_sqerr_{bits}": err["ip_sqerr"],
                      f"ip_sqerr_x_d_{bits}": round(err["ip_sqerr"] * d, 5),
                      f"bytes_{bits}": rep.as_dict(), f"ideal_bytes_{bits}": ideal, "bf16_bytes": bf16,
                      "fp32_dynamic_bytes": cache_nbytes(prefill_2048.cache).total_pinned,
                      f"ratio_vs_bf16_{bits}": round(ratio_bf16, 3), f"ideal_ratio_{bits}": round(ideal_ratio, 3),
                      f"measured_over_ideal_{bits}": round(over_ideal, 4)})
    lower, upper, lloyd_max = c08_distortion_bounds(bits, d)
    claim.measured(**{f"distortion_over_lloyd_max_{bits}": round(err["distortion"] / lloyd_max, 4)})
    claim.threshold(**{f"max_distortion_{bits}": upper, f"min_distortion_{bits}": round(lower, 5),
                       f"lloyd_max_{bits}_at_head_dim": round(lloyd_max, 5),
                       "min_distortion_rule": "max(4^-b Shannon bound, 0.75 x independent Lloyd-Max at head_dim)",
                       "max_abs_measured_over_ideal": C08_MAX_OVER_IDEAL, "error_ratio_2_5_over_3_5": [2, 6]})
    if err["distortion"] > SEED_C08[bits]["distortion"]:
        claim.warn(f"{bits}-bit distortion {err['distortion']:.4f} is worse than the seed's {SEED_C08[bits]['distortion']} "
                   f"(seed: Qwen3.6 head_dim 256; here head_dim {d})")
    check_c08_distortion(err["distortion"], bits, d)
    check_kv_bytes(rep.total_pinned, ideal)
    if bits == 2.5:
        other = _kv_errors(prefill_2048, c08_caches[3.5], queries)["distortion"]
        r = err["distortion"] / other
        claim.measured(error_ratio_2_5_over_3_5=round(r, 3))
        assert 2 <= r <= 6, f"2.5/3.5 distortion ratio {r:.3f} outside [2, 6]"


class _Probe:
    """Attention function that runs the compressed attention and also the exact attention over the
    prefill's full-precision K/V with the same query: relative output error per layer."""

    name = "turboquant_probe"

    def __init__(self, exact_cache: DynamicCache) -> None:
        self.exact = exact_cache
        self.errors: list[float] = []

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
        layer = take_handoff(module, key)
        if layer is None:
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kw)
        out = compressed_attention(query, layer, scaling, attention_mask)
        n = layer.get_seq_length()
        ek = self.exact.layers[module.layer_idx].keys[:, :, :n]
        ev = self.exact.layers[module.layer_idx].values[:, :, :n]
        ref = F.scaled_dot_product_attention(query, ek, ev, scale=scaling, enable_gqa=True).transpose(1, 2)
        self.errors.append(float((out - ref).norm() / ref.norm()))
        return out, None


@torch.no_grad()
def _tail_logits(model, cache, ids: torch.Tensor, probe: _Probe | None = None) -> torch.Tensor:
    out = []
    for t in range(ids.shape[1] - TAIL, ids.shape[1]):
        out.append(model(input_ids=ids[:, t : t + 1], past_key_values=cache).logits[:, -1].float())
    return torch.cat(out)


CONFIGS = {  # name: (key_bits, value_bits, key_mode, value_mode)
    "mse 3.5": (3.5, 3.5, "mse", "mse"),
    "mse 2.5": (2.5, 2.5, "mse", "mse"),
    "prod 3.5": (3.5, 3.5, "prod", "prod"),
    "prod 2.5": (2.5, 2.5, "prod", "prod"),
    "K4 V3 mse": (4, 3, "mse", "mse"),
    "K4 V2 mse": (4, 2, "mse", "mse"),
    "K2.5 V4 mse": (2.5, 4, "mse", "mse"),
}


@pytest.mark.claim("C08", "real KV proxy")
def test_c08_attention_output_kl_mse_vs_prod_asymmetric(lm, prefill_2048, claim):
    """What the seed did not measure: attention output error, next-token KL vs full precision over
    the last 16 positions (teacher forcing), MSE-only vs prod (QJL), asymmetric K/V widths."""
    model, ids = lm.model, prefill_2048.input_ids
    n0 = ids.shape[1] - TAIL
    prefix = DynamicCache(config=model.config)
    for idx, layer in enumerate(prefill_2048.cache.layers):
        prefix.update(layer.keys[:, :, :n0], layer.values[:, :, :n0], idx)
    import copy

    ref = _tail_logits(model, copy.deepcopy(prefix), ids)
    logp_ref = F.log_softmax(ref, -1)
    rows = {}
    for name, (kb, vb, km, vm) in CONFIGS.items():
        probe = _Probe(prefill_2048.cache)
        register_attention(probe.name, probe)
        cache = TurboQuantCache(model.config, key_bits=kb, value_bits=vb, key_mode=km, value_mode=vm)
        for idx, layer in enumerate(prefix.layers):
            cache.update(layer.keys, layer.values, idx)
        previous = model.config._attn_implementation
        model.set_attn_implementation(probe.name)
        try:
            got = _tail_logits(model, cache, ids)
        finally:
            model.set_attn_implementation(previous)
        kl = F.kl_div(F.log_softmax(got, -1), logp_ref, log_target=True, reduction="none").sum(-1)
        top1 = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
        rows[name] = {"attn_out_rel_err": round(sum(probe.errors) / len(probe.errors), 5),
                      "next_token_kl": round(float(kl.mean()), 5), "top1_agreement": round(top1, 4),
                      "bits_per_coord_kv": (kb + vb) / 2}
    claim.measured(tail_metrics=rows, qjl_helps_attention_3_5=rows["prod 3.5"]["attn_out_rel_err"] < rows["mse 3.5"]["attn_out_rel_err"],
                   qjl_helps_attention_2_5=rows["prod 2.5"]["attn_out_rel_err"] < rows["mse 2.5"]["attn_out_rel_err"])
    claim.setting(tail_positions=TAIL, prefix_tokens=n0)
    claim.threshold(max_next_token_kl=C08_MAX_KL, min_top1_agreement=C08_MIN_TOP1)
    for name, r in rows.items():
        assert math.isfinite(r["next_token_kl"]) and math.isfinite(r["attn_out_rel_err"]), f"{name}: {r}"
    high = {n: rows[n]["next_token_kl"] for n, cap in C08_MAX_KL.items() if not rows[n]["next_token_kl"] <= cap}
    assert not high, f"next-token KL above {C08_MAX_KL}: {high}"
    low = {n: rows[n]["top1_agreement"] for n, floor in C08_MIN_TOP1.items() if not rows[n]["top1_agreement"] >= floor}
    assert not low, f"top-1 agreement below {C08_MIN_TOP1}: {low}"
    assert rows["mse 3.5"]["attn_out_rel_err"] < rows["mse 2.5"]["attn_out_rel_err"], f"more bits must give smaller error: {rows}"
    assert rows["mse 3.5"]["next_token_kl"] < rows["mse 2.5"]["next_token_kl"], f"KL not monotone in bits: {rows}"


@pytest.mark.claim("C08", "real KV proxy")
def test_c08_every_recipe_with_the_verdict_on_the_paper_recipe(lm, prefill_2048, tq_options, claim):
    """Every recipe of ``turboquant.eval.recipes`` reported (measured bits, distortion, IP error,
    bytes vs the layout's ideal); the C08 thresholds applied to the paper's own recipe (§4.3:
    outlier channels at more bits), ``paper-3.5`` and ``paper-2.5``."""
    from turboquant.eval.recipe_metrics import (
        RECIPES,
        fill_exact_prefill,
        kv_errors,
        make_cache,
        measured_bits,
        unit_queries,
        user_recipe,
    )

    recipes = [*RECIPES, *user_recipe(tq_options)]  # + the --kv_layout/--key_layout/--value_layout row

    tokens = prefill_2048.input_ids.shape[1]
    d = lm.model.config.get_text_config(decoder=True).head_dim
    queries = unit_queries(64, d, 0)
    rows = {}
    for r in recipes:
        cache = fill_exact_prefill(make_cache(lm.model.config, r), prefill_2048)
        err, bits = kv_errors(prefill_2048, cache, queries), measured_bits(cache)
        pinned, ideal = cache_nbytes(cache).kv_pinned(), ideal_kv_nbytes(cache, tokens)
        rows[r.name] = {"key_bits_measured": round(bits["key"], 4), "value_bits_measured": round(bits["value"], 4),
                        "distortion": round((err["distortion_k"] + err["distortion_v"]) / 2, 5),
                        "distortion_k": round(err["distortion_k"], 5), "distortion_v": round(err["distortion_v"], 5),
                        "ip_sqerr": err["attn_ip_sqerr"], "measured_over_ideal": round(pinned / ideal - 1, 4)}
    claim.setting(model=lm.name, seq=tokens, head_dim=d, queries=64, seed=0, recipes=[r.name for r in recipes],
                  verdict_on=["paper-3.5", "paper-2.5"])
    claim.measured(recipes=rows)
    p35, p25 = rows["paper-3.5"], rows["paper-2.5"]
    ratio = p25["distortion"] / p35["distortion"]
    claim.measured(paper_error_ratio_2_5_over_3_5=round(ratio, 3))
    claim.threshold(paper_max_distortion={"3.5": C08_MAX_DISTORTION[3.5], "2.5": C08_MAX_DISTORTION[2.5]},
                    paper_error_ratio=[2, 6], max_measured_over_ideal=0.05)
    for bits, row in ((3.5, p35), (2.5, p25)):
        if row["distortion"] > rows[f"halves-{bits}"]["distortion"]:
            claim.warn(f"paper-{bits} distortion {row['distortion']} is above halves-{bits}'s "
                       f"{rows[f'halves-{bits}']['distortion']} on this model")
    for bits, row in ((3.5, p35), (2.5, p25)):  # two-sided, as the halves check (tests/claim_checks.py)
        check_c08_distortion(row["distortion"], bits, d)
        assert abs(row["measured_over_ideal"]) <= C08_MAX_OVER_IDEAL, \
            f"paper-{bits}: {row['measured_over_ideal']:+.2%} off the ideal (tolerance ±{C08_MAX_OVER_IDEAL:.0%})"
    assert 2 <= ratio <= 6, f"paper 2.5/3.5 distortion ratio {ratio:.3f} outside [2, 6]"


# -- C11 --------------------------------------------------------------------------------------------
@pytest.mark.claim("C11", "decode throughput")
def test_c11_cpu_decode_throughput(lm, prefill_2048, tq_options, claim):
    if torch.cuda.is_available():
        pytest.skip("C11 CPU variant; the GPU variant lives in tests/kernels")
    model = lm.model
    new, warm, reps = int(tq_options.throughput_new_tokens), int(tq_options.throughput_warmup), int(tq_options.throughput_repeats)
    caches = {
        "dynamic": lambda: DynamicCache(config=model.config),
        "turboquant_3.5": lambda: TurboQuantCache(model.config, key_bits=3.5, value_bits=3.5),
        "turboquant_2.5": lambda: TurboQuantCache(model.config, key_bits=2.5, value_bits=2.5),
    }
    ctx = lambda: turboquant_attention(model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: one thread for every cache, measured alike
    try:
        res = decode_throughput(model, prefill_2048, caches, ctx, new_tokens=new, warmup=warm, repeats=reps)
        prof = {"dynamic": profile_decode(model, prefill_2048, caches["dynamic"], None, steps=4),
                "turboquant_3.5": profile_decode(model, prefill_2048, caches["turboquant_3.5"], ctx, steps=4)}
    finally:
        torch.set_num_threads(threads)
    claim.setting(model=lm.name, prompt_tokens=res.prompt_tokens, new_tokens=new, warmup=warm, repeats=reps,
                  torch_threads=1, interleaved_runs=True, cpu_attention_backend=cpu_backend())
    claim.measured(tokens_per_s={k: round(v, 3) for k, v in res.tokens_per_s.items()},
                   ratio_vs_dynamic={k: round(v, 3) for k, v in res.ratio_vs.items()}, runs_s=res.runs_s, profile=prof)
    claim.threshold(min_ratio_vs_dynamic=0.75)
    for k in ("turboquant_3.5", "turboquant_2.5"):
        assert res.ratio_vs[k] >= 0.75, f"{k}: {res.tokens_per_s[k]:.2f} tok/s = {res.ratio_vs[k]:.3f}x DynamicCache ({res.tokens_per_s['dynamic']:.2f} tok/s) < 0.75x"
