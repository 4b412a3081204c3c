"""KV recipes on CPU: measured bits, KV proxies and next-token agreement (``turboquant.eval.recipes``).

Models: the embedded SmolLM2-135M-Instruct (head_dim 64, 30 layers, 3 KV heads; real weights,
real prose prompts) and a random-init model of the ``qwen3_5_text`` shape (head_dim 256, hybrid:
3 Gated DeltaNet + 1 full attention per 4 layers; random token prompts). Per model and prompt:
an exact prefill of ``T - TAIL`` tokens, the ``TAIL`` remaining tokens teacher-forced one at a
time (full precision vs each recipe under the ``"turboquant"`` attention); rows are means over
the prompts. ``T = 2048``, ``TAIL = 32``, 4 prompts.

    python benchmarks/recipes_cpu.py                   # writes results/recipes_cpu.json
    python benchmarks/recipes_cpu.py --prompts 1 --tokens 512 --out /tmp/r.json   # quick look
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch
import transformers

from turboquant.eval.prose import prose_token_ids
from turboquant.eval.recipe_metrics import RECIPES, evaluate, reference_tail, unit_queries
from turboquant.eval.throughput import run_prefill
from turboquant.models import EMBEDDED_NAME, load_model, tiny_model
from turboquant.report import device_description

SEED = 0
QUERIES = 64
QWEN_SHAPE = {
    "head_dim": 256, "num_layers": 8, "num_kv_heads": 4, "num_heads": 16, "hidden_size": 256, "vocab_size": 4096
}


def _prose_prompts(tokenizer, n: int, tokens: int) -> list[torch.Tensor]:
    """``n`` consecutive ``tokens``-token slices of the C08 prose (standard-library documentation)."""
    ids = torch.tensor([prose_token_ids(lambda text: tokenizer(text).input_ids, n * tokens)])
    return [ids[:, i * tokens : (i + 1) * tokens] for i in range(n)]


def _random_prompts(vocab: int, n: int, tokens: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(SEED)
    return [torch.randint(0, vocab, (1, tokens), generator=g) for _ in range(n)]


def _summary(name: str, d: int, prompts: list[torch.Tensor], tail: int, per: dict[str, list[dict]]) -> dict:
    rows = []
    for r in RECIPES:
        vals = per[r.name]
        mean = {k: sum(v[k] for v in vals) / len(vals) for k in vals[0]}
        rows.append({
            "recipe": r.name, "key_layout": r.key_layout, "value_layout": r.value_layout, "note": r.description,
            **{k: round(v, 6) for k, v in mean.items()},
            "kl_per_prompt": [round(v["kl"], 6) for v in vals],
            "top1_per_prompt": [round(v["top1_agreement"], 4) for v in vals],
        })
    done = len(per[RECIPES[0].name])
    return {"model": name, "head_dim": d, "prompt_tokens": int(prompts[0].shape[1]), "tail_positions": tail,
            "prompts": done, "prompts_planned": len(prompts), "rows": rows}


def run_model(name: str, model, prompts: list[torch.Tensor], tail: int, save) -> dict:
    """Every recipe on every prompt; ``save(summary)`` after each prompt (a partial run keeps its rows)."""
    d = model.config.get_text_config(decoder=True).head_dim
    queries = unit_queries(QUERIES, d, SEED)
    per: dict[str, list[dict]] = {r.name: [] for r in RECIPES}
    for p, ids in enumerate(prompts):
        start = time.perf_counter()
        prefill = run_prefill(model, ids[:, :-tail])
        ref = reference_tail(model, prefill, ids)
        rows = {r.name: evaluate(model, prefill, ids, r, ref, queries, seed=SEED) for r in RECIPES}
        for k, v in rows.items():
            per[k].append(v)
        save(_summary(name, d, prompts, tail, per))
        print(f"{name} prompt {p}: {time.perf_counter() - start:.0f} s", flush=True)
    return _summary(name, d, prompts, tail, per)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--tail", type=int, default=32)
    ap.add_argument("--models", default="smollm2,qwen3_5_text")
    ap.add_argument(
        "--out", default=str(Path(__file__).resolve().parents[1] / "results" / "recipes_cpu.json")
    )
    ap.add_argument("--markdown", action="store_true", help="print the README table of --out and exit")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.out).read_text())))
        return
    torch.manual_seed(SEED)
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.exists() else {"models": []}

    def save(summary: dict) -> None:  # replace this model's section, keep the others
        summary = {**summary, "meta": _meta()}  # per model: the machine it ran on
        doc["models"] = [m for m in doc["models"] if m["model"] != summary["model"]] + [summary]
        doc["meta"] = _meta()
        out.write_text(json.dumps(doc, indent=1) + "\n")

    if "smollm2" in args.models:
        lm = load_model()
        run_model(EMBEDDED_NAME, lm.model, _prose_prompts(lm.tokenizer, args.prompts, args.tokens), args.tail, save)
    if "qwen3_5_text" in args.models:
        m = tiny_model("qwen3_5_text", seed=SEED, **QWEN_SHAPE)
        prompts = _random_prompts(QWEN_SHAPE["vocab_size"], args.prompts, args.tokens)
        run_model("random-init qwen3_5_text " + json.dumps(QWEN_SHAPE), m, prompts, args.tail, save)
    print(f"wrote {out}")


def markdown(doc: dict) -> str:
    """One table a model: the rows of ``doc`` (a results/recipes_cpu.json)."""
    out = []
    for m in doc["models"]:
        out.append(f"**{m['model'].split(' {')[0]}** (head_dim {m['head_dim']}, {m['prompt_tokens']}-token prompts, "
                   f"{m['tail_positions']} teacher-forced positions, {m['prompts']} prompts)\n")
        out.append("| recipe | K bits | V bits | distortion K | distortion V | attn IP sqerr | KL | top-1 |")
        out.append("|---|---|---|---|---|---|---|---|")
        for r in m["rows"]:
            out.append(f"| {r['recipe']} | {r['key_bits_measured']:.3f} | {r['value_bits_measured']:.3f} | "
                       f"{r['distortion_k']:.4f} | {r['distortion_v']:.4f} | {r['attn_ip_sqerr']:.2e} | "
                       f"{r['kl']:.4f} | {r['top1_agreement']:.3f} |")
        out.append("")
    return "\n".join(out)


def _meta() -> dict:
    return {
        "device": device_description(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "seed": SEED,
        "queries": QUERIES,
        "cache": {"residual_length": 16, "rotation": "hadamard", "law": "beta"},
        "bits_measured": "8 * (codes + float16 norms + outlier indices held) / (tokens * kv_heads * head_dim), "
        "compressed layers only; residual window excluded (the prompt is a multiple of 16)",
        "kl": "KL(full || compressed) of the next-token distribution, mean over tail positions, then prompts",
    }


if __name__ == "__main__":
    main()
