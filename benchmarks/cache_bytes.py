"""Measured TurboQuantCache bytes vs the layout's ideal and vs DynamicCache bf16.

For head_dim 64 and 128 (tiny random-init Llama) and 256 (tiny random-init qwen3_5_text, Qwen3.6's
hybrid shape: 3 Gated DeltaNet + 1 full attention per 4 layers, 4 KV heads), at 2048 and 8192
tokens and 3.5 / 2.5 bits: the KV keys/values of every full-attention layer go through the real
``cache.update`` (the bytes do not depend on the values), then ``cache_nbytes`` counts the storage
really pinned (codes, norms, residual window, per-layer metadata). The ideal is packed codes + one
float16 norm per vector. Also reported: a length that leaves the residual window almost full
(``T + residual_length - 1``), the worst case for the window.

    python benchmarks/cache_bytes.py            # writes results/cache_bytes.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from turboquant.cache import TurboQuantCache, cache_nbytes, ideal_kv_nbytes
from turboquant.models import tiny_config
from turboquant.report import device_description

SHAPES = {
    64: ("llama", {"head_dim": 64, "num_layers": 4, "num_kv_heads": 3, "num_heads": 9, "hidden_size": 576}),
    128: ("llama", {"head_dim": 128, "num_layers": 4, "num_kv_heads": 8, "num_heads": 32, "hidden_size": 256}),
    256: ("qwen3_5_text", {"head_dim": 256, "num_layers": 8, "num_kv_heads": 4, "num_heads": 24, "hidden_size": 240}),
}
TOKENS = (2048, 8192)
BITS = (3.5, 2.5)
TARGETS_D256 = {3.5: 4.3, 2.5: 5.8}


def _fill(cache, cfg, tokens: int, dtype: torch.dtype) -> None:
    heads = cfg.num_key_value_heads
    g = torch.Generator().manual_seed(0)
    for idx, kind in enumerate(cfg.layer_types if getattr(cfg, "layer_types", None) else ["full_attention"] * cfg.num_hidden_layers):
        if kind != "full_attention":
            continue
        k = torch.randn(1, heads, tokens, cfg.head_dim, generator=g).to(dtype)
        v = torch.randn(1, heads, tokens, cfg.head_dim, generator=g).to(dtype)
        cache.update(k, v, idx)


def measure(head_dim: int, tokens: int, bits: float) -> dict:
    arch, shape = SHAPES[head_dim]
    cfg = tiny_config(arch, **shape)
    tq = TurboQuantCache(cfg, key_bits=bits, value_bits=bits)
    _fill(tq, cfg, tokens, torch.bfloat16)
    dyn = DynamicCache(config=cfg)
    _fill(dyn, cfg, tokens, torch.bfloat16)
    rep, drep = cache_nbytes(tq), cache_nbytes(dyn)
    ideal = ideal_kv_nbytes(tq, tokens)
    measured = rep.kv_pinned()
    dyn_bytes = drep.kv_pinned()
    # worst case for the window: residual_length - 1 tokens more, kept in bf16
    tq2 = TurboQuantCache(cfg, key_bits=bits, value_bits=bits)
    extra = tq2.settings.residual_length - 1
    _fill(tq2, cfg, tokens + extra, torch.bfloat16)
    ideal2 = ideal_kv_nbytes(tq2, tokens + extra)
    return {
        "arch": arch, "head_dim": head_dim, "tokens": tokens, "bits": bits,
        "kv_layers_compressed": len(tq.compressed_layers), "kv_heads": cfg.num_key_value_heads,
        "measured_bytes": measured, "breakdown_pinned": rep.pinned, "ideal_bytes": ideal,
        "measured_over_ideal": round(measured / ideal - 1, 5),
        "dynamic_bf16_bytes": dyn_bytes,
        "ratio_vs_bf16": round(dyn_bytes / measured, 3), "ideal_ratio_vs_bf16": round(dyn_bytes / ideal, 3),
        "nominal_ratio": round(16 / bits, 3),
        "window_full_case": {"tokens": tokens + extra, "measured_bytes": cache_nbytes(tq2).kv_pinned(),
                             "ideal_bytes": ideal2,
                             "measured_over_ideal": round(cache_nbytes(tq2).kv_pinned() / ideal2 - 1, 5)},
    }


def main(out: Path = Path("results/cache_bytes.json")) -> dict:
    rows = [measure(d, t, b) for d in SHAPES for t in TOKENS for b in BITS]
    within = all(r["measured_over_ideal"] <= 0.05 for r in rows)
    targets = {str(b): min(r["ratio_vs_bf16"] for r in rows if r["head_dim"] == 256 and r["bits"] == b) for b in BITS}
    result = {
        "device": device_description(), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "torch": torch.__version__, "rows": rows,
        "all_within_5pct_of_ideal": within,
        "head_dim_256_min_ratio_vs_bf16": targets,
        "head_dim_256_targets": {str(b): t for b, t in TARGETS_D256.items()},
        "head_dim_256_targets_met": all(targets[str(b)] >= t for b, t in TARGETS_D256.items()),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    res = main()
    for r in res["rows"]:
        print(f"d={r['head_dim']:>3} T={r['tokens']:>5} {r['bits']} bits: {r['measured_bytes']:>10} B "
              f"(+{100 * r['measured_over_ideal']:.2f}% vs ideal; window-full +{100 * r['window_full_case']['measured_over_ideal']:.2f}%) "
              f"{r['ratio_vs_bf16']:.3f}x vs bf16 (ideal {r['ideal_ratio_vs_bf16']:.3f}x)")
    print("within 5%:", res["all_within_5pct_of_ideal"], " head_dim 256 targets met:", res["head_dim_256_targets_met"])
