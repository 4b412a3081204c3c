"""LongBench's official metrics, registered by name, plus the seed's containment score.

Each metric is ``fn(prediction: str, ground_truth: str, **kwargs) -> float`` in [0, 1], exactly as
in LongBench's ``metrics.py`` (THUDM/LongBench, ``LongBench/metrics.py``):

* ``qa_f1``          token F1 after LongBench's ``normalize_answer`` (lower, strip punctuation,
                     drop articles, squeeze whitespace)
* ``rouge_l``        ROUGE-L F of the ``rouge`` 1.0.1 package (summary-level union LCS over
                     sentences split on ``.``, set-based, ``f = 2pr / (p + r + 1e-8)``); ported here
                     so no extra dependency is needed, and cross-checked against the package in the
                     tests when it is installed
* ``classification`` LongBench's ``classification_score`` (needs ``all_classes``)
* ``retrieval``      share of the numbers in the prediction equal to the id in "Paragraph N"
* ``count``          share of the numbers in the prediction equal to the ground truth
* ``code_sim``       ``fuzzywuzzy.fuzz.ratio / 100`` on the first line without ``` ` ``` ``#`` ``//``
                     (pure-python ``difflib`` matcher, rounded to an integer percentage, as
                     fuzzywuzzy does without python-Levenshtein)
* ``containment``    the seed's score: 1 if a normalised answer occurs in the normalised prediction

Scores per example take the max over the reference answers (:func:`score_example`), and the
first-line rule of LongBench's ``scorer_e`` for trec / triviaqa / samsum / lsht.
"""

from __future__ import annotations

import difflib
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

MetricFn = Callable[..., float]


@dataclass(frozen=True)
class Metric:
    """A registered metric: name, function and whether higher is better."""

    name: str
    fn: MetricFn
    higher_is_better: bool = True


_METRICS: dict[str, Metric] = {}


def register_metric(name: str, higher_is_better: bool = True) -> Callable[[MetricFn], MetricFn]:
    """Register ``fn(prediction, ground_truth, **kwargs) -> float`` under ``name``."""

    def deco(fn: MetricFn) -> MetricFn:
        if name in _METRICS:
            raise ValueError(f"metric {name!r} is already registered")
        _METRICS[name] = Metric(name, fn, higher_is_better)
        return fn

    return deco


def get_metric(name: str) -> Metric:
    """The metric registered as ``name``; unknown names raise ``KeyError`` listing the available."""
    try:
        return _METRICS[name]
    except KeyError:
        raise KeyError(f"unknown metric {name!r}; available: {sorted(_METRICS)}") from None


def available_metrics() -> list[str]:
    return sorted(_METRICS)


# ---------------------------------------------------------------------------------------------
# normalisation (LongBench / SQuAD)


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace (LongBench)."""
    s = s.lower()
    exclude = set(string.punctuation)
    s = "".join(ch for ch in s if ch not in exclude)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _token_f1(prediction: Sequence[str], ground_truth: Sequence[str]) -> float:
    common = Counter(prediction) & Counter(ground_truth)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction)
    recall = num_same / len(ground_truth)
    return 2 * precision * recall / (precision + recall)


@register_metric("qa_f1")
def qa_f1_score(prediction: str, ground_truth: str, **kwargs: object) -> float:
    """Token-level F1 after :func:`normalize_answer` (LongBench ``qa_f1_score``)."""
    return _token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


# ---------------------------------------------------------------------------------------------
# ROUGE-L, as the `rouge` 1.0.1 package computes it (exclusive=True, i.e. set semantics)


def _lcs_table(x: Sequence[str], y: Sequence[str]) -> list[list[int]]:
    n, m = len(x), len(y)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        xi, row, prev = x[i - 1], table[i], table[i - 1]
        for j in range(1, m + 1):
            if xi == y[j - 1]:
                row[j] = prev[j - 1] + 1
            else:
                row[j] = max(prev[j], row[j - 1])
    return table


def _recon_lcs(x: Sequence[str], y: Sequence[str]) -> set[str]:
    """Words of one LCS of x and y, with the package's tie-breaking (iterative, no recursion)."""
    table = _lcs_table(x, y)
    i, j = len(x), len(y)
    out: list[str] = []
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            out.append(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return set(out)


def _sentences(text: str) -> list[str]:
    return [" ".join(part.split()) for part in text.split(".") if len(part) > 0]


def _words(sentences: Sequence[str]) -> list[str]:
    return [w for s in sentences for w in s.split(" ")]


def rouge_l_f(prediction: str, ground_truth: str) -> float:
    """ROUGE-L F (summary level) of ``rouge`` 1.0.1; raises ``ValueError`` on empty inputs."""
    hyp, ref = _sentences(prediction), _sentences(ground_truth)
    if not hyp or not ref:
        raise ValueError("Collections must contain at least 1 sentence.")
    m = len(set(_words(ref)))
    n = len(set(_words(hyp)))
    union: set[str] = set()
    llcs = 0
    for ref_s in ref:
        ref_words = ref_s.split(" ")
        before = len(union)
        for hyp_s in hyp:
            union |= _recon_lcs(ref_words, hyp_s.split(" "))
        llcs += len(union) - before
    r, p = llcs / m, llcs / n
    return 2.0 * ((p * r) / (p + r + 1e-8))


@register_metric("rouge_l")
def rouge_score(prediction: str, ground_truth: str, **kwargs: object) -> float:
    """LongBench ``rouge_score``: ROUGE-L F, 0.0 where the package raises (empty text)."""
    try:
        return rouge_l_f(prediction, ground_truth)
    except ValueError:
        return 0.0


# ---------------------------------------------------------------------------------------------
# classification, retrieval, count, code similarity


@register_metric("classification")
def classification_score(prediction: str, ground_truth: str, **kwargs: object) -> float:
    """LongBench ``classification_score``: 1/k when the truth is among k class names matched."""
    all_classes = kwargs.get("all_classes")
    if not all_classes:
        raise ValueError("classification needs all_classes (the task's list of class names)")
    matches = [c for c in all_classes if c in prediction]  # type: ignore[union-attr]
    # LongBench removes, while iterating, names that are a substring of the truth; removing from
    # the list being iterated skips the next element. Kept bit-for-bit.
    for term in matches:
        if term in ground_truth and term != ground_truth:
            matches.remove(term)
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def _share_equal(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(1 for n in numbers if n == target) / len(numbers)


@register_metric("retrieval")
def retrieval_score(prediction: str, ground_truth: str, **kwargs: object) -> float:
    """LongBench ``retrieval_score``: the truth is "Paragraph N"; share of numbers equal to N."""
    found = re.findall(r"Paragraph (\d+)", ground_truth)
    if not found:
        raise ValueError(f"retrieval ground truth must contain 'Paragraph N', got {ground_truth!r}")
    return _share_equal(prediction, found[0])


@register_metric("count")
def count_score(prediction: str, ground_truth: str, **kwargs: object) -> float:
    """LongBench ``count_score``: share of numbers in the prediction equal to the truth."""
    return _share_equal(prediction, str(ground_truth))


def fuzz_ratio(s1: str, s2: str) -> int:
    """``fuzzywuzzy.fuzz.ratio`` (pure-python path): round(100 * SequenceMatcher ratio)."""
    if s1 == s2:
        return 100
    if len(s1) == 0 or len(s2) == 0:
        return 0
    return round(100 * difflib.SequenceMatcher(None, s1, s2).ratio())


@register_metric("code_sim")
def code_sim_score(prediction: str, ground_truth: str, **kwargs: object) -> float:
    """LongBench ``code_sim_score``: fuzz ratio of the first non-comment, non-fence line."""
    line = ""
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    return fuzz_ratio(line, ground_truth) / 100


@register_metric("containment")
def containment_score(prediction: str, ground_truth: str, **kwargs: object) -> float:
    """The seed's score: 1.0 if the normalised answer occurs in the normalised prediction."""
    truth = normalize_answer(ground_truth)
    return float(bool(truth) and truth in normalize_answer(prediction))


# ---------------------------------------------------------------------------------------------
# per-dataset metric and scoring rules (LongBench eval.py)

DATASET_METRIC: dict[str, str] = {
    "narrativeqa": "qa_f1",
    "qasper": "qa_f1",
    "multifieldqa_en": "qa_f1",
    "hotpotqa": "qa_f1",
    "squad_mdqa": "qa_f1",  # turboquant.eval.squad_qa (SQuAD v2 multi-document QA)
    "2wikimqa": "qa_f1",
    "musique": "qa_f1",
    "gov_report": "rouge_l",
    "qmsum": "rouge_l",
    "multi_news": "rouge_l",
    "trec": "classification",
    "triviaqa": "qa_f1",
    "samsum": "rouge_l",
    "passage_retrieval_en": "retrieval",
    "passage_count": "count",
    "lcc": "code_sim",
    "repobench-p": "code_sim",
}
FIRST_LINE_DATASETS = frozenset({"trec", "triviaqa", "samsum", "lsht"})


def metric_for_dataset(dataset: str) -> Metric:
    """The official metric of a LongBench dataset; unknown datasets list the supported ones."""
    if dataset not in DATASET_METRIC:
        raise KeyError(f"no official metric for dataset {dataset!r}; supported: {sorted(DATASET_METRIC)}")
    return get_metric(DATASET_METRIC[dataset])


def score_example(
    dataset: str,
    prediction: str,
    answers: Sequence[str],
    all_classes: Sequence[str] | None = None,
    metric: str | None = None,
) -> float:
    """Max over reference answers of the dataset's official metric (or ``metric``), in [0, 1]."""
    if not answers:
        raise ValueError(f"{dataset}: an example needs at least one reference answer")
    fn = get_metric(metric).fn if metric else metric_for_dataset(dataset).fn
    if metric is None and dataset in FIRST_LINE_DATASETS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    return max(float(fn(prediction, truth, all_classes=all_classes)) for truth in answers)
