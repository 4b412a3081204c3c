"""The resumable GPU quality grid (turboquant.eval.grid): plan order, resume, deadline, failures,
imported logs, and its merge into one result (benchmarks/quality_merge.py --grid). Synthetic: the
case evaluator is a deterministic stand-in, the bookkeeping and the statistics are the real ones."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from turboquant.eval import grid, grid_worker
from turboquant.eval.recipes import FULL, GRID_NAMES, RECIPES

pytestmark = pytest.mark.synthetic
ROOT = Path(__file__).resolve().parents[2]


def _load(name: str, path: Path | None = None):
    """The module at ``path`` (default: ``benchmarks/<name>.py``), imported as ``name``."""
    spec = importlib.util.spec_from_file_location(name, path or ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


quality_merge = _load("quality_merge")


def _spec(**kw) -> grid.GridSpec:
    base = {"names": ("halves-2.5", "fp8-e4m3"), "needle_lengths": (1024, 2048), "needle_depths": (0.5,),
            "needle_trials": 3, "qa_lengths": (1024,), "qa_per_cell": 2, "kl_prompts": 4, "kl_tokens": 2,
            "chunk_sizes": {"needle": 2, "qa": 4, "kl": 2}}
    return grid.GridSpec(**{**base, **kw})


@pytest.fixture()
def model():
    from turboquant.models import tiny_config

    return SimpleNamespace(config=tiny_config("llama", head_dim=64, num_layers=2))


def fake_evaluate(calls: list | None = None, fail: str | None = None):
    """Scores that depend on (setting, key) only: full finds every needle, halves-2.5 loses the
    needles of trial 0, fp8 none; QA F1 1.0 / 0.5; KL grows as bits fall."""

    def evaluate(src, task, settings, key):
        if fail in settings:
            raise RuntimeError(f"{fail} cannot build its extension here")
        return {s: one(task, s, key) for s in settings}

    def one(task, setting, key):
        if calls is not None:
            calls.append((task, setting, key))
        if task == "needle":
            length, depth, trial = key[1:].split("-")
            lost = setting == "halves-2.5" and trial == "t0"
            return {"key": key, "setting": setting, "length": int(length), "depth": float(depth[1:]),
                    "trial": int(trial[1:]), "score": 0.0 if lost else 1.0, "seconds": 0.0}
        if task == "qa":
            return {"key": key, "setting": setting, "official": 0.5 if setting == "halves-2.5" else 1.0,
                    "seconds": 0.0}
        return {"key": key, "setting": setting, "kl": 0.2 if setting == "halves-2.5" else 0.001,
                "top1": 0.8 if setting == "halves-2.5" else 1.0,
                "bits_measured": 2.75 if setting == "halves-2.5" else 8.25, "positions": 2, "seconds": 0.0}

    return evaluate


def test_grid_plan_runs_qa_kl_paper_needles_other_needles_then_the_isolated_settings() -> None:
    spec = _spec(names=("paper-3.5", "halves-3.5", "quanto-int4"))
    chunks = grid.plan(spec)
    order = [(c.task, c.settings) for c in chunks]
    assert order[0] == ("qa", ("full", "paper-3.5", "halves-3.5"))
    assert ("kl", ("paper-3.5", "halves-3.5")) in order, "KL computes its full reference in the same call"
    needles = [c.settings for c in chunks if c.task == "needle" and "quanto-int4" not in c.settings]
    assert needles == [("paper-3.5",)] * 3 + [("full", "halves-3.5")] * 3, "C09's verdict recipe first"
    main = [c for c in chunks if "quanto-int4" not in c.settings]
    assert [c.task for c in main] == sorted([c.task for c in main], key=grid.TASKS.index)
    # a setting that may compile an extension runs apart, after everything else
    isolated = [i for i, c in enumerate(chunks) if c.settings == ("quanto-int4",)]
    assert isolated and min(isolated) == len(main) and len(isolated) == len(chunks) - len(main)
    assert sum(len(c.keys) for c in chunks if c.task == "needle" and "full" in c.settings) == 6


def test_needle_cases_are_trial_major_so_a_cut_run_covers_every_length() -> None:
    keys = _spec().keys("needle")
    assert keys[:2] == ["L1024-d0.5-t0", "L2048-d0.5-t0"] and len(set(keys)) == 6


def test_grid_names_and_chunk_sizes_are_checked() -> None:
    with pytest.raises(KeyError, match=r"unknown recipe/baseline 'int4'; valid: \['full'"):
        _spec(names=("int4",))
    with pytest.raises(ValueError, match="`full` is always run"):
        _spec(names=("full",))
    with pytest.raises(ValueError, match=r"chunk_sizes\['qa'\]"):
        _spec(chunk_sizes={"needle": 2, "qa": 0, "kl": 2})


def test_a_resumed_grid_must_be_the_same_grid(tmp_path: Path) -> None:
    grid.init_state(tmp_path, _spec())
    grid.init_state(tmp_path, _spec())  # same grid: fine
    grid.init_state(tmp_path, _spec(chunk_sizes={"needle": 5, "qa": 5, "kl": 5}))  # only splits the work
    assert grid.load_spec(tmp_path).chunk_sizes == _spec().chunk_sizes, "the stored split is kept"
    with pytest.raises(ValueError, match=r"another grid \(differs in \['needle_trials'\]\)"):
        grid.init_state(tmp_path, _spec(needle_trials=4))
    with pytest.raises(FileNotFoundError, match="not a grid state directory"):
        grid.load_spec(tmp_path / "nothing")


def test_worker_stops_at_the_deadline_and_a_second_call_finishes_without_recomputing(tmp_path: Path, model) -> None:
    spec = _spec()
    grid.init_state(tmp_path, spec)
    total = sum(len(spec.keys(t)) * len(spec.settings(t)) for t in grid.TASKS)
    calls: list = []
    ticking = iter(range(10**6))
    budget = 7

    def evaluate(src, task, settings, key):  # each case "takes" one tick of the deadline clock
        next(ticking)
        return fake_evaluate(calls)(src, task, settings, key)

    start = time.time()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(grid_worker.time, "time", lambda: start + len(calls) / 100)
        n1 = grid_worker.run_worker(model, None, tmp_path, "call1", start + budget / 100, log=lambda s: None,
                                    evaluate=evaluate)
    assert n1 == len(calls) and budget <= n1 < budget + 3, "stops at the first case after the deadline"
    n2 = grid_worker.run_worker(model, None, tmp_path, "call2", time.time() + 60, log=lambda s: None,
                         evaluate=fake_evaluate(calls))
    assert n1 + n2 == total and len(calls) == total
    assert len(set(calls)) == total, "a finished case was computed twice"
    assert all(n == len(spec.keys(t)) for t, by in grid.progress(tmp_path, spec).items() for n in by.values())


def test_a_chunk_claimed_by_another_worker_of_the_same_call_is_left_to_it(tmp_path: Path, model) -> None:
    spec = _spec()
    grid.init_state(tmp_path, spec)
    first = grid.plan(spec)[0]
    assert grid.claim(tmp_path, "c", first) and not grid.claim(tmp_path, "c", first)
    calls: list = []
    grid_worker.run_worker(model, None, tmp_path, "c", time.time() + 60, log=lambda s: None, evaluate=fake_evaluate(calls))
    assert not any(t == first.task and k in first.keys for t, s, k in calls)
    assert any(t == first.task for t, s, k in calls), "the other chunks of the task did run"


def test_a_line_cut_by_a_killed_worker_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "qa" / "full" / "00000.jsonl"
    grid.append_record(path, {"key": "a", "official": 1.0})
    with path.open("a") as fh:
        fh.write('{"key": "b", "offi')
    assert list(grid.setting_records(tmp_path, "qa", "full")) == ["a"]


def test_merge_of_a_grid_pairs_by_key_and_a_failing_baseline_is_a_skip_row_with_its_reason(tmp_path: Path,
                                                                                          model) -> None:
    spec = _spec()
    grid.init_state(tmp_path, spec)
    grid_worker.run_worker(model, None, tmp_path, "c", time.time() + 60, log=lambda s: None,
                    evaluate=fake_evaluate(fail="fp8-e4m3"))
    res = quality_merge.merge_grid(tmp_path, {"device": "test"})
    assert "fp8-e4m3" in res["skipped"] and "cannot build its extension" in res["skipped"]["fp8-e4m3"]
    assert (tmp_path / "failed" / "needle__fp8-e4m3.txt").is_file(), "each task's first error is kept"
    row = res["recipes"]["halves-2.5"]
    assert res["n_needles"] == 6 and res["n_qa"] == 10 and row["n_needles"] == 6 and row["n_qa"] == 10
    assert row["needle_acc"] == pytest.approx(4 / 6) and row["full_needle_acc"] == 1.0
    assert row["needle_diff"] == pytest.approx(-2 / 6, abs=1e-4) and row["needle_verdict"] == "WARN", "6 needles cannot tell"
    assert row["qa_f1"] == 50.0 and row["qa_verdict"] == "WARN", "10 QA examples are below the rule's n"
    assert row["kl"] == pytest.approx(0.2) and row["top1"] == pytest.approx(0.8) and row["bits_measured"] == 2.75
    assert row["n_kl_prompts"] == 4 and row["n_kl_positions"] == 8
    assert res["recipes"]["full"]["bits_measured"] == 16.0 and "needle_verdict" not in res["recipes"]["full"]
    assert res["needle_cells"]["halves-2.5"] == {"1024": {"0.5": pytest.approx(2 / 3, abs=1e-4)},
                                                 "2048": {"0.5": pytest.approx(2 / 3, abs=1e-4)}}
    table = quality_merge.readme_table(res)
    assert "| halves-2.5 | 2.75 |" in table and "| fp8-e4m3 | SKIP: qa: RuntimeError" in table


def test_a_recipe_not_run_yet_has_no_verdict(tmp_path: Path, model) -> None:
    spec = _spec(names=("halves-2.5",))
    grid.init_state(tmp_path, spec)
    for key in spec.keys("qa"):
        for s in ("full", "halves-2.5"):
            grid.append_record(tmp_path / "qa" / s / "00000.jsonl", fake_evaluate()(None, "qa", [s], key)[s])
    row = quality_merge.merge_grid(tmp_path)["recipes"]["halves-2.5"]
    assert row["n_needles"] == 0 and row["needle_verdict"] is None and row["needle_acc"] is None
    assert row["kl"] is None and row["qa_verdict"] == "WARN"


def test_unavailable_recipes_are_skip_rows_with_the_reason(tmp_path: Path) -> None:
    from turboquant.models import tiny_config

    hybrid = SimpleNamespace(config=tiny_config("qwen3_5_text", head_dim=64, num_layers=4))
    spec = _spec()
    grid.init_state(tmp_path, spec)
    calls: list = []
    grid_worker.run_worker(hybrid, None, tmp_path, "c", time.time() + 60, log=lambda s: None, evaluate=fake_evaluate(calls))
    assert not any(s == "fp8-e4m3" for _, s, _ in calls)
    res = quality_merge.merge_grid(tmp_path)
    assert "full-attention" in res["skipped"]["fp8-e4m3"] and "fp8-e4m3" not in res["recipes"]


def test_earlier_runner_logs_are_imported_once_and_not_rerun(tmp_path: Path, model) -> None:
    log = tmp_path / "part1.log"
    log.write_text("[1/6] niah_single len=1024 depth=0.5 trial=0 prefill=0.2s full=1.00 halves-2.5=0.00\n"
                   "[2/6] niah_single len=1024 depth=0.5 trial=1 prefill=0.2s full=1.00 halves-2.5=1.00\n"
                   "[3/6] niah_single len=1024 depth=0.9 trial=0 prefill=0.2s full=1.00 halves-2.5=1.00\n"
                   "/tmp/repo/data/squad_qa/examples.jsonl full=0.00 halves-2.5=0.00\n")
    state = tmp_path / "state"
    spec = _spec()
    grid.init_state(state, spec)
    counts = grid.seed_from_logs(state, spec, [log])
    assert counts == {"full": 2, "halves-2.5": 2}, "depth 0.9 is not in this grid"
    assert grid.seed_from_logs(state, spec, [log]) == {}, "imported twice"
    calls: list = []
    grid_worker.run_worker(model, None, state, "c", time.time() + 60, log=lambda s: None, evaluate=fake_evaluate(calls))
    assert ("needle", "full", "L1024-d0.5-t0") not in calls and ("needle", "full", "L2048-d0.5-t0") in calls
    rec = grid.setting_records(state, "needle", "halves-2.5")["L1024-d0.5-t1"]
    assert rec["score"] == 1.0 and rec["source"] == "part1.log"


def test_launcher_resume_reuses_the_state_and_imports_the_logs_once(tmp_path: Path) -> None:
    launcher = _load("quality_gpu_grid")
    args = launcher.parse_args(["--state", str(tmp_path), "--recipes", "halves-3.5", "--needle-trials", "2"])
    spec = launcher.spec_from_args(args)
    first = launcher.prepare(tmp_path, spec, args.seed_logs)
    assert first == {"full": 40, "halves-3.5": 40}, "2 trials x 4 lengths x 5 depths from the H200 logs"
    assert launcher.prepare(tmp_path, spec, args.seed_logs) == {}
    assert json.loads((tmp_path / "seeded").read_text())["imported"] == first
    with pytest.raises(KeyError, match="valid"):
        launcher.spec_from_args(launcher.parse_args(["--recipes", "halves-3.5,int3"]))


def test_plots_of_a_small_result_are_written_as_png(tmp_path: Path, model) -> None:
    from turboquant.eval.quality import save_result

    state = tmp_path / "state"
    grid.init_state(state, _spec())
    grid_worker.run_worker(model, None, state, "c", time.time() + 60, log=lambda s: None, evaluate=fake_evaluate())
    save_result(quality_merge.merge_grid(state, {"device": "test", "date": "2026-12-01"}), tmp_path / "q.json")
    for name in ("q_needle_heatmap.png", "q_vs_bits.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, f"{name}: {len(data)} bytes"


def test_readme_block_is_replaced_between_its_markers_only() -> None:
    text = "intro\n<!-- t:begin -->\nold\n<!-- t:end -->\nrest\n"
    assert quality_merge.replace_marked(text, "t", "| new |") == "intro\n<!-- t:begin -->\n| new |\n<!-- t:end -->\nrest\n"
    with pytest.raises(ValueError, match="expected one <!-- u:begin -->"):
        quality_merge.replace_marked(text, "u", "x")


def test_gpu_tier_tests_and_the_parallel_grid_run_the_same_cases() -> None:
    """`pytest -m gpu` (C09/C10) and benchmarks/quality_gpu_grid.py read one grid (GPU_TIER): the
    needle grid, the 200 QA examples in one order, the 64 KL prompts and every recipe and baseline."""
    here = Path(__file__).parent
    test_needle, test_longbench = _load("_c09", here / "test_needle.py"), _load("_c10", here / "test_longbench.py")
    tier = grid.GPU_TIER
    assert len(tier.needle_cases()) >= 500 and len(tier.qa_examples()) >= 200 and tier.kl_prompts >= 64
    assert test_needle.GPU_GRID == {"lengths": tier.needle_lengths, "depths": tier.needle_depths,
                                    "trials": tier.needle_trials}
    assert set(test_needle.GPU_RECIPES) == set(test_longbench.GPU_RECIPES) == set(GRID_NAMES)
    assert FULL not in GRID_NAMES and {n for n, r in RECIPES.items() if r.in_grid} - {FULL} == set(GRID_NAMES)
    opts = SimpleNamespace(longbench_local_dir=None, longbench_max_examples=None)
    data, _ = test_longbench._qa_data(opts, "gpu")
    ids = [ex.id for exs in data.tasks.values() for ex in exs]
    assert ids == [ex.id for ex in tier.qa_examples()]
    assert [ex.id for ex in test_longbench._kl_examples(data, opts, "gpu")] == [ex.id for ex in tier.kl_examples()]
    bench = _load("quality_gpu_grid")
    assert bench.spec_from_args(bench.parse_args([])) == tier
