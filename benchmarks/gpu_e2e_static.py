"""End to end with static caches: bf16 ``StaticCache`` vs ``StaticTurboQuantCache``, decode step in a
CUDA graph, on a random-init model of the exact Qwen3.6-27B text shape (issue 14).

Model construction is ``gpu_e2e_qwen36.build_model`` (bf16 weights, flash-linear-attention used
when installed). Per case ``BATCHxCONTEXT`` and cache:

1. a real prefill of ``--prompt-tokens`` random tokens (initialises the Gated DeltaNet states),
2. the full-attention layers extended to ``CONTEXT`` tokens with random bf16 K/V written straight
   into the caches (``StaticCache``: its buffers; ``StaticTurboQuantCache``: ``append``, the
   cache's own compression path, so the packed bytes are real) -- a real 128k prefill of a 27B
   model would not fit the time budget, and random history decodes at the same speed,
3. ``--warmup`` eager decode steps, capture of one step (``turboquant.decode_graph``), then
   ``--steps`` greedy replays timed between CUDA events (mode ``graph``); ``torch.compile(mode=
   "reduce-overhead")`` rows for ``--compile-cases`` (mode ``compile``; a row with the error where
   it does not run). ``--device cpu`` runs the eager steps only (mode ``eager``: a smoke test).

Caches: ``bf16`` (transformers' StaticCache), ``tq3.5``, ``tq2.5`` (halves layouts),
``tqpaper-3.5`` (the paper's outlier recipe). The largest batch at 128k is searched over a short
list per cache (``--max-batch-list``): ascending until the first out-of-memory.

Rows: ``batch, context, cache, mode, ms_per_step, tok_s, peak_gib, kv_gib`` (+ ``attend``: which
attention path the static layers took). Usage::

    python benchmarks/gpu_e2e_static.py --out results/gpu_e2e_static.json            # <= 8 min, H200
    python benchmarks/gpu_e2e_static.py --quick --out /tmp/q.json                     # 1x32k, 1x128k
    python benchmarks/gpu_e2e_static.py --device cpu --tiny --quick --out /tmp/s.json # CPU smoke
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's turboquant
sys.path.insert(1, str(Path(__file__).resolve().parent))
from gpu_e2e_qwen36 import _compat_layer_kwargs, build_model

CACHES = ("bf16", "tq3.5", "tq2.5", "tqpaper-3.5")
DEFAULT_CASES = ("1x32768", "1x131072", "8x32768", "8x131072")
# DynamicCache bf16 decodes 10 x 128k on the H200, 3.5-bit codes 24 (44 died in a growth copy the
# static buffers do not make): results/gpu_e2e_qwen36_capacity.md
MAX_BATCH_LISTS = {"bf16": (6, 8, 9, 10, 11), "tq": (24, 32, 36, 40, 44, 48)}


def parse_case(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 2:
        raise ValueError(f"case {text!r}: expected BATCHxCONTEXT like 8x131072 (batch >= 1, context >= 2)")
    return int(m.group(1)), int(m.group(2))


def make_cache(name: str, cfg, max_len: int, batch: int, residual: int):
    from transformers import StaticCache

    from turboquant.static_cache import StaticTurboQuantCache

    if name == "bf16":
        return StaticCache(config=cfg, max_cache_len=max_len)
    recipe = name[2:]
    kw = {"key_layout": recipe, "value_layout": recipe} if recipe.startswith("paper") else \
        {"key_bits": float(recipe), "value_bits": float(recipe)}
    return StaticTurboQuantCache(cfg, max_len, max_batch_size=batch, residual_length=residual,
                                 unpadded_decode=True, **kw)


@torch.no_grad()
def fill(cache, cfg, batch: int, context: int, prompt: int, gen: torch.Generator, chunk: int = 8192) -> None:
    """Extend every full-attention layer from ``prompt`` to ``context`` tokens of random K/V."""
    from turboquant.static_cache import StaticTurboQuantLayer

    for idx, layer in enumerate(cache.layers):
        if cfg.layer_types[idx] != "full_attention":
            continue
        if isinstance(layer, StaticTurboQuantLayer):
            for s in range(prompt, context, chunk):
                t = min(chunk, context - s)
                shape = (batch, layer.num_heads, t, layer.head_dim)
                layer.append(torch.randn(shape, generator=gen, device=layer.device, dtype=layer.dtype),
                             torch.randn(shape, generator=gen, device=layer.device, dtype=layer.dtype))
        else:  # transformers' StaticLayer
            layer.keys[:, :, prompt:context].normal_(0.0, 1.0, generator=gen)
            layer.values[:, :, prompt:context].normal_(0.0, 1.0, generator=gen)
            if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor):
                layer.cumulative_length.fill_(context)


def kv_bytes(cache) -> int:
    from turboquant.cache import cache_nbytes

    report = cache.nbytes() if hasattr(cache, "nbytes") else cache_nbytes(cache)
    return int(report.kv_pinned())


def attend_path(cache, query_like: torch.Tensor) -> str | None:
    from turboquant.static_cache import StaticTurboQuantLayer

    for layer in cache.layers:
        if isinstance(layer, StaticTurboQuantLayer):
            why = layer.kernel_unsupported(query_like, None)
            return "kernel" if why is None else f"torch ({why})"
    return None


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def run_row(model, cfg, dev, cache_name: str, batch: int, context: int, mode: str, args) -> dict:
    from turboquant.cache import turboquant_attention
    from turboquant.decode_graph import GraphedDecodeStep, decode_inputs

    row = {"batch": batch, "context": context, "cache": cache_name, "mode": mode}
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    gen = torch.Generator(device=dev).manual_seed(batch * 7919 + context)
    max_len = context + args.warmup + args.steps + 16
    cache = make_cache(cache_name, cfg, max_len, batch, args.residual)
    ids = torch.randint(0, cfg.vocab_size, (batch, args.prompt_tokens), device=dev, generator=gen)
    ctx = turboquant_attention(model) if cache_name != "bf16" else _Null()
    with ctx:
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        fill(cache, cfg, batch, context, args.prompt_tokens, gen)
        pos = torch.full((batch, 1), context, dtype=torch.long, device=dev)
        nxt = logits.argmax(-1, keepdim=True)
        stepper = model if mode != "compile" else torch.compile(model, mode="reduce-overhead")
        graph = GraphedDecodeStep(model, cache, batch, dev) if mode == "graph" else None

        def eager_step():
            nonlocal nxt
            if graph is not None:
                out = graph.warmup(nxt, pos)
            else:
                out = stepper(**decode_inputs(model, nxt, pos, cache)).logits[:, -1]
            nxt = out.argmax(-1, keepdim=True)
            pos.add_(1)

        for i in range(args.warmup):
            if i == args.warmup - 1:
                _sync(dev)
                tw = time.perf_counter()
            eager_step()
        _sync(dev)
        # slow steps (the torch attention path at long contexts): fewer timed steps, within the row budget
        steps = max(2, min(args.steps, int(args.row_budget_s / max(time.perf_counter() - tw, 1e-6))))
        if graph is not None:
            graph.capture()
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(steps):
            if graph is not None:
                nxt = graph.replay(nxt, pos).argmax(-1, keepdim=True)
                pos.add_(1)
            else:
                eager_step()
        _sync(dev)
        dt = (time.perf_counter() - t0) / steps
    row.update(steps=steps, ms_per_step=dt * 1e3, tok_s=batch / dt, kv_gib=kv_bytes(cache) / 2**30,
               peak_gib=torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
               attend=attend_path(cache, torch.zeros(batch, cfg.num_attention_heads, 1, cfg.head_dim, device=dev)))
    if hasattr(cache, "check"):
        cache.check()
    return row


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _safe_row(model, cfg, dev, cache_name, batch, context, mode, args) -> dict:
    try:
        return run_row(model, cfg, dev, cache_name, batch, context, mode, args)
    except torch.cuda.OutOfMemoryError as err:
        return {"batch": batch, "context": context, "cache": cache_name, "mode": mode,
                "error": f"CUDA out of memory: {str(err)[:200]}", "oom": True}
    except Exception as err:  # noqa: BLE001 -- recorded, the run goes on (e.g. compile refusing)
        return {"batch": batch, "context": context, "cache": cache_name, "mode": mode,
                "error": f"{type(err).__name__}: {str(err)[:400]}"}
    finally:
        torch._dynamo.reset()
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def add_ratios(rows: list[dict]) -> None:
    """``speedup_vs_bf16``: tok/s over the bf16 row of the same batch, context and mode."""
    base = {(r["batch"], r["context"], r["mode"]): r for r in rows if r["cache"] == "bf16" and "tok_s" in r}
    bf16_max = {r["context"]: r["max_batch"] for r in rows if "max_batch" in r and r["cache"] == "bf16"}
    for r in rows:
        if "max_batch" in r and r["max_batch"] and bf16_max.get(r["context"]):
            r["max_batch_vs_bf16"] = r["max_batch"] / bf16_max[r["context"]]
        b = base.get((r["batch"], r["context"], r["mode"]))
        if b is not None and "tok_s" in r:
            r["speedup_vs_bf16"] = r["tok_s"] / b["tok_s"]
        elif "tok_s" in r and r["cache"] != "bf16":
            # bf16 cannot run this shape (out of memory): against bf16's best tok/s at this context
            best = max((x["tok_s"] for x in rows if x["cache"] == "bf16" and x["context"] == r["context"]
                        and x["mode"] == r["mode"] and "tok_s" in x), default=None)
            if best:
                r["tok_s_vs_bf16_best_batch"] = r["tok_s"] / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES), help="BATCHxCONTEXT list")
    ap.add_argument("--caches", default=",".join(CACHES), help=f"subset of {CACHES}")
    ap.add_argument("--max-batch-context", type=int, default=131072, help="context of the largest-batch search (0: skip)")
    ap.add_argument("--max-batch-list", default="", help="batches to try, ascending (default: per cache kind)")
    ap.add_argument("--max-batch-caches", default="bf16,tq3.5", help="caches of the largest-batch search")
    ap.add_argument("--max-batch-prompt-tokens", type=int, default=64,
                    help="prompt of the largest-batch rows: the prefill's (batch, q, max_cache_len) mask is a "
                         "transient of the prefill, not of the decode state being sized")
    ap.add_argument("--compile-cases", default="1x32768", help="cases with torch.compile rows ('none': skip)")
    ap.add_argument("--compile-caches", default="bf16,tq3.5")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--residual", type=int, default=128)
    ap.add_argument("--row-budget-s", type=float, default=6.0, help="timed steps of a row take about this long at most")
    ap.add_argument("--budget-s", type=float, default=330.0, help="rows after this many seconds are skipped (recorded)")
    ap.add_argument("--quick", action="store_true", help="1x32k and 1x128k, no max-batch search, no compile")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="a 4-layer toy of the same layout (with --device cpu: smoke)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    caches = [c.strip() for c in args.caches.split(",") if c.strip()]
    bad = [c for c in caches if c not in CACHES]
    if bad:
        raise SystemExit(f"--caches: {bad} not in {CACHES}")
    try:
        cases = [parse_case(c) for c in args.cases.split(",") if c.strip()]
        compile_cases = [] if args.compile_cases in ("", "none") else \
            [parse_case(c) for c in args.compile_cases.split(",")]
    except ValueError as err:
        raise SystemExit(str(err)) from None
    if args.quick:
        cases, compile_cases, args.max_batch_context = [(1, 32768), (1, 131072)], [], 0
        args.steps, args.warmup = min(args.steps, 8), min(args.warmup, 2)
    if args.tiny:  # the toy's contexts: small, same code paths
        cases = [(b, max(c // 128, 128)) for b, c in cases]
        compile_cases = [(b, max(c // 128, 128)) for b, c in compile_cases]
        args.prompt_tokens = min(args.prompt_tokens, 64)
        args.residual = min(args.residual, 16)
        args.max_batch_context //= 128
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu --tiny for a smoke run)")
    mode = "graph" if dev.type == "cuda" else "eager"

    import transformers

    t0 = time.perf_counter()
    model, cfg = build_model(args.tiny, dev)
    _compat_layer_kwargs(cfg)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "triton": triton_version,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "build_s": time.perf_counter() - t0, "tiny": args.tiny, "prompt_tokens": args.prompt_tokens,
        "warmup": args.warmup, "steps": args.steps, "residual": args.residual,
        "fill": f"real prefill of {args.prompt_tokens} random tokens, then random N(0,1) K/V written into "
                "the caches up to the context (StaticTurboQuantCache: through its compression path)",
        "note": "random-init weights of the exact Qwen3.6-27B text shape; ms_per_step: wall time of one "
                "greedy decode step (graph: CUDA-graph replay), mean over the row's `steps`",
        "budget_s": args.budget_s, "row_budget_s": args.row_budget_s,
    }
    print(json.dumps(meta), flush=True)
    result = {"meta": meta, "rows": []}

    deadline = time.perf_counter() + args.budget_s

    def measure(name: str, batch: int, context: int, row_mode: str, row_args=None) -> dict:
        if time.perf_counter() > deadline:
            return {"batch": batch, "context": context, "cache": name, "mode": row_mode,
                    "error": f"skipped: --budget-s {args.budget_s:.0f} s spent"}
        return _safe_row(model, cfg, dev, name, batch, context, row_mode, row_args or args)

    def record(row: dict) -> None:
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            add_ratios(result["rows"])
            Path(args.out).write_text(json.dumps(result, indent=1))

    for batch, context in cases:
        for name in caches:
            record(measure(name, batch, context, mode))
    if args.max_batch_context:
        for name in [c.strip() for c in args.max_batch_caches.split(",") if c.strip() in caches]:
            kind = "bf16" if name == "bf16" else "tq"
            tries = [int(b) for b in args.max_batch_list.split(",")] if args.max_batch_list else MAX_BATCH_LISTS[kind]
            best = None
            search_args = argparse.Namespace(**{**vars(args), "prompt_tokens": args.max_batch_prompt_tokens})
            for b in tries:
                row = measure(name, b, args.max_batch_context, mode, search_args)
                row.update(search="max_batch", prompt_tokens=search_args.prompt_tokens)
                record(row)
                if "error" in row:
                    break
                best = b
            record({"batch": best, "context": args.max_batch_context, "cache": name, "mode": mode,
                    "max_batch": best, "tried": list(tries), "prompt_tokens": search_args.prompt_tokens})
    if dev.type == "cuda":
        for batch, context in compile_cases:
            for name in [c.strip() for c in args.compile_caches.split(",") if c.strip() in caches]:
                record(measure(name, batch, context, "compile"))
    add_ratios(result["rows"])
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print("\n| batch x context | cache | mode | ms/step | tok/s | vs bf16 | peak GiB | KV GiB | attend |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        if "tok_s" not in r:
            print(f"| {r['batch']}x{r['context']} | {r['cache']} | {r['mode']} | {r.get('error', r.get('max_batch'))} |")
            continue
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        vs = f"{r['speedup_vs_bf16']:.2f}x" if "speedup_vs_bf16" in r else \
            f"bf16 OOM ({r['tok_s_vs_bf16_best_batch']:.2f}x its best tok/s)" if "tok_s_vs_bf16_best_batch" in r else "-"
        print(f"| {r['batch']}x{r['context']} | {r['cache']} | {r['mode']} | {r['ms_per_step']:.2f} | "
              f"{r['tok_s']:.1f} | {vs} | {peak} | {r['kv_gib']:.2f} | {r['attend']} |")


if __name__ == "__main__":
    main()
