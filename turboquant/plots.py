"""PNG plots drawn from claim records (registered per claim id; see turboquant.report)."""

from __future__ import annotations

from pathlib import Path

from turboquant.report import register_plot


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(d: dict) -> tuple[list[int], list[float]]:
    keys = sorted(d, key=float)
    return [float(k) for k in keys], [d[k] for k in keys]


def _semilogy(record: dict, out_dir: Path, series: list, ylabel: str, title: str, filename: str) -> list[Path]:
    """One log-scale plot of measured series vs bits: ``series`` = [(measured key, label, style)]."""
    m = record["measured"]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for key, label, style in series:
        if key in m:
            b, v = _series(m[key])
            ax.semilogy(b, v, style, label=label)
    ax.set_xlabel("bits per coordinate b")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title} ({record['status']})")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    path = Path(out_dir) / filename
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


@register_plot("C03")
def plot_mse_distortion(record: dict, out_dir: Path) -> list[Path]:
    """Distortion vs bits on a log scale, with the paper's upper (√3π/2 · 4^-b) and lower (4^-b) bounds."""
    series = [
        ("distortion", "TurboQuant-mse (measured)", "o-"),
        ("exact_lloyd_max", "exact Lloyd-Max at d", "x--"),
        ("seed_figures", "seed review", "s:"),
        ("upper_bound", "upper bound √3π/2·4^-b", "-"),
        ("lower_bound", "lower bound 4^-b", "-"),
    ]
    return _semilogy(record, out_dir, series, "D_mse (unit vectors)", "C03 MSE distortion", "c03_mse_distortion.png")


@register_plot("C05")
def plot_prod_ip_error(record: dict, out_dir: Path) -> list[Path]:
    """Inner-product squared error of TurboQuant-prod vs bits, with (π/2)D_mse(b-1)/d and the bound."""
    series = [
        ("ip_sq_error", "TurboQuant-prod (measured)", "o-"),
        ("predicted_pi_over_2_dmse_over_d", "(π/2) D_mse(b-1)/d", "x--"),
        ("seed_figures", "seed review", "s:"),
        ("upper_bound", "bound √3π²/d·4^-b", "-"),
    ]
    return _semilogy(record, out_dir, series, "E[(<y, x̃> - <y, x>)²]", "C05 inner-product error", "c05_prod_ip_error.png")
