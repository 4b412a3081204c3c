"""RULER-style variants (multi-key, multi-value, variable tracking): generator contracts with the
real tokenizer, and a small model run under full precision and TurboQuant (C09's rule applied to
the variants' mean score; ``slow``: not in the default CI selection)."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest

from turboquant.eval.ruler import available_tasks, get_task, register_task
from turboquant.eval.runner import needle_settings, run_task_grid

VARIANTS = ("niah_multikey", "niah_multivalue", "vt")
RULER_GRID = {"lengths": (1024,), "depths": (0.25, 0.75), "trials": 1}
REQUIRED_MARGIN = 0.02  # C09's threshold, not loosened


@pytest.mark.synthetic
def test_registry() -> None:
    assert set(VARIANTS) | {"niah_single"} <= set(available_tasks())
    with pytest.raises(KeyError, match="available: .*niah_multikey"):
        get_task("niah_multi")
    with pytest.raises(ValueError, match="already registered"):
        register_task("vt", 10)(lambda *a, **k: None)


@pytest.mark.model
@pytest.mark.parametrize("task", VARIANTS)
def test_variant_cases(lc_lm: SimpleNamespace, task: str) -> None:
    tok = lc_lm.tokenizer
    spec = get_task(task)
    case = spec.make(tok, 1024, 0.5, 0, seed=0, max_positions=8192)
    text = tok.decode(list(case.input_ids))
    assert 984 <= case.n_tokens <= 1024, f"{task}: {case.n_tokens} tokens for a 1024-token request"
    assert case == spec.make(tok, 1024, 0.5, 0, seed=0, max_positions=8192), f"{task} is not deterministic"
    for target in case.targets:
        assert target in text, f"{task}: target {target!r} is not in the prompt"
    # a perfect answer scores 1, an empty one 0, half of the targets 0.5 (string_match_all)
    assert case.score(" ".join(case.targets)) == 1.0 and case.score("") == 0.0
    if task == "niah_multikey":
        assert len(case.meta["distractors"]) == 3
        for value in case.meta["distractors"].values():
            assert value in text and case.score(value) == 0.0, "a distractor's value must not score"
    if task == "niah_multivalue":
        assert len(case.targets) == 4 and case.score(" ".join(case.targets[:2])) == 0.5
    if task == "vt":
        chain = case.meta["chain"]
        positions = [text.index(f"VAR {name} =") for name in chain]
        assert positions == sorted(positions), "each variable must be assigned before it is used"
        assert re.search(rf"VAR {chain[0]} = {case.meta['value']}\.", text)
    with pytest.raises(ValueError, match=r"depth must be in \[0, 1\]"):
        spec.make(tok, 1024, 2.0, 0)
    with pytest.raises(ValueError, match="maximum context 8192"):
        spec.make(tok, 10_000, 0.5, 0, max_positions=8192)


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.claim("C09", "needle in a haystack: TurboQuant 3.5-bit matches full precision over a grid")
def test_ruler_variants_on_model(claim, lc_lm: SimpleNamespace, tq_options: SimpleNamespace) -> None:
    settings = needle_settings(tq_options.needle_required_bits, report_bits=())
    required = settings[1]
    claim.setting(ruler_grid=RULER_GRID, ruler_tasks=list(VARIANTS), ruler_settings=settings)
    results = {
        task: run_task_grid(lc_lm.model, lc_lm.tokenizer, task, RULER_GRID["lengths"], RULER_GRID["depths"],
                            RULER_GRID["trials"], settings, seed=0, log=print)
        for task in VARIANTS
    }
    per_task = {t: r["accuracy"] for t, r in results.items()}
    mean = {s: sum(per_task[t][s] for t in VARIANTS) / len(VARIANTS) for s in settings}
    claim.threshold(ruler_required_min=f"mean over variants: full - {REQUIRED_MARGIN}")
    claim.measured(ruler_accuracy=per_task, ruler_mean=mean,
                   ruler_seconds=round(sum(r["seconds"] for r in results.values()), 1))
    out = tq_options.out_dir / "C09_ruler_records.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({t: r["records"] for t, r in results.items()}, indent=1))
    assert mean[required] >= mean["full"] - REQUIRED_MARGIN, (
        f"RULER variants: {required}-bit mean score {mean[required]:.3f} < full {mean['full']:.3f} - "
        f"{REQUIRED_MARGIN} (per task {per_task})"
    )
