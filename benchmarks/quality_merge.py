"""Quality results from parts: ``benchmarks/quality.py`` files, or a resumable grid's state.

* ``parts``: files that ran disjoint ``--recipes`` on the same grid. Every part repeats the
  full-precision run, so the parts must agree on the grid and on the full-precision scores
  (checked).
* ``--grid DIR``: the state directory of :mod:`turboquant.eval.grid` (``benchmarks/
  quality_gpu_grid.py``). Per recipe and baseline, cases are paired with full precision by key
  and judged by :func:`turboquant.verdicts.decide` (needles: exact binary interval, margin 0.02;
  QA F1 on 0-100: paired bootstrap, margin 1 point); KL / top-1 are means over the KL prompts with
  a 95% BCa bootstrap interval over the prompts (no verdict: no claim thresholds them), and
  measured bits the mean over them. A recipe that could not run is a ``skipped`` row with why.
* ``--readme-table``: print the Markdown table of a result (README's quality section).

Writes the JSON and redraws the plots beside it (needle heatmap, score and KL vs bits).

Usage::

    python benchmarks/quality_merge.py --out results/quality_gpu.json part1.json part2.json
    python benchmarks/quality_merge.py --grid runs/quality_grid --out results/quality_gpu.json
    python benchmarks/quality_merge.py --readme-table results/quality_gpu.json --readme README.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GRID_KEYS = ("needle_grid", "qa_set", "kl", "model", "device", "seed")
NEEDLE_MARGIN = 0.02
QA_MARGIN_POINTS = 1.0


def merge(parts: list[dict]) -> dict:
    """One result from parts of the same grid (full-precision rows must be identical)."""
    if not parts:
        raise ValueError("`parts`: give at least one quality JSON file")
    out = json.loads(json.dumps(parts[0]))
    for i, part in enumerate(parts[1:], 1):
        for key in GRID_KEYS:
            if part["meta"].get(key) != out["meta"].get(key):
                raise ValueError(f"part {i}: meta.{key} {part['meta'].get(key)!r} differs from part 0's "
                                 f"{out['meta'].get(key)!r}: not the same grid")
        for key in ("n_needles", "n_qa"):
            if part[key] != out[key]:
                raise ValueError(f"part {i}: {key} {part[key]} differs from part 0's {out[key]}")
        if part["recipes"]["full"] != out["recipes"]["full"]:
            raise ValueError(f"part {i}: the full-precision row differs from part 0's (non-deterministic run?)")
        for name, row in part["recipes"].items():
            if name != "full" and name in out["recipes"] and out["recipes"][name] != row:
                raise ValueError(f"part {i}: recipe {name!r} appears in two parts with different rows")
            out["recipes"].setdefault(name, row)
        out["skipped"].update(part.get("skipped", {}))
        for name, cells in part.get("needle_cells", {}).items():
            out.setdefault("needle_cells", {}).setdefault(name, cells)
        out["meta"]["seconds"] = max(out["meta"]["seconds"], part["meta"]["seconds"])
    out["meta"]["parts"] = len(parts)
    return out


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _mean_interval(values: list[float]) -> list[float] | None:
    """95% BCa bootstrap interval of the mean over the KL prompts (each prompt's KL / top-1 is
    already against full precision), or None below 2 prompts. A description, not a verdict: no
    claim has a KL threshold; it says which differences between recipes the prompts can tell."""
    import numpy as np

    from turboquant.verdicts import bootstrap_interval

    if len(values) < 2:
        return None
    lo, hi = bootstrap_interval(np.asarray(values, dtype=np.float64))
    return [round(float(lo), 5), round(float(hi), 5)]


def _paired(comp: dict[str, dict], full: dict[str, dict], score: str) -> tuple[list[str], list[float], list[float]]:
    keys = [k for k in comp if k in full]
    return keys, [float(comp[k][score]) for k in keys], [float(full[k][score]) for k in keys]


def _verdict_fields(prefix: str, v) -> dict:
    return {f"{prefix}_diff": round(v.diff, 4), f"{prefix}_diff_ci95": [round(v.ci95[0], 4), round(v.ci95[1], 4)],
            f"{prefix}_verdict": v.status, f"{prefix}_n_to_resolve": v.n_to_resolve}


def grid_row(name: str, needles: dict[str, dict], qa: dict[str, dict], kl: dict[str, dict],
             full_needles: dict[str, dict], full_qa: dict[str, dict]) -> dict:
    """One recipe's row from its records (``{key: record}`` per task) paired with full precision."""
    from turboquant.eval.recipes import get_recipe
    from turboquant.verdicts import decide

    recipe = get_recipe(name)
    row: dict = {"family": recipe.family, "nominal_bits": recipe.nominal_bits, "description": recipe.description}
    keys, comp, ref = _paired(needles, full_needles, "score")
    row.update(n_needles=len(keys), needle_acc=_mean(comp), full_needle_acc=_mean(ref))
    if keys:
        lengths: dict[str, int] = {}
        for k in keys:
            lengths[str(needles[k]["length"])] = lengths.get(str(needles[k]["length"]), 0) + 1
        row["lengths_covered"] = lengths
    if keys and name != "full":
        row.update(_verdict_fields("needle", decide(comp, ref, NEEDLE_MARGIN, kind="binary")))
    keys, comp, ref = _paired(qa, full_qa, "official")
    row.update(n_qa=len(keys), qa_f1=None if not keys else round(100 * _mean(comp), 3),
               full_qa_f1=None if not keys else round(100 * _mean(ref), 3))
    if keys and name != "full":
        v = decide([100 * c for c in comp], [100 * f for f in ref], QA_MARGIN_POINTS, kind="continuous",
                   score_range=100.0)
        row.update(_verdict_fields("qa", v))
    if name == "full":
        row.update(kl=0.0, top1=1.0, bits_measured=16.0, n_kl_prompts=len(kl))
    else:
        bits = [r["bits_measured"] for r in kl.values() if r.get("bits_measured") is not None]
        kls, top1s = [float(r["kl"]) for r in kl.values()], [float(r["top1"]) for r in kl.values()]
        row.update(kl=_mean(kls), kl_ci95=_mean_interval(kls), top1=_mean(top1s), top1_ci95=_mean_interval(top1s),
                   bits_measured=_mean(bits), n_kl_prompts=len(kl),
                   n_kl_positions=sum(r.get("positions", 0) for r in kl.values()))
    if name != "full":  # a task not run (yet) has no verdict, never PASS
        row.setdefault("needle_verdict", None)
        row.setdefault("qa_verdict", None)
    return row


def _cells(records: dict[str, dict]) -> dict[str, dict[str, float]]:
    acc: dict[str, dict[str, list[float]]] = {}
    for r in records.values():
        acc.setdefault(str(r["length"]), {}).setdefault(f"{float(r['depth']):g}", []).append(float(r["score"]))
    return {n: {d: round(sum(v) / len(v), 4) for d, v in ds.items()} for n, ds in acc.items()}


def merge_grid(state: str | Path, meta: dict | None = None) -> dict:
    """The quality result of a grid state directory (see the module docstring)."""
    from turboquant.eval import grid

    state = Path(state)
    spec = grid.load_spec(state)
    recs = {task: {s: grid.setting_records(state, task, s) for s in [*spec.settings(task), "full"]}
            for task in grid.TASKS}
    skipped: dict[str, str] = {}
    rows: dict[str, dict] = {}
    for name in ["full", *spec.names]:
        reason = grid.skip_reason(state, name)
        if reason:
            skipped[name] = reason
            continue
        rows[name] = grid_row(name, recs["needle"][name], recs["qa"][name], recs["kl"].get(name, {}),
                              recs["needle"]["full"], recs["qa"]["full"])
        failed = {t: grid.failure(state, t, name) for t in grid.TASKS}
        failed = {t: why.splitlines()[0] for t, why in failed.items() if why}
        if failed:
            rows[name]["failed"] = failed
            if all(rows[name][k] in (0, None) for k in ("n_needles", "n_qa", "n_kl_prompts")):
                skipped[name] = "; ".join(f"{t}: {why}" for t, why in failed.items())
                del rows[name]
    planned = {t: len(spec.keys(t)) for t in grid.TASKS}
    info = {"grid": spec.to_json(), "planned": planned,
            "progress": {t: {s: len(v) for s, v in by.items()} for t, by in recs.items()},
            "rules": {"needle": f"binary exact interval, margin {NEEDLE_MARGIN}",
                      "qa": f"paired bootstrap, margin {QA_MARGIN_POINTS} point (0-100)"},
            "needle_grid": {"lengths": list(spec.needle_lengths), "depths": list(spec.needle_depths),
                            "trials": spec.needle_trials},
            "qa_set": {"source": "data/squad_qa (SQuAD v2 dev, CC BY-SA 4.0)", "lengths": list(spec.qa_lengths),
                       "per_cell": spec.qa_per_cell},
            "kl": {"prompts": spec.kl_prompts, "tokens": spec.kl_tokens}, "seed": spec.seed}
    base = {"device": "unknown", "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    return {"meta": {**base, **info, **(meta or {})}, "n_needles": len(recs["needle"]["full"]),
            "n_qa": len(recs["qa"]["full"]), "recipes": rows, "skipped": skipped,
            "needle_cells": {n: _cells(recs["needle"][n]) for n in rows if recs["needle"][n]}}


def _fmt(v, spec: str = ".3f") -> str:
    return "—" if v is None else format(v, spec)


def _ci(row: dict, prefix: str, scale: float = 1.0, spec: str = "+.3f") -> str:
    ci = row.get(f"{prefix}_diff_ci95")
    if not ci:
        return "—"
    return f"{row[f'{prefix}_diff'] * scale:{spec}} [{ci[0] * scale:{spec}}, {ci[1] * scale:{spec}}]"


def _mean_ci(row: dict, key: str, spec: str) -> str:
    ci = row.get(f"{key}_ci95")
    return _fmt(row.get(key), spec) + ("" if not ci else f" [{ci[0]:{spec}}, {ci[1]:{spec}}]")


def readme_table(result: dict) -> str:
    """Markdown: one line a recipe / baseline (bits, needles, QA, KL, top-1, verdicts), then the
    skipped ones with their reason."""
    lines = [("| recipe | bits measured | needle acc (n) | needle diff [95% CI] | verdict | QA F1 (n) | "
              "QA diff [95% CI] | verdict | KL (nats) [95% CI] | top-1 [95% CI] |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["recipes"].items():
        n_needles = r.get("n_needles", result.get("n_needles"))
        n_qa = r.get("n_qa", result.get("n_qa"))
        lines.append(
            f"| {name} | {_fmt(r.get('bits_measured'), '.2f')} | {_fmt(r.get('needle_acc'))} ({n_needles}) | "
            f"{_ci(r, 'needle')} | {r.get('needle_verdict') or '—'} | {_fmt(r.get('qa_f1'), '.1f')} ({n_qa}) | "
            f"{_ci(r, 'qa', spec='+.2f')} | {r.get('qa_verdict') or '—'} | {_mean_ci(r, 'kl', '.4f')} | "
            f"{_mean_ci(r, 'top1', '.3f')} |")
    for name, why in result.get("skipped", {}).items():
        lines.append(f"| {name} | SKIP: {why} | | | | | | | | |")
    return "\n".join(lines)


def replace_marked(text: str, marker: str, table: str) -> str:
    """``text`` with the lines between ``<!-- {marker}:begin -->`` and ``<!-- {marker}:end -->``
    replaced by ``table`` (both markers must be present, once)."""
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ValueError(f"`--readme`: expected one {begin} ... {end} block")
    head, rest = text.split(begin)
    _, tail = rest.split(end)
    return f"{head}{begin}\n{table}\n{end}{tail}"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--grid", default=None, help="a turboquant.eval.grid state directory")
    ap.add_argument("--meta", default="{}", help="JSON object merged into meta (device, date, versions)")
    ap.add_argument("--readme-table", default=None, metavar="RESULT_JSON", help="print its Markdown table")
    ap.add_argument("--readme", default=None, help="with --readme-table: rewrite the marked block of this file")
    ap.add_argument("--marker", default="quality-gpu-table", help="the block's marker name")
    ap.add_argument("parts", nargs="*")
    args = ap.parse_args(argv)
    if args.readme_table:
        result = json.loads(Path(args.readme_table).read_text())
        table = readme_table(result)
        if args.readme:
            path = Path(args.readme)
            path.write_text(replace_marked(path.read_text(), args.marker, table))
        print(table)
        return result
    if not args.out or bool(args.grid) == bool(args.parts):
        ap.error("give --out and either --grid DIR or part files")
    if args.grid:
        result = merge_grid(args.grid, json.loads(args.meta))
    else:
        result = merge([json.loads(Path(p).read_text()) for p in args.parts])
    from turboquant.eval.quality import save_result

    save_result(result, Path(args.out))
    print(f"wrote {args.out}: {len(result['recipes'])} recipes, {len(result['skipped'])} skipped")
    return result


if __name__ == "__main__":
    main()
