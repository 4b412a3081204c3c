"""Recall vs bits per method (claim C12's plot), drawn from the claim record or a results file."""

from __future__ import annotations

from pathlib import Path

from turboquant.report import register_plot

# Namespaces the ANN tests record under (``measured[source]["recall_vs_bits"]``).
SOURCES = ("lm", "minilm", "synthetic")


def plot_recall_vs_bits(tables: dict[str, dict[str, dict[str, float]]], path: Path, ylabel: str = "recall@10") -> Path:
    """``tables[source][method][bits] = recall`` -> one panel per source, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(tables), 1)
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.2), squeeze=False)
    for ax, (source, methods) in zip(axes[0], tables.items()):
        for method, series in sorted(methods.items()):
            pts = sorted((float(b), v) for b, v in series.items() if v is not None)
            if not pts:
                continue
            style = "-o" if method.startswith("turboquant") else "--s" if method.startswith("faiss") else ":^"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=method, markersize=4)
        ax.set_title(source)
        ax.set_xlabel("bits per coordinate")
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@register_plot("C12")
def c12_recall_vs_bits(record: dict, out_dir: Path) -> list[Path]:
    """Draw ``C12_recall_vs_bits.png`` from the record's ``measured[source]['recall_vs_bits']``."""
    measured = record.get("measured", {})
    tables = {s: measured[s]["recall_vs_bits"] for s in SOURCES if isinstance(measured.get(s), dict) and "recall_vs_bits" in measured[s]}
    if not tables:
        return []
    return [plot_recall_vs_bits(tables, Path(out_dir) / "C12_recall_vs_bits.png")]
