"""C09: needle in a haystack over lengths x depths x trials, full precision vs every recipe and
baseline of ``turboquant.eval.recipes`` through real caches and ``generate``; the verdict by the
decision rule (``turboquant.verdicts``, binary: exact interval) on the paper's recipe when it runs,
else on halves-<bits>; plus the generator's contract.

CPU (``-m model``): the embedded SmolLM2-135M on a CI-sized grid. GPU (``-m gpu``): the embedded
model's full 8k grid with more trials (or ``--model-id`` where its weights are on disk), same code.
Seed flags: ``--needle-context-tokens``, ``--needle-positions``, ``--needle-trials`` (comma lists /
int) override either grid; ``--needle-required-bits`` picks the bit width held to the threshold.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from turboquant.eval.claim_rows import decide_and_file, skip_rows
from turboquant.eval.grid import GPU_TIER
from turboquant.eval.needle import (
    NEEDLE,
    check_context_tokens,
    check_depth,
    make_needle_case,
    needle_grid,
    parse_float_list,
    parse_int_list,
    score_all,
)
from turboquant.eval.quality import measured_bits, needle_run, paired_scores, shuffled_control
from turboquant.eval.recipes import available, claim_recipe, get_recipe
from turboquant.eval.runner import needle_settings, run_task_grid

# Grids declared once. CPU: one key/value per cell (9 per setting) because the compressed decode
# costs seconds a token on 2 CPU cores (the run took 1199 s on a machine shared with 3-4 other
# heavy processes; see results/longctx_summary_cpu.md); more trials with --needle-trials.
# GPU: the embedded model's full 8k context, 4 keys/values per cell.
CPU_GRID = {"lengths": (1024, 2048, 4096), "depths": (0.1, 0.5, 0.9), "trials": 1}
# GPU: the grid of turboquant.eval.grid.GPU_TIER (4 lengths x 5 depths x 25 trials = 500 needles), the
# cases benchmarks/quality_gpu_grid.py runs in parallel (results/quality_gpu.json), every recipe.
GPU_GRID = {"lengths": GPU_TIER.needle_lengths, "depths": GPU_TIER.needle_depths, "trials": GPU_TIER.needle_trials}
CPU_RECIPES = ("halves-2.5", "K4/V3", "paper-2.5")  # baselines: GPU tier and benchmarks/quality.py
GPU_RECIPES = GPU_TIER.names
SEED = 0
# DESIGN.md C09: non-inferiority at margin 0.02 (turboquant.verdicts, exact interval: PASS needs
# >= 217 needles even when no needle changes, so the 9-needle CPU grid is WARN inconclusive by
# design); 2.5 bits WARN below full - 0.1. The full-precision baseline must work (>= 0.9) and the
# scorer must score shuffled values low, so the comparison means something.
REQUIRED_MARGIN = 0.02
MAX_SHUFFLED_SCORE = 0.1
WARN_MARGIN_2_5 = 0.1
MIN_FULL_ACCURACY = 0.9


def grid_from_options(opts: SimpleNamespace, default: dict) -> dict:
    return {
        "lengths": parse_int_list(opts.needle_context_tokens, default["lengths"]),
        "depths": parse_float_list(opts.needle_positions, default["depths"]),
        "trials": int(opts.needle_trials) if opts.needle_trials is not None else default["trials"],
    }


# ------------------------------------------------------------------------------------------------
# generator contract (real tokenizer)


@pytest.mark.model
def test_needle_prompt_length_depth_and_determinism(lc_lm: SimpleNamespace) -> None:
    tok = lc_lm.tokenizer
    for n, d in [(1024, 0.0), (2048, 0.5), (4096, 1.0)]:
        case = make_needle_case(tok, n, d, trial=0, seed=SEED, max_positions=8192)
        assert n - 40 <= case.n_tokens <= n, f"prompt has {case.n_tokens} tokens for a {n}-token request"
        text = tok.decode(list(case.input_ids))
        needle = NEEDLE.format(key=case.meta["key"], value=case.meta["value"])
        assert text.count(needle) == 1, f"needle sentence not found once in the {n}-token prompt"
        # depth: the needle's token offset is at the requested fraction of the prompt (template aside)
        assert abs(case.actual_depth - d) < 0.06, f"depth {d} -> needle at {case.actual_depth:.3f} of the prompt"
        assert case == make_needle_case(tok, n, d, trial=0, seed=SEED, max_positions=8192), "not deterministic"
    grid = needle_grid(tok, [1024], [0.5], trials=3, seed=SEED)
    assert len({c.meta["value"] for c in grid}) == 3, "trials of one cell must use different values"


@pytest.mark.model
def test_needle_bad_input(lc_lm: SimpleNamespace) -> None:
    tok = lc_lm.tokenizer
    with pytest.raises(ValueError, match=r"depth must be in \[0, 1\], got 1.5"):
        make_needle_case(tok, 1024, 1.5, 0)
    with pytest.raises(ValueError, match=r"depth must be in \[0, 1\], got -0.1"):
        needle_grid(tok, [1024], [0.5, -0.1], trials=1)
    with pytest.raises(ValueError, match="exceeds the model's maximum context 8192"):
        needle_grid(tok, [1024, 9000], [0.5], trials=1, max_positions=8192)
    with pytest.raises(ValueError, match="too short"):
        make_needle_case(tok, 40, 0.5, 0)
    with pytest.raises(ValueError, match="trials must be >= 1"):
        run_task_grid(lc_lm.model, tok, "niah_single", [1024], [0.5], 0, ["full"])
    with pytest.raises(ValueError, match="maximum context"):
        run_task_grid(lc_lm.model, tok, "niah_single", [8192], [0.5], 1, ["full"])
    with pytest.raises(KeyError, match="available: .*niah_single"):
        run_task_grid(lc_lm.model, tok, "niah", [1024], [0.5], 1, ["full"])


@pytest.mark.synthetic
def test_scoring_and_option_parsing() -> None:
    assert score_all(" 1840686.", ["1840686"]) == 1.0
    assert score_all(" 184068.", ["1840686"]) == 0.0  # a dropped digit is a miss
    assert score_all("1, 2 and 4", ["1", "2", "3", "4"]) == 0.75
    assert parse_int_list("1024, 2k,4K", []) == [1024, 2048, 4096]
    assert parse_int_list(None, (1, 2)) == [1, 2]
    assert parse_float_list("0.1,0.5", []) == [0.1, 0.5]
    assert check_depth(0) == 0.0 and check_context_tokens(8192, 8192) == 8192
    assert needle_settings("3.5") == ["full", "3.5", "2.5"] and needle_settings("2.5") == ["full", "2.5"]
    with pytest.raises(ValueError, match="unknown cache setting"):
        needle_settings("three")


# ------------------------------------------------------------------------------------------------
# C09


def _needle_claim(claim, lm: SimpleNamespace, opts: SimpleNamespace, grid: dict, name: str,
                  recipes: tuple[str, ...]) -> None:
    """Every recipe and baseline on the same needles; the verdict (decision rule, binary: exact
    interval) on the paper's recipe at the required bits when it runs, else on halves-<bits>."""
    config = lm.model.config
    bits = f"{float(opts.needle_required_bits):g}"
    primary, note = claim_recipe(opts, bits, config)
    names, skipped = available(list(dict.fromkeys([primary, *recipes])), config)
    claim.setting(
        seed=SEED, grid=name, task="niah_single", lengths=grid["lengths"], depths=grid["depths"],
        trials_per_cell=grid["trials"], recipes=["full", *names], verdict_recipe=primary,
        model=opts.model_id or "SmolLM2-135M-Instruct (embedded GGUF)", shared_prefill=True,
        cache="recipes of turboquant.eval.recipes (TurboQuant: residual window 16, turboquant attention)",
    )
    result = needle_run(lm.model, lm.tokenizer, names, grid["lengths"], grid["depths"], grid["trials"],
                        seed=SEED, log=print)
    records = result["records"]
    first = next(r for r in records if r["setting"] == "full")
    case0 = make_needle_case(lm.tokenizer, first["length"], first["depth"], first["trial"], seed=SEED,
                             max_positions=8192)
    bits_measured = measured_bits(lm.model, case0.input_ids, names)
    acc = result["accuracy"]
    claim.measured(**{
        f"accuracy_{name}": acc,
        f"cells_{name}": result["cells"],
        f"n_per_setting_{name}": result["n_trials"],
        f"seconds_{name}": round(result["seconds"], 1),
        "recipes_skipped": skipped,
    })
    claim.threshold(rule="non-inferiority of the verdict recipe, exact 95% interval of the paired difference",
                    margin=REQUIRED_MARGIN, verdict_recipe=primary, warn_2_5_below=f"full - {WARN_MARGIN_2_5}",
                    full_min=MIN_FULL_ACCURACY, shuffled_control_max=MAX_SHUFFLED_SCORE)
    if note:
        claim.note(note)
    verdicts = {}
    for n in names:
        comp, full_scores = paired_scores(records, n)
        verdicts[n] = decide_and_file(claim, n, comp, full_scores, REQUIRED_MARGIN, kind="binary",
                                      primary=n == primary, needle_acc=acc[n], bits_measured=bits_measured[n],
                                      family=get_recipe(n).family)
    skip_rows(claim.record.measured, skipped)
    out = opts.out_dir / f"C09_needle_records_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    full = acc["full"]
    for n in names:
        if get_recipe(n).nominal_bits == 2.5 and bits != "2.5" and acc[n] < full - WARN_MARGIN_2_5:
            claim.warn(f"{n} needle accuracy {acc[n]:.3f} < full {full:.3f} - {WARN_MARGIN_2_5}")
    # negative control: the scorer against another needle's value must score (near) zero
    if result["n_trials"] >= 2:  # one needle cannot be shuffled (and its verdict is WARN anyway)
        shuffled = shuffled_control(records, lambda out, targets, row: score_all(out, targets), "targets")
        claim.measured(shuffled_control_score=shuffled)
        assert shuffled <= MAX_SHUFFLED_SCORE, f"needle scorer gives {shuffled:.3f} on shuffled values: it cannot tell"
    assert full >= MIN_FULL_ACCURACY, (
        f"full-precision needle accuracy {full:.3f} < {MIN_FULL_ACCURACY} over {result['n_trials']} trials: "
        f"the baseline does not work, so the comparison means nothing (cells {result['cells']['full']})"
    )
    v = verdicts[primary]
    assert v.status != "FAIL", f"{primary}: {v.reason} (cells {result['cells'][primary]})"


@pytest.mark.model
@pytest.mark.claim("C09", "needle in a haystack: TurboQuant 3.5-bit matches full precision over a grid")
def test_needle_grid_cpu(claim, lc_lm: SimpleNamespace, tq_options: SimpleNamespace) -> None:
    _needle_claim(claim, lc_lm, tq_options, grid_from_options(tq_options, CPU_GRID), "cpu", CPU_RECIPES)


@pytest.mark.gpu
@pytest.mark.claim("C09", "needle in a haystack: TurboQuant 3.5-bit matches full precision over a grid")
def test_needle_grid_gpu(claim, cuda_lm, tq_options: SimpleNamespace) -> None:
    _needle_claim(claim, cuda_lm, tq_options, grid_from_options(tq_options, GPU_GRID), "gpu", GPU_RECIPES)


@pytest.mark.model
@pytest.mark.slow
def test_shared_prefill_equals_from_scratch_generate(lc_lm: SimpleNamespace) -> None:
    """The shared-prefill shortcut gives the same answers as a from-scratch ``generate`` with each
    cache (full precision and TurboQuant 3.5-bit) on a 1k-token needle prompt."""
    from turboquant.eval.runner import default_cache_factory, generate_settings

    case = make_needle_case(lc_lm.tokenizer, 1024, 0.5, trial=0, seed=SEED, max_positions=8192)
    factory = default_cache_factory(lc_lm.model)
    args = (lc_lm.model, lc_lm.tokenizer, case.input_ids, ["full", "3.5"], factory, 8)
    shared = generate_settings(*args, share_prefill=True)
    scratch = generate_settings(*args, share_prefill=False)
    assert shared.shared_prefill and not scratch.shared_prefill
    for s in ("full", "3.5"):
        a, b = shared.generations[s].text, scratch.generations[s].text
        assert a == b, f"{s}: shared prefill gave {a!r}, from-scratch generate gave {b!r}"
