"""Every recipe and baseline side by side on the same needles, QA examples and KL prompts.

Writes ``results/quality_<device>.json``: ``n_needles``, ``n_qa`` and per recipe / baseline
``bits_measured``, ``needle_acc``, ``needle_diff_ci95`` (+ verdict at margin 0.02, exact interval),
``qa_f1`` (0-100), ``qa_diff_ci95`` (+ verdict at 1 point, paired bootstrap), ``kl``, ``top1``; meta
has device, date and versions. Plots next to it: needle heatmap per recipe, task score vs measured
bits with 95% interval error bars, KL vs bits.

CPU (small grid, minutes)::

    python benchmarks/quality.py --n-needles 9 --n-qa 20 --kl-prompts 4

GPU tier: ``benchmarks/quality_gpu_grid.py`` (the same cases and rules, resumable, parallel
workers on one GPU; ``benchmarks/quality_merge.py`` joins files of this script split by
``--recipes`` too).
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from turboquant.eval import squad_qa
from turboquant.eval.longbench import build_prompt_ids
from turboquant.eval.quality import (
    measured_bits,
    needle_run,
    package_versions,
    paired_scores,
    qa_run,
    save_result,
    teacher_forced_kl,
)
from turboquant.eval.recipes import FULL, GRID_NAMES, RECIPES, available, get_recipe, verdict_recipe
from turboquant.verdicts import decide

NEEDLE_MARGIN = 0.02
QA_MARGIN_POINTS = 1.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model-id", default=None, help="default: the embedded SmolLM2-135M-Instruct GGUF")
    ap.add_argument("--recipes", default=",".join(GRID_NAMES),
                    help=f"comma list; valid: {list(RECIPES)}")
    ap.add_argument("--n-needles", type=int, default=9, help="needles per recipe (rounded up to whole trials)")
    ap.add_argument("--lengths", default="1024,2048,4096", help="needle context lengths")
    ap.add_argument("--depths", default="0.1,0.5,0.9", help="needle depths")
    ap.add_argument("--n-qa", type=int, default=20, help="QA examples (rounded up to whole cells)")
    ap.add_argument("--qa-lengths", default="1024,2048", help=f"target lengths of the QA set, of {squad_qa.LENGTHS}")
    ap.add_argument("--kl-prompts", type=int, default=4)
    ap.add_argument("--kl-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="default results/quality_<device>.json")
    return ap.parse_args(argv)


def _interval(v) -> list[float]:
    return [round(v.ci95[0], 4), round(v.ci95[1], 4)]


def main(argv: list[str] | None = None, lm=None) -> dict:
    """Run the grid; ``lm`` (``.model``, ``.tokenizer``) reuses a loaded model (tests)."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    for n in names:
        get_recipe(n)  # unknown names raise listing the valid ones
    if lm is None:
        from turboquant.models import load_model

        lm = load_model(args.model_id, device=args.device)
    model, tok = lm.model, lm.tokenizer
    runnable, skipped = available(names, model.config)
    primary, note = verdict_recipe("3.5", model.config)
    log = print
    t0 = time.perf_counter()

    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    trials = max(1, math.ceil(args.n_needles / (len(lengths) * len(depths))))
    needles = needle_run(model, tok, runnable, lengths, depths, trials, seed=args.seed, log=log)

    qa_lengths = [int(x) for x in args.qa_lengths.split(",")]
    per_cell = max(1, math.ceil(args.n_qa / (len(qa_lengths) * len(squad_qa.POSITIONS))))
    data = squad_qa.load(lengths=qa_lengths, per_cell=per_cell)
    qa_records, summary = qa_run(model, tok, data, runnable, log=log)

    examples = data.tasks[squad_qa.DATASET]
    step = max(1, len(examples) // max(1, args.kl_prompts))
    prompts = [build_prompt_ids(tok, ex, 7500)[0] for ex in examples[::step][: args.kl_prompts]]
    kl = teacher_forced_kl(model, prompts, runnable, n_tokens=args.kl_tokens, log=log)
    bits = measured_bits(model, prompts[0], [FULL, *runnable])

    rows = {}
    for n in [FULL, *runnable]:
        row = {"family": get_recipe(n).family, "nominal_bits": get_recipe(n).nominal_bits,
               "description": get_recipe(n).description, "bits_measured": bits[n],
               "needle_acc": needles["accuracy"][n], "qa_f1": summary[n]["official_avg"],
               "kl": kl[n]["kl"], "top1": kl[n]["top1"]}
        if n != FULL:
            nv = decide(*paired_scores(needles["records"], n), NEEDLE_MARGIN, kind="binary")
            comp, full = paired_scores(qa_records, n, "official")
            qv = decide([100 * c for c in comp], [100 * f for f in full], QA_MARGIN_POINTS, kind="continuous",
                        score_range=100.0)
            row.update(needle_diff=round(nv.diff, 4), needle_diff_ci95=_interval(nv), needle_verdict=nv.status,
                       needle_n_to_resolve=nv.n_to_resolve, qa_diff=round(qv.diff, 3), qa_diff_ci95=_interval(qv),
                       qa_verdict=qv.status, qa_n_to_resolve=qv.n_to_resolve)
        rows[n] = row
    out = Path(args.out or f"results/quality_{args.device}.json")
    result = {
        "meta": {"device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu {platform.processor()} "
                 f"({torch.get_num_threads()} threads)", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "torch": torch.__version__, "transformers": __import__("transformers").__version__,
                 "packages": package_versions(("optimum-quanto", "hqq", "scipy")),
                 "model": args.model_id or "SmolLM2-135M-Instruct (embedded GGUF)", "seed": args.seed,
                 "needle_grid": {"lengths": lengths, "depths": depths, "trials": trials},
                 "qa_set": {"source": "data/squad_qa (SQuAD v2 dev, CC BY-SA 4.0)", "lengths": qa_lengths,
                            "per_cell": per_cell},
                 "kl": {"prompts": len(prompts), "tokens": args.kl_tokens},
                 "rules": {"needle": f"binary exact interval, margin {NEEDLE_MARGIN}",
                           "qa": f"paired bootstrap, margin {QA_MARGIN_POINTS} point (0-100)"},
                 "verdict_recipe": primary, "verdict_note": note, "seconds": round(time.perf_counter() - t0, 1)},
        "n_needles": needles["n_trials"], "n_qa": len(data), "recipes": rows, "skipped": skipped,
        "needle_cells": needles["cells"],
    }
    save_result(result, out)
    print(f"wrote {out} ({result['meta']['seconds']} s)")
    return result


if __name__ == "__main__":
    main()
