"""LongBench-E loader, prompts and truncation on the shipped fixture, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from turboquant.eval.longbench import (
    LONGBENCH_E_DATASETS,
    MAX_NEW_TOKENS,
    PROMPTS,
    LongBenchFormatError,
    bucket_means,
    format_prompt,
    length_bucket,
    load_longbench_e,
    truncate_middle,
)
from turboquant.eval.metrics import DATASET_METRIC

pytestmark = pytest.mark.synthetic


def _good(dataset: str = "hotpotqa", i: int = 0) -> dict:
    return {
        "input": f"Who founded town {i}?",
        "context": f"Town {i} was founded by Person {i}.",
        "answers": [f"Person {i}"],
        "length": 6,
        "dataset": dataset,
        "language": "en",
        "all_classes": None,
        "_id": f"id{i}",
    }


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_fixture_is_official_format(longbench_fixture_dir: Path) -> None:
    data = load_longbench_e(longbench_fixture_dir)
    assert set(data.tasks) <= set(LONGBENCH_E_DATASETS)
    assert len(data.tasks) >= 8, f"fixture covers {sorted(data.tasks)}"
    ids = [ex.id for exs in data.tasks.values() for ex in exs]
    assert len(ids) == len(set(ids)), "duplicate _id in the fixture"
    metrics = {DATASET_METRIC[d] for d in data.tasks}
    assert {"qa_f1", "rouge_l", "classification", "retrieval", "count", "code_sim"} <= metrics, metrics
    for dataset, examples in data.tasks.items():
        for ex in examples:
            assert ex.length == len(ex.context.split()), f"{ex.source}: length {ex.length} is not the word count"
            assert ex.dataset == dataset and ex.answers
            if dataset == "trec":
                assert ex.all_classes and all(a in ex.all_classes for a in ex.answers)
    assert not data.problems


def test_fixture_facts_are_in_context(longbench_fixture_dir: Path) -> None:
    """Every extractive QA answer of the fixture is stated in its context."""
    data = load_longbench_e(longbench_fixture_dir, datasets=["hotpotqa", "2wikimqa", "multifieldqa_en", "qasper"])
    for examples in data.tasks.values():
        for ex in examples:
            assert any(a in ex.context for a in ex.answers), f"{ex.source}: answer {ex.answers} not in context"


@pytest.mark.parametrize("length, bucket", [(0, "0-4k"), (3999, "0-4k"), (4000, "4-8k"), (7999, "4-8k"), (8000, "8k+"), (20000, "8k+")])
def test_length_buckets(length: int, bucket: str) -> None:
    assert length_bucket(length) == bucket


def test_bucket_means_scale_and_empty_buckets() -> None:
    got = bucket_means([("0-4k", 1.0), ("0-4k", 0.5), ("8k+", 0.0)])
    assert got == {"0-4k": 75.0, "4-8k": None, "8k+": 0.0}


def test_max_examples_and_selection(longbench_fixture_dir: Path) -> None:
    data = load_longbench_e(longbench_fixture_dir, datasets=["hotpotqa", "trec"], max_examples=1)
    assert {k: len(v) for k, v in data.tasks.items()} == {"hotpotqa": 1, "trec": 1}


def test_missing_dir_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope.*does not exist"):
        load_longbench_e(missing)


def test_empty_dir_lists_expected_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="qasper_e.jsonl"):
        load_longbench_e(tmp_path)


def test_named_dataset_without_file(tmp_path: Path) -> None:
    _write(tmp_path / "hotpotqa_e.jsonl", [json.dumps(_good())])
    with pytest.raises(FileNotFoundError, match="trec_e.jsonl"):
        load_longbench_e(tmp_path, datasets=["hotpotqa", "trec"])


def test_unknown_dataset_lists_available(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="available: .*hotpotqa"):
        load_longbench_e(tmp_path, datasets=["hotpot"])


def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "hotpotqa_e.jsonl", [json.dumps(_good(i=0)), json.dumps(_good(i=1)), '{"input": "broken', json.dumps(_good(i=3))])
    with pytest.raises(LongBenchFormatError, match=rf"{path.name}:3: invalid JSON"):
        load_longbench_e(tmp_path)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r.pop("answers"), r"missing field\(s\) \['answers'\]"),
        (lambda r: r.update(length="12"), "field 'length' must be int"),
        (lambda r: r.update(answers=[]), "non-empty list of strings"),
        (lambda r: r.update(all_classes="A,B"), "field 'all_classes' must be list or null"),
        (lambda r: r.update(dataset="trec"), "record says dataset 'trec'"),
    ],
)
def test_bad_record_names_file_and_line(tmp_path: Path, mutate, message: str) -> None:
    bad = _good(i=1)
    mutate(bad)
    path = _write(tmp_path / "hotpotqa_e.jsonl", [json.dumps(_good(i=0)), json.dumps(bad)])
    with pytest.raises(LongBenchFormatError, match=rf"{path.name}:2: .*{message}"):
        load_longbench_e(tmp_path)


def test_skip_mode_keeps_the_rest_of_the_task(tmp_path: Path) -> None:
    """A malformed line never drops the whole task: with on_error='skip' only that line goes, and it
    is reported (file:line) in ``problems`` and as a warning."""
    path = _write(tmp_path / "hotpotqa_e.jsonl", [json.dumps(_good(i=0)), "not json", json.dumps(_good(i=2))])
    with pytest.warns(UserWarning, match=rf"{path.name}:2"):
        data = load_longbench_e(tmp_path, on_error="skip")
    assert [ex.id for ex in data.tasks["hotpotqa"]] == ["id0", "id2"]
    assert len(data.problems) == 1 and f"{path.name}:2" in data.problems[0]


def test_skip_mode_with_no_valid_line_is_an_error(tmp_path: Path) -> None:
    _write(tmp_path / "hotpotqa_e.jsonl", ["{}", "[1, 2]"])
    with pytest.warns(UserWarning), \
            pytest.raises(LongBenchFormatError, match="hotpotqa_e.jsonl: no valid record"):
        load_longbench_e(tmp_path, on_error="skip")


def test_prompts_are_longbench_templates(longbench_fixture_dir: Path) -> None:
    assert set(LONGBENCH_E_DATASETS) <= set(PROMPTS) and set(LONGBENCH_E_DATASETS) <= set(MAX_NEW_TOKENS)
    ex = load_longbench_e(longbench_fixture_dir, datasets=["hotpotqa"]).tasks["hotpotqa"][0]
    prompt = format_prompt(ex)
    assert prompt.startswith("Answer the question based on the given passages.")
    assert ex.context in prompt and prompt.endswith(f"Question: {ex.input}\nAnswer:")
    assert MAX_NEW_TOKENS["hotpotqa"] == 32 and MAX_NEW_TOKENS["gov_report"] == 512


class WordTokenizer:
    """A whitespace tokenizer with the two calls truncation uses (ids = word positions)."""

    def __init__(self) -> None:
        self.vocab: list[str] = []

    def __call__(self, text: str, truncation: bool = False, add_special_tokens: bool = False) -> dict:
        ids = []
        for w in text.split(" "):
            self.vocab.append(w)
            ids.append(len(self.vocab) - 1)
        return {"input_ids": ids}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(self.vocab[i] for i in ids)


def test_truncation_keeps_head_and_tail() -> None:
    tok = WordTokenizer()
    text = " ".join(f"w{i}" for i in range(100))
    out, truncated = truncate_middle(tok, text, 10)
    assert truncated
    assert out == "w0 w1 w2 w3 w4" + "w95 w96 w97 w98 w99"  # LongBench concatenates the halves as-is
    same, truncated = truncate_middle(tok, "a b c", 10)
    assert (same, truncated) == ("a b c", False)
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        truncate_middle(tok, text, 1)
