"""Needle-in-a-haystack heatmap (context length x depth, one panel per cache setting) for C09."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

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
        label = "full precision" if setting == "full" else f"TurboQuant {setting}-bit"
        ax.set_title(label, fontsize=10)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if v == v:  # not NaN
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
            out.append(draw_needle_heatmap(cells, Path(out_dir) / f"C09_needle_heatmap{suffix}.png", f"Needle in a haystack ({device})"))
    return out
