"""The claim recorder, the report files and the CLI: claims flushed per test, worst status wins."""

import json
import os
import shlex

import pytest

from turboquant.__main__ import build_parser, pytest_argv, suite_expression
from turboquant.options import OptionError
from turboquant.report import ClaimStore, merge_records, render_markdown, short

# tier: synthetic unless marked otherwise (tests/core/conftest.py)

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


def test_short_form_keeps_3_significant_digits_and_a_length_cap():
    assert short({1: 0.3617, 2: 0.1169, 3: 0.0343, 4: 0.0094}) == "1/2/3/4: 0.362/0.117/0.0343/0.0094"
    assert short([0.5, 2, None, True]) == "0.5/2/-/true"
    assert short({"ratio": 4.2613, "bytes": 49152.0, "err": 7.6e-05, "t": 1234.56}) == (
        "ratio=4.26, bytes=49152, err=7.6e-05, t=1235")
    assert short({"acc": {"full": 1.0, "3.5": 0.93}, "grid": [[1, 2], [3]]}) == (
        "acc={full=1, 3.5=0.93}, grid=[1/2, 3]")
    long = short({f"k{i}": list(range(50)) for i in range(20)}, limit=120)
    assert len(long) == 120 and long.endswith("\u2026")


def test_markdown_is_one_readable_line_a_claim_with_counts_at_a_glance():
    c03 = {**_record("C03", "PASS", distortion={"1": 0.36171, "2": 0.11688, "3": 0.034271, "4": 0.0094},
                     slope=-1.7571),
           "title": "MSE distortion tracks 4^-b", "thresholds": {"rel_tol_vs_lloyd_max": 0.02,
                                                                 "slope_range": [-2.0, -1.7]},
           "setting": {"seed": 0, "n": 4096, "huge": list(range(5000))}}
    c10 = {**_record("C10", "FAIL", drop=1.58), "reason": "call: drop 1.58 > 1 | point " + "x" * 900}
    md = render_markdown([c10, c03], {"device": "cpu"}, {"complete": True, "exit_status": 0,
                                                         "selection": {"markers": "synthetic"}})
    lines = md.splitlines()
    assert lines.index("PASS = 1  ") < lines.index("FAIL = 1  ") < md.index("| C03 |"), md
    assert "- run: complete, exit status 0" in lines and "- selection: markers=synthetic" in lines
    row = next(line for line in lines if line.startswith("| C03 |"))
    assert row == ("| C03 | **PASS** | MSE distortion tracks 4^-b | distortion={1/2/3/4: "
                   "0.362/0.117/0.0343/0.0094}, slope=-1.76 | rel_tol_vs_lloyd_max=0.02, "
                   "slope_range=-2/-1.7 |  |")
    fail = next(line for line in lines if line.startswith("| C10 |"))
    assert fail.count(" | ") == 5 and "drop 1.58 > 1 \\| point" in fail and len(fail) < 400
    assert "INCOMPLETE" not in md and "huge" not in md  # settings stay in claims.json


def test_store_says_incomplete_until_finished(tmp_path):
    store = ClaimStore(tmp_path, {"device": "cpu"}, {"markers": "synthetic", "args": ["tests/core"]})
    store.add(_record("C01", "PASS", x=1.0))
    doc = json.loads((tmp_path / "claims.json").read_text())
    assert doc["complete"] is False and doc["exit_status"] is None
    assert doc["selection"] == {"markers": "synthetic", "args": ["tests/core"]}
    assert (tmp_path / "claims.md").read_text().split("\n")[2].startswith("**INCOMPLETE run**")
    store.finish(1)
    doc = json.loads((tmp_path / "claims.json").read_text())
    assert doc["complete"] is True and doc["exit_status"] == 1
    assert "INCOMPLETE" not in (tmp_path / "claims.md").read_text()


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
    with pytest.raises(OptionError, match="must be one of synthetic, model, gpu, all"):
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

@pytest.mark.claim("C95", "known failure, within its recorded bound")
def test_known_within_bound(claim):
    claim.measured(gap={"3": -0.04})
    assert -0.04 > 0, "TQ loses by 0.04"

@pytest.mark.claim("C96", "known failure, worse than its recorded bound")
def test_known_regressed(claim):
    claim.measured(gap={"3": -0.2})
    assert -0.2 > 0, "TQ loses by 0.2"

@pytest.mark.claim("C97", "known failure, broken before it measured")
def test_known_unmeasured(claim):
    raise RuntimeError("crashed before measuring")
'''

# Known-failure entries for the inner suite, with the real mechanism of the root conftest.
INNER_KNOWN = '''
for _name in ("test_known_within_bound", "test_known_regressed", "test_known_unmeasured"):
    KNOWN_FAILURES[f"test_inner.py::{_name}"] = KnownFailure(
        "always", True, "recorded gap -0.029", (Bound(("gap", "3"), -0.029, "lower", 0.03),))
'''


@pytest.fixture
def inner(pytester, repo_root, monkeypatch):
    """A tiny suite under the real root conftest and pytest.ini, run with this checkout's package."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(repo_root), os.environ.get("PYTHONPATH", "")]))
    pytester.makeconftest((repo_root / "conftest.py").read_text() + INNER_KNOWN)
    pytester.makeini((repo_root / "pytest.ini").read_text().replace("testpaths = tests\n", ""))
    return pytester


def test_recorder_writes_pass_warn_fail_skip_records(inner):
    inner.makepyfile(test_inner=INNER_TESTS)
    out = inner.path / "out"
    result = inner.runpytest_subprocess("--out-dir", str(out), "-p", "no:randomly", "-m", "not slow")
    result.assert_outcomes(passed=2, failed=3, skipped=1, xfailed=2)
    doc = json.loads((out / "claims.json").read_text())
    status = {c["id"]: c["status"] for c in doc["claims"]}
    assert status == {"C90": "PASS", "C91": "FAIL", "C92": "WARN", "C93": "SKIP", "C94": "FAIL",
                      "C95": "FAIL", "C96": "FAIL", "C97": "FAIL"}
    by_id = {c["id"]: c for c in doc["claims"]}
    assert by_id["C91"]["measured"] == {"value": 2.0} and "above 1.0" in by_id["C91"]["reason"]
    assert "weights not on disk" in by_id["C93"]["reason"]
    assert "known failure (documented in the README)" in by_id["C94"]["reason"]
    assert "above 1.0" in by_id["C94"]["reason"] and by_id["C94"]["measured"] == {"value": 3.0}
    assert by_id["C90"]["setting"]["device"]
    # a known failure inside its recorded bound stays xfailed; beyond it, or unmeasured, it fails
    assert "known failure (recorded gap -0.029)" in by_id["C95"]["reason"]
    assert "gap.3 = -0.2 is worse than the recorded -0.029 by more than 0.03" in by_id["C96"]["reason"]
    assert "gap.3 was not measured" in by_id["C97"]["reason"]
    result.stdout.fnmatch_lines(["FAILED test_inner.py::test_known_regressed*",
                                 "FAILED test_inner.py::test_known_unmeasured*"])
    # the session ended: complete, with its exit status and selection
    assert doc["complete"] is True and doc["exit_status"] == 1
    assert doc["selection"]["markers"] == "not slow" and doc["selection"]["workers"] is None


XDIST_A = '''
import pytest

@pytest.mark.claim("C90", "recorded first")
def test_first(claim):
    claim.measured(value=1.0)
'''

XDIST_B = '''
import json, os, signal, time
from pathlib import Path

def test_kill_the_run_once_c90_is_flushed():
    """Wait until the controller has flushed C90 (the session still runs), then SIGKILL it."""
    path = Path(os.environ["TQ_INNER_OUT"]) / "claims.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if path.exists() and "C90" in [c["id"] for c in json.loads(path.read_text())["claims"]]:
            break
        time.sleep(0.05)
    os.kill(os.getppid(), signal.SIGKILL)  # the xdist controller
    os._exit(0)
'''


@pytest.mark.integration  # a real xdist run in subprocesses
def test_a_killed_xdist_run_has_flushed_each_claim_and_says_incomplete(inner, monkeypatch):
    """Under ``-n 2`` each claim is in claims.json as soon as its test ends; a run killed later
    leaves ``complete: false`` and an INCOMPLETE claims.md."""
    out = inner.path / "out"
    monkeypatch.setenv("TQ_INNER_OUT", str(out))
    inner.makepyfile(test_xa=XDIST_A, test_xb=XDIST_B)
    result = inner.runpytest_subprocess("--out-dir", str(out), "-p", "no:randomly", "-n", "2",
                                        "--dist", "loadfile", "-k", "test_", timeout=120)
    assert result.ret == -9, f"the controller should have been killed: {result.ret}"
    doc = json.loads((out / "claims.json").read_text())
    assert [c["id"] for c in doc["claims"]] == ["C90"], "the claim was not flushed before the kill"
    assert doc["complete"] is False and doc["exit_status"] is None
    assert doc["selection"]["workers"] == 2 and doc["selection"]["keywords"] == "test_"
    md = (out / "claims.md").read_text().splitlines()
    assert md[2].startswith("**INCOMPLETE run**") and "- run: INCOMPLETE" in md
