"""The claim recorder, the report files and the CLI: claims flushed per test, worst status wins."""

import json
import shlex

import pytest

from turboquant.__main__ import build_parser, pytest_argv, suite_expression
from turboquant.report import ClaimStore, merge_records, render_markdown

pytestmark = pytest.mark.synthetic

SEED_COMMAND = """verify --suite all --model_id Qwen/Qwen3.6-27B --load_model --local_files_only
  --torch_dtype bfloat16 --attn_implementation sdpa --needle_context_tokens 32768 --needle_required_bits 3.5
  --needle_trials 1 --needle_positions 0.5 --run_longbench --longbench_required_bits 3.5
  --longbench_max_examples 6 --longbench_max_prompt_tokens 32768 --longbench_local_dir data --run_throughput
  --throughput_new_tokens 128 --throughput_warmup 1 --throughput_repeats 3 --ann_use_qwen_embeddings
  --ann_required_scalar_bits 2,3,4 --ann_pq_index_speedup_threshold 10 --out_dir runs/tq_qwen36_27b_full_sdpa"""


def _record(cid, status, **measured):
    return {"id": cid, "title": "t", "status": status, "measured": measured, "thresholds": {}, "setting": {},
            "reason": "", "tests": [f"test_{status}"]}


def test_merge_keeps_the_worst_status_and_all_measurements():
    merged = merge_records(None, _record("C03", "PASS", a=1))
    merged = merge_records(merged, _record("C03", "WARN", b=2))
    merged = merge_records(merged, _record("C03", "PASS", c=3))
    assert merged["status"] == "WARN" and merged["measured"] == {"a": 1, "b": 2, "c": 3}
    assert merge_records(merged, _record("C03", "FAIL"))["status"] == "FAIL"
    assert merge_records(_record("C09", "SKIP"), _record("C09", "PASS"))["status"] == "PASS"


def test_store_flushes_json_and_markdown_on_every_claim(tmp_path):
    store = ClaimStore(tmp_path, {"device": "cpu"})
    store.add(_record("C01", "PASS", x=1.0))
    first = json.loads((tmp_path / "claims.json").read_text())
    assert [c["id"] for c in first["claims"]] == ["C01"] and first["counts"]["PASS"] == 1
    store.add(_record("C02", "FAIL", x=float("nan")))
    doc = json.loads((tmp_path / "claims.json").read_text())
    assert doc["counts"] == {"PASS": 1, "WARN": 0, "FAIL": 1, "SKIP": 0}
    assert doc["claims"][1]["measured"]["x"] is None  # NaN is not valid JSON: written as null
    assert "FAIL = 1" in (tmp_path / "claims.md").read_text()


def test_markdown_table_has_one_row_per_claim():
    md = render_markdown([_record("C01", "PASS"), _record("C02", "SKIP")])
    assert md.count("| C0") == 2 and "SKIP = 1" in md


def test_cli_accepts_the_seed_launch_command_verbatim(tmp_path):
    args = build_parser().parse_args(shlex.split(SEED_COMMAND))
    argv = pytest_argv(args, tmp_path)
    assert "--model-id=Qwen/Qwen3.6-27B" in argv and "--needle-context-tokens=32768" in argv
    assert "--torch-dtype=bfloat16" in argv and "--ann-use-qwen-embeddings=true" in argv
    assert "--out-dir=runs/tq_qwen36_27b_full_sdpa" in argv
    assert "--json-report-file=runs/tq_qwen36_27b_full_sdpa/report.json" in argv


def test_cli_suite_names_map_to_markers_and_unknown_names_are_refused():
    assert suite_expression("synthetic") == "(synthetic)"
    assert suite_expression("synthetic,model") == "(synthetic) or (model)"
    with pytest.raises(SystemExit, match="--suite must be one of"):
        suite_expression("fast")


INNER_TESTS = '''
import pytest

@pytest.mark.claim("C90", "passes")
def test_pass(claim):
    claim.measured(value=1.0)

@pytest.mark.claim("C91", "fails")
def test_fail(claim):
    claim.measured(value=2.0)
    assert 2.0 < 1.0, "measured 2.0 above 1.0"

@pytest.mark.claim("C92", "warns")
def test_warn(claim):
    claim.warn("worse than the seed")

@pytest.mark.claim("C93", "skips")
def test_skip(claim):
    pytest.skip("weights not on disk: pass --model_id")

@pytest.mark.xfail(strict=True, reason="documented in the README")
@pytest.mark.claim("C94", "known failure")
def test_known_failure(claim):
    claim.measured(value=3.0)
    assert 3.0 < 1.0, "measured 3.0 above 1.0"
'''


def test_recorder_writes_pass_warn_fail_skip_records(pytester, repo_root):
    pytester.makeconftest((repo_root / "conftest.py").read_text())
    pytester.makeini((repo_root / "pytest.ini").read_text().replace("testpaths = tests\n", ""))
    pytester.makepyfile(test_inner=INNER_TESTS)
    out = pytester.path / "out"
    result = pytester.runpytest_subprocess("--out-dir", str(out), "-p", "no:randomly")
    result.assert_outcomes(passed=2, failed=1, skipped=1, xfailed=1)
    doc = json.loads((out / "claims.json").read_text())
    status = {c["id"]: c["status"] for c in doc["claims"]}
    assert status == {"C90": "PASS", "C91": "FAIL", "C92": "WARN", "C93": "SKIP", "C94": "FAIL"}
    by_id = {c["id"]: c for c in doc["claims"]}
    assert by_id["C91"]["measured"] == {"value": 2.0} and "above 1.0" in by_id["C91"]["reason"]
    assert "weights not on disk" in by_id["C93"]["reason"]
    assert "known failure (documented in the README)" in by_id["C94"]["reason"]
    assert "above 1.0" in by_id["C94"]["reason"] and by_id["C94"]["measured"] == {"value": 3.0}
    assert by_id["C90"]["setting"]["device"]
