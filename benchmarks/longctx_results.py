"""Copy the long-context records of a suite run (``--out-dir``) into ``results/`` with a heatmap and
a short markdown summary.

    python benchmarks/longctx_results.py runs/<timestamp> --tag cpu

Reads ``C09_needle_records_<grid>.json``, ``C09_ruler_records.json`` and
``C10_longbench_records.json`` where present; writes ``results/longctx_*_<tag>.{json,png,md}``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from turboquant.eval.plots import draw_needle_heatmap

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", help="suite --out-dir folders (several: merged)")
    p.add_argument("--tag", default="cpu")
    p.add_argument("--out-dir", default=str(ROOT / "results"))
    args = p.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Long-context results ({args.tag})", ""]
    for run in map(Path, args.run_dirs):
        lines += collect(run, out, args.tag)
    (out / f"longctx_summary_{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def collect(run: Path, out: Path, tag: str) -> list[str]:
    """Copy one run's records to ``out``; returns its markdown lines."""
    lines: list[str] = []
    claims = json.loads((run / "claims.json").read_text()) if (run / "claims.json").is_file() else {"claims": []}
    for rec in claims["claims"]:
        if rec["id"] in ("C09", "C10"):
            lines += [f"## {rec['id']} {rec['title']}: **{rec['status']}**", "", f"- device: {rec['setting'].get('device')}",
                      f"- measured: `{json.dumps({k: v for k, v in rec['measured'].items() if not k.startswith('cells')})}`",
                      f"- thresholds: `{json.dumps(rec['thresholds'])}`", f"- reason: {rec.get('reason') or ''}", ""]
    for grid in ("cpu", "gpu"):
        src = run / f"C09_needle_records_{grid}.json"
        if src.is_file():
            doc = json.loads(src.read_text())
            shutil.copyfile(src, out / f"longctx_niah_single_{tag}.json")
            png = draw_needle_heatmap(doc["cells"], out / f"longctx_niah_single_{tag}.png", f"Needle in a haystack ({tag})")
            lines += [f"![needle heatmap]({png.name})", ""]
    for name, target in (("C09_ruler_records.json", "longctx_ruler"), ("C10_longbench_records.json", "longctx_longbench")):
        if (run / name).is_file():
            shutil.copyfile(run / name, out / f"{target}_{tag}.json")
    return lines


if __name__ == "__main__":
    main()
