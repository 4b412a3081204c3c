"""Needle-in-a-haystack heatmap (context length x depth, one panel per cache setting) for C09."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from turboquant.report import register_plot


def draw_needle_heatmap(
    cells: Mapping[str, Mapping[str, Mapping[str, float]]],
    path: Path,
    title: str = "Needle in a haystack: accuracy",
) -> Path:
    """``cells[setting][length][depth] -> accuracy`` as one heatmap panel per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(cells)
    if not settings:
        raise ValueError("no needle cells to plot")
    lengths = sorted({int(n) for s in settings for n in cells[s]})
    depths = sorted({float(d) for s in settings for n in cells[s] for d in cells[s][n]})
    fig, axes = plt.subplots(1, len(settings), figsize=(1.2 + 2.6 * len(settings), 0.9 + 0.45 * len(depths) + 1.2), squeeze=False)
    image = None
    for k, (ax, setting) in enumerate(zip(axes[0], settings)):
        grid = [[cells[setting].get(str(n), {}).get(f"{d:g}", float("nan")) for n in lengths] for d in depths]
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths] if k == 0 else [])
        ax.set_xlabel("context tokens")
        numeric = setting.replace(".", "", 1).isdigit()
        label = "full precision" if setting == "full" else f"TurboQuant {setting}-bit" if numeric else setting
        ax.set_title(label, fontsize=10)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    axes[0][0].set_ylabel("needle depth")
    fig.suptitle(title, fontsize=11)
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


@register_plot("C09")
def needle_heatmap_plot(record: dict, out_dir: Path) -> list[Path]:
    """Report hook: draw ``measured["cells"]`` of the C09 record (one file per grid name)."""
    measured = record.get("measured", {})
    out: list[Path] = []
    for key, cells in measured.items():
        if key == "cells" or key.startswith("cells_"):
            suffix = "" if key == "cells" else "_" + key.removeprefix("cells_")
            device = record.get("setting", {}).get("device", "")
            title = f"Needle in a haystack ({device})"
            out.append(draw_needle_heatmap(cells, Path(out_dir) / f"C09_needle_heatmap{suffix}.png", title))
    return out


def draw_quality_vs_bits(result: dict, path: Path) -> Path:
    """Three panels over measured bits a coordinate (one point per recipe / baseline): needle
    accuracy and QA F1 with the 95% interval of the paired difference as error bars (drawn around
    the recipe's score), and next-token KL against full precision (log scale) with the 95% interval
    of its mean over the prompts; one colour a recipe in all panels. A row without measured bits is
    drawn hollow at its nominal bits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["recipes"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    panels = (("needle_acc", "needle_diff", "needle accuracy"),
              ("qa_f1", "qa_diff", "QA F1 (0-100)"),
              ("kl", None, "next-token KL vs full (nats)"))
    markers = {"full": "*", "turboquant": "o", "baseline": "s"}
    # one colour a recipe in every panel (the KL panel has no full-precision point: a shared cycle
    # would shift every colour there)
    cmap = plt.get_cmap("tab20")
    colours = {name: cmap(i % 20) for i, name in enumerate(rows)}
    for ax, (key, diff_key, label) in zip(axes, panels):
        for name, row in rows.items():
            x, y = row.get("bits_measured"), row.get(key)
            nominal = x is None  # not measured yet (no KL prompt run): drawn hollow at the nominal bits
            x = row.get("nominal_bits") if nominal else x
            if x is None or y is None:
                continue
            if key == "kl" and y <= 0:
                continue
            err = None
            if diff_key and row.get(diff_key + "_ci95"):  # the diff's interval, moved onto the score
                lo, hi = row[diff_key + "_ci95"]
                err = [[max(0.0, row[diff_key] - lo)], [max(0.0, hi - row[diff_key])]]
            elif key == "kl" and row.get("kl_ci95"):  # the mean's interval over the KL prompts
                lo, hi = row["kl_ci95"]
                err = [[max(0.0, y - lo)], [max(0.0, hi - y)]]
            ax.errorbar(x, y, yerr=err, fmt=markers.get(row["family"], "o"), capsize=3, label=name,
                        color=colours[name], mfc="none" if nominal else None)
            ax.annotate(name + (" (nominal bits)" if nominal else ""), (x, y), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
        ax.set_xscale("log", base=2)
        if key == "kl":
            ax.set_yscale("log")
        ax.set_xlabel("measured bits a coordinate (codes + scales)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_title(f"needles (n={result['n_needles']}); bars: 95% CI of the paired diff", fontsize=9)
    axes[1].set_title(f"SQuAD multi-doc QA (n={result['n_qa']})", fontsize=9)
    axes[2].set_title("teacher-forced next-token KL; bars: 95% CI of the mean", fontsize=9)
    fig.suptitle(f"Quality vs measured bits ({result['meta']['device']}, {result['meta']['date'][:10]})", fontsize=11)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
