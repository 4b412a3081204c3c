"""Needle verdicts from the per-case lines ``benchmarks/quality.py`` prints, for a run cut short.

The runner prints one line a needle case (``[i/N] niah_single len=L depth=D trial=T ... full=1.00
<recipe>=0.00``). When a GPU run ends before its JSON is written (device time), these lines are
the per-case outcomes; this script pairs them (compressed vs full, same case) and applies the same
rule as ``benchmarks/quality.py`` (exact interval, margin 0.02). Only complete lines count; a recipe
whose run stopped early is reported with the n it reached.

Usage: ``python benchmarks/quality_from_runner_log.py --out results/quality_gpu.json LOG [LOG ...]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from turboquant.verdicts import decide

NEEDLE_MARGIN = 0.02
def parse(text: str) -> dict[str, dict[tuple, float]]:
    """``{setting: {(length, depth, trial): score}}`` from runner lines
    (:func:`turboquant.eval.grid.parse_runner_log`, keyed by tuples here)."""
    from turboquant.eval.grid import parse_runner_log

    out: dict[str, dict[tuple, float]] = {}
    for name, scores in parse_runner_log(text).items():
        for key, score in scores.items():
            length, depth, trial = key[1:].split("-")
            out.setdefault(name, {})[(int(length), float(depth[1:]), int(trial[1:]))] = score
    return out


def summarize(scores: dict[str, dict[tuple, float]]) -> dict:
    """Per recipe: n, accuracies, paired difference, 95% interval and verdict vs full precision."""
    full = scores.get("full", {})
    rows = {}
    for name, cases in scores.items():
        if name == "full":
            continue
        keys = sorted(set(cases) & set(full))
        v = decide([cases[k] for k in keys], [full[k] for k in keys], NEEDLE_MARGIN, kind="binary")
        rows[name] = {"n_needles": len(keys), "needle_acc": round(sum(cases[k] for k in keys) / len(keys), 4),
                      "full_needle_acc": round(sum(full[k] for k in keys) / len(keys), 4),
                      "needle_diff": round(v.diff, 4), "needle_diff_ci95": [round(c, 4) for c in v.ci95],
                      "needle_verdict": v.status, "needle_n_to_resolve": v.n_to_resolve}
    return rows


def cells(scores: dict[str, dict[tuple, float]]) -> dict[str, dict[str, dict[str, float]]]:
    """``{setting: {length: {depth: accuracy}}}`` over the cases each setting reached (heatmap)."""
    out: dict = {}
    for name, cases in scores.items():
        acc: dict = {}
        for (length, depth, _), score in cases.items():
            acc.setdefault(str(length), {}).setdefault(str(depth), []).append(score)
        out[name] = {L: {dp: round(sum(v) / len(v), 4) for dp, v in ds.items()} for L, ds in acc.items()}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--meta", default="{}", help="JSON object merged into meta (device, date, grid)")
    ap.add_argument("logs", nargs="+")
    args = ap.parse_args(argv)
    merged: dict[str, dict[tuple, float]] = {}
    for path in args.logs:
        for name, cases in parse(Path(path).read_text()).items():
            if name == "full" and "full" in merged:
                common = set(cases) & set(merged["full"])
                if any(cases[k] != merged["full"][k] for k in common):
                    raise ValueError(f"{path}: full-precision outcomes differ from another log's on the same cases")
            merged.setdefault(name, {}).update(cases)
    result = {"meta": {"made": time.strftime("%Y-%m-%d %H:%M:%S"), "source": [str(p) for p in args.logs],
                       "rule": f"binary exact interval, margin {NEEDLE_MARGIN}", **json.loads(args.meta)},
              "n_needles_full": len(merged.get("full", {})), "recipes": summarize(merged)}
    result["needle_cells"] = cells(merged)
    Path(args.out).write_text(json.dumps(result, indent=1))
    from turboquant.eval.plots import draw_needle_heatmap

    draw_needle_heatmap(result["needle_cells"], Path(args.out).with_suffix("").with_name(
        Path(args.out).stem + "_needle_heatmap.png"), "Needle in a haystack per recipe (from the runner's lines)")
    return result


if __name__ == "__main__":
    main()
