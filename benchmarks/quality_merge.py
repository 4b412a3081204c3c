"""Join ``benchmarks/quality.py`` files that ran disjoint ``--recipes`` on the same grid.

Every part repeats the full-precision run, so each recipe's paired intervals were computed against
the same full-precision cases; the parts must agree on the grid and on the full-precision scores
(checked). Writes the joined JSON and redraws the plots.

Usage: ``python benchmarks/quality_merge.py --out results/quality_gpu.json part1.json part2.json ...``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GRID_KEYS = ("needle_grid", "qa_set", "kl", "model", "device", "seed")


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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("parts", nargs="+")
    args = ap.parse_args(argv)
    result = merge([json.loads(Path(p).read_text()) for p in args.parts])
    from turboquant.eval.quality import save_result

    save_result(result, Path(args.out))
    print(f"wrote {args.out}: {len(result['recipes'])} recipes from {len(args.parts)} parts")
    return result


if __name__ == "__main__":
    main()
