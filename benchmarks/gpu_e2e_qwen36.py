"""End to end: a random-init model of the exact Qwen3.6-27B text shape, DynamicCache (bf16) vs
TurboQuantCache (3.5 / 2.5 bits, the "turboquant" attention -> Triton kernel on CUDA).

Random weights decode at the same speed as real ones (same shapes, same kernels; the token ids
differ), so tokens/s, memory and capacity carry over; quality does not (see C09/C10 for that).
The model is built in seconds: constructed on the meta device with bf16 as default dtype,
``to_empty(device="cuda")``, ``normal_(0, 0.02)`` on every parameter, rotary buffers rebuilt.

Per cache: one real prefill of ``--context`` tokens (the 48 Gated DeltaNet layers need it), then
``--warmup`` unmeasured decode tokens and ``--repeats`` x ``--new-tokens`` measured ones
(greedy, one forward a token); reports median decode tokens/s, the prefill time (compression on
vs off), peak GPU memory (``torch.cuda.max_memory_allocated``) during prefill+decode, the KV
bytes held (16 full-attention layers), and the capacity in tokens that the free memory holds.

Usage: ``python benchmarks/gpu_e2e_qwen36.py --context 32768 --out results/gpu_e2e_qwen36.json``
(``--tiny`` runs a 4-layer toy of the same layout on CPU to check the script).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import statistics
import time
from pathlib import Path

import torch

CONFIG = Path(__file__).resolve().parents[1] / "data" / "configs" / "qwen3.6-27b.json"


def build_model(tiny: bool, device: torch.device):
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = {k: v for k, v in json.loads(CONFIG.read_text()).items() if not k.startswith("_") and k != "architectures"}
    if tiny:
        raw.update(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
                   num_key_value_heads=2, head_dim=64, linear_num_key_heads=2, linear_num_value_heads=4,
                   linear_key_head_dim=32, linear_value_head_dim=32, vocab_size=1024)
    model_type = raw.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **raw)
    cfg._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(prev)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
        for m in model.modules():  # rotary buffers were left uninitialised by to_empty
            if hasattr(m, "inv_freq") and hasattr(m, "rope_init_fn"):
                inv, scale = m.rope_init_fn(m.config, device)
                m.inv_freq = inv.to(device)
                if hasattr(m, "original_inv_freq"):
                    m.original_inv_freq = inv.to(device)
                m.attention_scaling = scale
    model.eval()
    return model, cfg


def _compat_layer_kwargs(cfg) -> None:
    """transformers 5.17 returns the per-layer cache kwargs of ``get_layer_types_and_kwargs`` in
    another form than 5.24 (which ``turboquant.cache`` was written against): normalise it to one
    dict a layer for this script (reported to the cache owner)."""
    import inspect

    import turboquant.cache as tc
    from transformers import cache_utils

    orig = cache_utils.get_layer_types_and_kwargs
    t, kw = orig(cfg)
    print("get_layer_types_and_kwargs ->", type(kw).__name__, str(kw)[:200], flush=True)
    print("LinearAttentionLayer", inspect.signature(cache_utils.LinearAttentionLayer.__init__), flush=True)
    if isinstance(kw, (list, tuple)) and all(isinstance(k, dict) for k in kw):
        return

    def shim(config):
        types, k = orig(config)
        n = len(types)
        if isinstance(k, dict) and all(isinstance(v, (list, tuple)) and len(v) == n for v in k.values()):
            per = [{name: v[i] for name, v in k.items() if v[i] is not None} for i in range(n)]
        elif isinstance(k, dict):
            per = [dict(k) if x == "linear_attention" else {} for x in types]
        else:
            per = [{} for _ in types]
        params = inspect.signature(cache_utils.LinearAttentionLayer.__init__).parameters
        per = [{a: b for a, b in d.items() if a in params} if x == "linear_attention" else d for d, x in zip(per, types)]
        return types, per

    tc.get_layer_types_and_kwargs = shim


def kv_bytes(cache) -> int:
    """Bytes of the full-attention K/V held by ``cache`` (codes + norms + residual, or bf16 K/V)."""
    from turboquant.cache import cache_nbytes

    try:
        return int(cache_nbytes(cache).kv_pinned())
    except Exception:  # noqa: BLE001 - fall back to counting K/V tensors
        pass
    total = 0
    for layer in cache.layers:
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if isinstance(k, torch.Tensor) and k.dim() == 4:
            total += k.numel() * k.element_size() + v.numel() * v.element_size()
    return total


@torch.no_grad()
def run_one(model, cfg, name: str, make_cache, ctx, ids: torch.Tensor, args) -> dict:
    import contextlib

    from turboquant.eval.throughput import decode

    dev = ids.device
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    cache = make_cache()
    with (ctx() if ctx else contextlib.nullcontext()):
        t0 = time.perf_counter()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        prefill_s = time.perf_counter() - t0
        first = out.logits[:, -1].argmax(-1)
        del out
        run = decode(model, cache, first, args.warmup)
        times = []
        for _ in range(args.repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            r = decode(model, cache, first, args.new_tokens)
            times.append(r.seconds)
    res = {
        "cache": name,
        "prefill_s": prefill_s,
        "decode_tokens_per_s": args.new_tokens / statistics.median(times),
        "decode_runs_s": times,
        "kv_bytes": kv_bytes(cache),
        "final_length": int(cache.get_seq_length()),
    }
    if dev.type == "cuda":
        res["peak_allocated_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        res["peak_above_weights_GiB"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    del cache, run
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bits", default="3.5,2.5")
    ap.add_argument("--residual", type=int, default=128)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import transformers
    from transformers import DynamicCache

    import turboquant.kernels as tk
    from turboquant.cache import TurboQuantCache, turboquant_attention

    dev = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    t0 = time.perf_counter()
    model, cfg = build_model(args.tiny, dev)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    meta = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "params": n_params, "weights_GiB": weights / 2**30, "build_s": build_s,
        "context": args.context, "batch": args.batch, "new_tokens": args.new_tokens,
        "warmup_tokens": args.warmup, "repeats": args.repeats, "residual": args.residual,
        "note": "random-init weights of the exact Qwen3.6-27B text shape: same speed and memory as real weights",
    }
    print(json.dumps(meta), flush=True)

    _compat_layer_kwargs(cfg)
    calls = {"n": 0}
    orig = tk.compressed_attention_cuda

    def counting(*a, **k):
        out = orig(*a, **k)
        calls["n"] += out is not None
        return out

    tk.compressed_attention_cuda = counting
    gen = torch.Generator(device=dev).manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.context), device=dev, generator=gen)
    with torch.no_grad():  # warm up kernels / allocator so the first measured prefill is not penalised
        model(input_ids=ids[:, :512], past_key_values=DynamicCache(config=cfg), use_cache=True, logits_to_keep=1)
    rows = [run_one(model, cfg, "dynamic_bf16", lambda: DynamicCache(config=cfg), None, ids, args)]
    print(json.dumps(rows[-1]), flush=True)
    for bits in [float(b) for b in args.bits.split(",")]:
        calls["n"] = 0
        rows.append(run_one(model, cfg, f"turboquant_{bits}", lambda: TurboQuantCache(
            cfg, key_bits=bits, value_bits=bits, residual_length=args.residual), lambda: turboquant_attention(model), ids, args))
        rows[-1]["fused_kernel_calls"] = calls["n"]
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    free = None
    if dev.type == "cuda":
        total = torch.cuda.get_device_properties(dev).total_memory
        free = total - weights - 2 * 2**30  # 2 GiB reserved for activations/workspace at decode
    for r in rows:
        r["decode_ratio_vs_bf16"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        r["prefill_overhead_vs_bf16"] = r["prefill_s"] / base["prefill_s"] - 1
        r["kv_ratio_vs_bf16"] = base["kv_bytes"] / max(r["kv_bytes"], 1)
        per_token = r["kv_bytes"] / max(r["final_length"] * args.batch, 1)
        r["kv_bytes_per_token"] = per_token
        if free:
            r["capacity_tokens"] = int(free // per_token)
    print("\n| cache | prefill s | decode tok/s | ratio | KV MiB | KV ratio | B/token | peak GiB | capacity tokens |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['cache']} | {r['prefill_s']:.2f} | {r['decode_tokens_per_s']:.2f} | {r['decode_ratio_vs_bf16']:.3f}x | "
              f"{r['kv_bytes'] / 2**20:.1f} | {r['kv_ratio_vs_bf16']:.2f}x | {r['kv_bytes_per_token']:.0f} | "
              f"{r.get('peak_allocated_GiB', float('nan')):.2f} | {r.get('capacity_tokens', '-')} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
