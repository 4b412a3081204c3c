"""LongBench's official metrics on hand-made cases with known values, and cross-checks against the
reference packages (``rouge`` 1.0.1, ``fuzzywuzzy``) where they are installed."""

from __future__ import annotations

import random

import pytest

from tests.claim_checks import check_needle_scorer
from turboquant.eval import needle
from turboquant.eval.metrics import (
    available_metrics,
    classification_score,
    code_sim_score,
    containment_score,
    count_score,
    fuzz_ratio,
    get_metric,
    metric_for_dataset,
    normalize_answer,
    qa_f1_score,
    retrieval_score,
    rouge_score,
    score_example,
)

pytestmark = pytest.mark.synthetic


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The  Cat's hat!", "cats hat"),
        ("An apple, a pear and THE plum.", "apple pear and plum"),
        ("theatre", "theatre"),  # articles only as whole words
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    "pred, truth, expected",
    [
        ("The Eiffel Tower.", "eiffel tower", 1.0),
        ("Paris France", "Paris", 2 / 3),  # P = 1/2, R = 1
        ("in 1723 by Edda Kallin", "Edda Kallin", 2 * (2 / 5) * 1 / (2 / 5 + 1)),  # P = 2/5, R = 1
        ("London", "Paris", 0.0),
        ("", "Paris", 0.0),
        ("x b b", "b b c", 2 / 3),  # multiset overlap {b: 2}: P = R = 2/3
        ("a b b", "b b c", 0.8),  # "a" is an article and is dropped: P = 1, R = 2/3
    ],
)
def test_qa_f1(pred: str, truth: str, expected: float) -> None:
    got = qa_f1_score(pred, truth)
    assert got == pytest.approx(expected, abs=1e-12), f"qa_f1({pred!r}, {truth!r}) = {got}, expected {expected}"


@pytest.mark.parametrize(
    "pred, truth, expected",
    [
        # one sentence; LCS 'the cat on the mat' but rouge 1.0.1 counts unique words: {the, cat, on, mat}
        ("the cat sat on the mat", "the cat lay on the mat", 2 * 0.8 * 0.8 / (1.6 + 1e-8)),
        ("the cat sat on the mat", "the cat sat on the mat", 2 * 1 * 1 / (2 + 1e-8)),
        ("dogs bark", "cats purr", 0.0),
        ("", "cats purr", 0.0),  # the package raises on empty text; LongBench maps that to 0
        # two reference sentences: union LCS per sentence; ref words {a,b,c,d}, hyp {a,b,x,c,d}
        ("a b x. c d", "a b. c d", 2 * (4 / 4) * (4 / 5) / (4 / 4 + 4 / 5 + 1e-8)),
    ],
)
def test_rouge_l(pred: str, truth: str, expected: float) -> None:
    got = rouge_score(pred, truth)
    assert got == pytest.approx(expected, abs=1e-9), f"rouge_l({pred!r}, {truth!r}) = {got}, expected {expected}"


CLASSES = ["Location", "Individual", "Date", "Manner", "Manner of action"]


@pytest.mark.parametrize(
    "pred, truth, expected",
    [
        ("Individual", "Individual", 1.0),
        ("Individual or Location", "Individual", 0.5),
        ("Date", "Individual", 0.0),
        # 'Manner' is a substring of the truth 'Manner of action' and is dropped (LongBench rule)
        ("Manner of action", "Manner of action", 1.0),
    ],
)
def test_classification(pred: str, truth: str, expected: float) -> None:
    got = classification_score(pred, truth, all_classes=CLASSES)
    assert got == pytest.approx(expected), f"classification({pred!r}, {truth!r}) = {got}, expected {expected}"


def test_classification_needs_classes() -> None:
    with pytest.raises(ValueError, match="all_classes"):
        classification_score("Date", "Date")


@pytest.mark.parametrize(
    "pred, truth, expected",
    [("Paragraph 3", "Paragraph 3", 1.0), ("Paragraph 3 or Paragraph 12", "Paragraph 3", 0.5), ("none", "Paragraph 3", 0.0)],
)
def test_retrieval(pred: str, truth: str, expected: float) -> None:
    assert retrieval_score(pred, truth) == pytest.approx(expected)


def test_retrieval_bad_truth() -> None:
    with pytest.raises(ValueError, match="Paragraph N"):
        retrieval_score("Paragraph 1", "the first one")


@pytest.mark.parametrize("pred, truth, expected", [("3", "3", 1.0), ("There are 3 of 5", "3", 0.5), ("three", "3", 0.0)])
def test_count(pred: str, truth: str, expected: float) -> None:
    assert count_score(pred, truth) == pytest.approx(expected)


@pytest.mark.parametrize(
    "pred, truth, expected",
    [
        ("    return x", "    return x", 1.0),
        ("```python\n    return x\n```", "    return x", 1.0),  # fence and comment lines skipped
        ("# comment\nabcd", "abce", 0.75),  # SequenceMatcher: 2 * 3 / 8
        ("", "abc", 0.0),
    ],
)
def test_code_sim(pred: str, truth: str, expected: float) -> None:
    assert code_sim_score(pred, truth) == pytest.approx(expected)


def test_containment() -> None:
    assert containment_score("It was founded by Edda Kallin in 1723.", "Edda Kallin") == 1.0
    assert containment_score("It was founded by Edda.", "Edda Kallin") == 0.0
    assert containment_score("anything", "") == 0.0


def test_score_example_max_over_answers_and_first_line_rule() -> None:
    assert score_example("qasper", "12,400", ["12,400 letters", "12,400"]) == 1.0
    # trec scores only the first line: the class on line 2 does not count
    assert score_example("trec", "\nDate\nIndividual", ["Individual"], ["Date", "Individual"]) == 0.0
    assert score_example("trec", "Individual\nDate", ["Individual"], ["Date", "Individual"]) == 1.0
    with pytest.raises(ValueError, match="at least one reference"):
        score_example("qasper", "x", [])


def test_registry_lists_names_on_unknown() -> None:
    assert {"qa_f1", "rouge_l", "classification", "retrieval", "count", "code_sim", "containment"} <= set(available_metrics())
    with pytest.raises(KeyError, match="available: .*qa_f1"):
        get_metric("bleu")
    with pytest.raises(KeyError, match="supported: .*hotpotqa"):
        metric_for_dataset("dureader")
    assert metric_for_dataset("gov_report").name == "rouge_l"


def _random_texts(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    words = ["the", "a", "cat", "dog", "sat", "lay", "on", "mat", "river", "town", "was", "founded", "by", "in", "of", "and", ".", ",", "bells"]
    out = []
    for _ in range(n):
        a = " ".join(rng.choice(words) for _ in range(rng.randint(1, 30)))
        b = " ".join(rng.choice(words) for _ in range(rng.randint(1, 30)))
        out.append((a, b))
    return out


def test_rouge_matches_reference_package() -> None:
    rouge = pytest.importorskip("rouge", reason="cross-check needs `pip install rouge==1.0.1`")
    ref = rouge.Rouge()
    worst = 0.0
    for pred, truth in _random_texts(300, seed=0):
        try:
            expected = ref.get_scores([pred], [truth], avg=True)["rouge-l"]["f"]
        except Exception:  # noqa: BLE001 - LongBench's rouge_score maps every package error to 0.0
            expected = 0.0
        worst = max(worst, abs(rouge_score(pred, truth) - expected))
    assert worst < 1e-12, f"max |ours - rouge 1.0.1| = {worst:.3g} over 300 random pairs"


def test_code_sim_matches_fuzzywuzzy() -> None:
    fuzz = pytest.importorskip("fuzzywuzzy.fuzz", reason="cross-check needs `pip install fuzzywuzzy`")
    mismatches = [(a, b) for a, b in _random_texts(300, seed=1) if fuzz_ratio(a, b) != fuzz.ratio(a, b)]
    assert not mismatches, f"{len(mismatches)} of 300 pairs differ from fuzzywuzzy.fuzz.ratio, e.g. {mismatches[:2]}"


# -- the needle scorer (turboquant/eval/needle.py) ------------------------------------------------
def _case_score(text: str, targets) -> float:
    """Score through a real needle ``Case`` (what the C09 grid calls)."""
    case = needle.Case("niah", 1024, 0.5, 0, (1, 2, 3), tuple(targets), (1,))
    return case.score(text)


def test_needle_scorer_misses_a_wrong_number_an_embedded_number_and_an_empty_answer() -> None:
    check_needle_scorer(needle.score_all)
    check_needle_scorer(_case_score)
