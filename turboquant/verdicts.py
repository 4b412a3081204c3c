"""The decision rule for noisy claims: paired non-inferiority with a 95% interval.

Per case ``i`` the paired difference ``D_i = s_i(compressed) - s_i(full)``; the estimate is
``diff = mean(D)``. With margin ``m`` (the catalogue's: needle 0.02, QA 1 point on 0-100):

* PASS when the whole 95% interval of ``diff`` lies above ``-m`` (non-inferior),
* FAIL when it lies wholly below ``-m``,
* WARN "inconclusive" otherwise, with ``n_to_resolve``: the number of cases that would resolve it
  at the observed rates / variance.

``m = 0`` is the superiority test (C12: TurboQuant recall > scalar): PASS when the interval lies
wholly above 0.

Intervals:

* ``binary`` outcomes (needle found or not): with ``b`` = #(compressed right, full wrong) and
  ``c`` = #(compressed wrong, full right), ``diff = (b - c) / n``. The interval is
  ``[L_b - U_c, U_b - L_c]`` where ``L``/``U`` are exact Clopper-Pearson bounds of the discordant
  rates at one-sided level ``alpha / 4`` each (Bonferroni over the two rates and the two ends, so
  each end covers >= 97.5%; conservative by construction). It never collapses at small n:
  identical outcomes on ``n`` cases (``b = c = 0``) give ``+-(1 - (alpha/4)^(1/n))``, i.e.
  ``[-0.39, 0.39]`` at n = 9, and PASS at margin 0.02 needs n >= 217 identical needles. (A
  bootstrap gives ``[0, 0]`` there, and Newcombe's square-and-add interval collapses to almost
  zero width when every pair agrees, since the outcomes' correlation is then 1: both would PASS
  from 9 needles.)
* ``continuous`` scores (QA F1): a paired BCa bootstrap of ``mean(D)`` (``scipy.stats.bootstrap``,
  seed fixed, vectorized), percentile where BCa is undefined. Two guards against tiny n: below
  ``min_n`` (20) cases the verdict is WARN whatever the interval; when no case changed at all
  (every ``D_i = 0``), the bootstrap has no variance to see, so the interval is that of the
  binary rule with ``b = c = 0`` scaled by the score range ``R``: a rare case lost entirely is
  not excluded (PASS at 1 point on 0-100 then needs n >= 437).

``n_to_resolve``: continuous: ``ceil((z * sd(D) / |diff + m|)^2)`` (normal approximation at the
observed standard deviation; ``z = 1.96``); binary: the smallest n for which the same interval,
at the observed discordant rates ``b/n``, ``c/n``, excludes ``-m`` (found by bisection on real-
valued counts). ``None`` when ``diff`` sits on the margin (no n resolves it).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

KINDS = ("binary", "continuous")
ALPHA = 0.05
Z = 1.959963984540054  # two-sided 95%
MIN_N_CONTINUOUS = 20
N_RESAMPLES = 9999
BOOTSTRAP_SEED = 0
_N_SEARCH_MAX = 10**7

RULES = {
    "binary": "non-inferiority: 95% interval of mean(compressed - full) vs -margin; exact Clopper-Pearson "
    "bounds of the two discordant rates at alpha/4 each (Bonferroni, conservative)",
    "continuous": f"non-inferiority: 95% paired BCa bootstrap interval of mean(compressed - full) vs -margin "
    f"(scipy.stats.bootstrap, {N_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}); WARN below n={MIN_N_CONTINUOUS}; "
    "all-zero differences use the exact zero-discordance bound times the score range",
}


@dataclass(frozen=True)
class Verdict:
    """One paired comparison and its verdict (``status`` PASS / WARN / FAIL)."""

    status: str
    n: int
    score: float
    full_score: float
    diff: float
    ci95: tuple[float, float]
    margin: float
    kind: str
    rule: str
    n_to_resolve: int | None
    reason: str

    def to_dict(self) -> dict:
        out = asdict(self)
        out["ci95"] = [round(self.ci95[0], 6), round(self.ci95[1], 6)]
        for k in ("score", "full_score", "diff"):
            out[k] = round(out[k], 6)
        return out


def _check(scores: Sequence[float], full: Sequence[float], margin: float, kind: str) -> tuple[np.ndarray, np.ndarray]:
    if kind not in KINDS:
        raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}")
    if isinstance(margin, bool) or not (isinstance(margin, (int, float)) and margin >= 0 and math.isfinite(margin)):
        raise ValueError(f"`margin` must be a finite number >= 0 (0: superiority), got {margin!r}")
    x, y = np.asarray(scores, dtype=float), np.asarray(full, dtype=float)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"`scores` and `full_scores` must be 1-d and paired (same length), got {x.shape} and {y.shape}")
    if x.size == 0:
        raise ValueError("`scores` is empty: a verdict needs at least one paired case")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("`scores` / `full_scores` contain NaN or Inf")
    if kind == "binary" and not (np.isin(x, (0.0, 1.0)).all() and np.isin(y, (0.0, 1.0)).all()):
        raise ValueError("kind='binary' needs scores in {0, 1}; use kind='continuous' for partial credit")
    return x, y


def _cp_upper(k: float, n: float, level: float) -> float:
    """Exact (Clopper-Pearson) upper bound of a binomial rate, one-sided at ``level`` (k may be real)."""
    from scipy.stats import beta

    return 1.0 if k >= n else float(beta.ppf(1.0 - level, k + 1, n - k))


def _cp_lower(k: float, n: float, level: float) -> float:
    from scipy.stats import beta

    return 0.0 if k <= 0 else float(beta.ppf(level, k, n - k + 1))


def discordant_interval(b: float, c: float, n: float, alpha: float = ALPHA) -> tuple[float, float]:
    """95% interval of ``(b - c) / n``: ``[L_b - U_c, U_b - L_c]``, exact bounds at ``alpha / 4``."""
    a4 = alpha / 4
    return (_cp_lower(b, n, a4) - _cp_upper(c, n, a4), _cp_upper(b, n, a4) - _cp_lower(c, n, a4))


def bootstrap_interval(d: np.ndarray, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Paired bootstrap 95% interval of ``mean(d)`` (BCa; percentile where BCa is undefined)."""
    from scipy.stats import bootstrap

    def stat(sample: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.mean(sample, axis=axis)

    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():  # BCa on a constant sample: NaN, then percentile
            warnings.simplefilter("ignore")
            res = bootstrap((d,), stat, vectorized=True, n_resamples=N_RESAMPLES, confidence_level=1 - ALPHA,
                            method=method, rng=np.random.default_rng(seed))
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if math.isfinite(lo) and math.isfinite(hi):
            return lo, hi
    raise RuntimeError("bootstrap interval is undefined")  # pragma: no cover - percentile is always finite


def _status(ci: tuple[float, float], margin: float) -> str:
    if ci[0] > -margin:
        return "PASS"
    if ci[1] < -margin:
        return "FAIL"
    return "WARN"


def _n_binary(b: int, c: int, n: int, margin: float) -> int | None:
    """Smallest n' at which the discordant interval, at rates b/n and c/n, excludes -margin."""
    rb, rc = b / n, c / n
    if abs((rb - rc) + margin) < 1e-12:
        return None

    def resolved(m: float) -> bool:
        return _status(discordant_interval(rb * m, rc * m, m), margin) != "WARN"

    hi = max(n, 2)
    while not resolved(hi):
        hi *= 2
        if hi > _N_SEARCH_MAX:
            return None
    lo = 1
    while lo < hi:
        mid = (lo + hi) // 2
        if resolved(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _n_continuous(d: np.ndarray, margin: float) -> int | None:
    gap = abs(float(d.mean()) + margin)
    sd = float(d.std(ddof=1)) if d.size > 1 else 0.0
    if gap < 1e-12:
        return None
    return max(MIN_N_CONTINUOUS, math.ceil((Z * sd / gap) ** 2))


def decide(
    scores: Sequence[float],
    full_scores: Sequence[float],
    margin: float,
    kind: str = "continuous",
    score_range: float = 1.0,
) -> Verdict:
    """Paired non-inferiority verdict of ``scores`` (compressed) against ``full_scores`` (the same
    cases at full precision) at ``margin`` (in the scores' unit). ``kind``: ``"binary"`` (0/1
    outcomes, exact interval) or ``"continuous"`` (paired bootstrap); ``score_range`` is the largest
    per-case change (1 for F1 on 0-1, 100 on 0-100), used only when no case changed."""
    x, y = _check(scores, full_scores, margin, kind)
    d = x - y
    n = int(d.size)
    diff = float(d.mean())
    if kind == "binary":
        b, c = int((d > 0).sum()), int((d < 0).sum())
        ci = discordant_interval(b, c, n)
        n_res = _n_binary(b, c, n, margin)
    else:
        if not np.any(d):
            half = score_range * discordant_interval(0, 0, n)[1]
            ci = (-half, half)
            n_res = _n_binary(0, 0, n, margin / score_range)
        else:
            ci = bootstrap_interval(d)
            n_res = _n_continuous(d, margin)
    status = _status(ci, margin)
    small = kind == "continuous" and n < MIN_N_CONTINUOUS
    if small:
        status = "WARN"
    ci_text = f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"
    head = f"n={n}: compressed {x.mean():.4f} vs full {y.mean():.4f}, diff {diff:+.4f}, 95% CI {ci_text}"
    if status == "PASS":
        reason = f"{head} lies above -{margin:g}: non-inferior"
    elif status == "FAIL":
        reason = f"{head} lies below -{margin:g}: worse than full by more than the margin"
    else:
        why = f"n < {MIN_N_CONTINUOUS} cases" if small else f"the interval contains -{margin:g}"
        more = f"about n={n_res} cases would resolve it" if n_res else "no n resolves it (diff = -margin)"
        reason = f"{head}: inconclusive ({why}); {more}"
    return Verdict(status, n, float(x.mean()), float(y.mean()), diff, (float(ci[0]), float(ci[1])),
                   float(margin), kind, RULES[kind], n_res if status == "WARN" else None, reason)
