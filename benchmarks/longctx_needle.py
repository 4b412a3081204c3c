"""Needle-in-a-haystack grid (and RULER variants) outside pytest: JSON + heatmap under results/.

Examples::

    # CPU, CI-sized grid (what `pytest -m model` runs)
    python benchmarks/longctx_needle.py --lengths 1024,2048,4096 --depths 0.1,0.5,0.9 --trials 2
    # GPU, the embedded model's full 8k grid
    python benchmarks/longctx_needle.py --device cuda --lengths 1024,2048,4096,6144,8000 \
        --depths 0,0.25,0.5,0.75,1 --trials 4 --tag gpu
    # Qwen3.6-27B where its weights are on disk (hybrid model: one run per setting, no shared prefill)
    python benchmarks/longctx_needle.py --device cuda --model-id /path/to/Qwen3.6-27B \
        --torch-dtype bfloat16 --lengths 32768,65536,131072 --depths 0.1,0.5,0.9 --trials 2 --tag qwen36

Writes ``results/longctx_needle_<tag>.json`` (accuracies, per-cell accuracies, every answer) and
``results/longctx_needle_<tag>.png`` (length x depth heatmap, one panel per setting).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from turboquant.eval.needle import parse_float_list, parse_int_list
from turboquant.eval.plots import draw_needle_heatmap
from turboquant.eval.runner import needle_settings, run_task_grid
from turboquant.models import load_model
from turboquant.report import device_description

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="niah_single", help="registered task (niah_single, niah_multikey, niah_multivalue, vt)")
    p.add_argument("--lengths", default="1024,2048,4096")
    p.add_argument("--depths", default="0.1,0.5,0.9")
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--required-bits", default="3.5")
    p.add_argument("--report-bits", default="2.5", help="extra bit widths reported (comma list, may be empty)")
    p.add_argument("--model-id", default=None)
    p.add_argument("--torch-dtype", default="float32")
    p.add_argument("--attn-implementation", default="sdpa")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-shared-prefill", action="store_true", help="one full run per setting")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default=None, help="output name suffix (default: the device type)")
    p.add_argument("--out-dir", default=str(ROOT / "results"))
    args = p.parse_args(argv)

    lm = load_model(args.model_id, torch_dtype=args.torch_dtype, attn_implementation=args.attn_implementation,
                    device=args.device)
    settings = needle_settings(args.required_bits, [b for b in args.report_bits.split(",") if b.strip()])
    lengths = parse_int_list(args.lengths, [])
    depths = parse_float_list(args.depths, [])
    result = run_task_grid(lm.model, lm.tokenizer, args.task, lengths, depths, args.trials, settings,
                           seed=args.seed, share_prefill=not args.no_shared_prefill, log=lambda m: print(m, flush=True))
    tag = args.tag or args.device.split(":")[0]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "task": args.task,
        "model": lm.name,
        "device": device_description(),
        "dtype": str(lm.dtype),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "lengths": lengths,
        "depths": depths,
        "trials_per_cell": args.trials,
        "settings": settings,
        "shared_prefill": not args.no_shared_prefill,
        "accuracy": result["accuracy"],
        "cells": result["cells"],
        "seconds": round(result["seconds"], 1),
        "records": result["records"],
    }
    json_path = out_dir / f"longctx_{args.task}_{tag}.json"
    json_path.write_text(json.dumps(doc, indent=1))
    png = draw_needle_heatmap(result["cells"], out_dir / f"longctx_{args.task}_{tag}.png",
                              f"{args.task}: {lm.name} on {doc['device']}")
    print(json.dumps({"accuracy": result["accuracy"], "seconds": doc["seconds"], "json": str(json_path), "png": str(png)}))
    return doc


if __name__ == "__main__":
    main()
