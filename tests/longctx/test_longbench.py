"""C10: long-context QA with LongBench's official metrics, full precision vs every recipe and
baseline through real caches and ``generate``, judged by the decision rule (paired bootstrap).

Evidence: real text. Default: the shipped SQuAD v2 multi-document QA set (``data/squad_qa``,
:mod:`turboquant.eval.squad_qa`: real Wikipedia paragraphs and human questions, 1k-7k tokens,
``qa_f1_score``); CPU uses a deterministic subset, the GPU tier the 200 of ``grid.GPU_TIER``.
``--longbench-local-dir`` points at the official LongBench-E files (THUDM/LongBench
``data/*_e.jsonl``) instead. The shipped fictional fixture ``data/longbench_e`` is loader test
data only. ``--longbench-max-examples`` and ``--longbench-max-prompt-tokens`` are the seed's flags.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from turboquant.eval import squad_qa
from turboquant.eval.claim_rows import decide_and_file, skip_rows
from turboquant.eval.grid import GPU_TIER
from turboquant.eval.longbench import build_prompt_ids, evaluate, load_longbench_e
from turboquant.eval.metrics import score_example
from turboquant.eval.quality import (
    measured_bits,
    paired_scores,
    qa_run,
    shuffled_control,
    teacher_forced_kl,
)
from turboquant.eval.recipes import available, claim_recipe, get_recipe
from turboquant.eval.runner import default_cache_factory

DEFAULT_MAX_PROMPT_TOKENS = 7500  # LongBench truncates to the model's window; SmolLM2 has 8192
MARGIN_POINTS = 1.0  # DESIGN.md C10: non-inferiority at 1 point on the 0-100 scale
# CPU subset of the SQuAD set: 1k and 2k tokens x 5 gold positions x 3 questions = 30 examples.
CPU_SUBSET = {"lengths": (1024, 2048), "per_cell": 3}
CPU_RECIPES = ("K4/V3",)  # every recipe and baseline: GPU tier and benchmarks/quality.py
GPU_RECIPES = GPU_TIER.names  # the GPU tier: the cases of turboquant.eval.grid.GPU_TIER (200 QA, KL over 64)
KL_PROMPTS = {"cpu": 4, "gpu": GPU_TIER.kl_prompts}
KL_TOKENS = GPU_TIER.kl_tokens
MAX_SHUFFLED_F1 = 0.2  # negative control: F1 against another question's answers (0-1)


@pytest.mark.model
def test_longbench_prompt_truncation_real_tokenizer(lc_lm: SimpleNamespace, longbench_fixture_dir: Path) -> None:
    tok = lc_lm.tokenizer
    ex = load_longbench_e(longbench_fixture_dir, datasets=["hotpotqa"]).tasks["hotpotqa"][0]
    full_ids, truncated = build_prompt_ids(tok, ex, 100_000)
    assert not truncated
    ids, truncated = build_prompt_ids(tok, ex, 200)
    assert truncated and len(ids) < 200 + 40, f"truncated prompt has {len(ids)} tokens (limit 200 + chat template)"
    text = tok.decode(ids)
    # head (instructions) and tail (question) survive; the middle of the passages is dropped
    assert "Answer the question based on the given passages" in text and ex.input in text
    assert len(ids) < len(full_ids)


@pytest.mark.model
def test_longbench_bad_input(lc_lm: SimpleNamespace, longbench_fixture_dir: Path) -> None:
    data = load_longbench_e(longbench_fixture_dir, datasets=["hotpotqa"], max_examples=1)
    with pytest.raises(ValueError, match="exceeds the model's maximum context 8192"):
        evaluate(lc_lm.model, lc_lm.tokenizer, data, ["full"], default_cache_factory(lc_lm.model), max_prompt_tokens=10_000)


@pytest.mark.synthetic
def test_squad_qa_set_is_real_text_with_the_gold_paragraph_in_every_context() -> None:
    data = squad_qa.load()
    examples = data.tasks[squad_qa.DATASET]
    assert len(examples) >= 200, f"the GPU tier needs >= 200 QA examples, the set has {len(examples)}"
    rows = squad_qa._read_jsonl(squad_qa.DATA_DIR / "examples.jsonl")
    pars = {r["pid"]: r for r in squad_qa._read_jsonl(squad_qa.DATA_DIR / "paragraphs.jsonl")}
    cells = {(r["target_tokens"], r["gold_position"]) for r in rows}
    assert cells == {(n, p) for n in squad_qa.LENGTHS for p in squad_qa.POSITIONS}
    for ex, row in zip(examples, rows):
        gold = row["passages"][row["gold_index"]]
        assert pars[gold]["text"] in ex.context, f"{ex.id}: gold paragraph missing from the context"
        assert any(a in pars[gold]["text"] for a in ex.answers), f"{ex.id}: no answer in the gold paragraph"
        others = {pid.split("p")[0] for pid in row["passages"] if pid != gold}
        assert gold.split("p")[0] not in others, f"{ex.id}: a distractor comes from the gold article"
    sub = squad_qa.load(lengths=CPU_SUBSET["lengths"], per_cell=CPU_SUBSET["per_cell"])
    assert len(sub) == 30 and sub.tasks[squad_qa.DATASET][0].id == examples[0].id
    with pytest.raises(ValueError, match=r"lengths \[3000\] are not in the set; available: \[1024"):
        squad_qa.load(lengths=[3000])
    with pytest.raises(FileNotFoundError, match="python -m turboquant.eval.squad_qa --squad"):
        squad_qa.load("/nonexistent")


@pytest.mark.model
def test_squad_qa_builder_is_deterministic_and_matches_the_shipped_files(lc_lm: SimpleNamespace, tmp_path: Path) -> None:
    source = Path("/work/squad/dev-v2.0.json")
    if not source.is_file():
        pytest.skip(f"SQuAD v2 dev not at {source}; {squad_qa.BUILD_HINT}")
    squad_qa.write(squad_qa.build(source, lc_lm.tokenizer), tmp_path)
    for name in ("examples.jsonl", "paragraphs.jsonl"):
        assert (tmp_path / name).read_bytes() == (squad_qa.DATA_DIR / name).read_bytes(), f"{name} differs on rebuild"


def _qa_data(opts: SimpleNamespace, tier: str):
    if opts.longbench_local_dir:
        data = load_longbench_e(opts.longbench_local_dir, max_examples=int(opts.longbench_max_examples or 0) or None)
        return data, f"LongBench-E files in {opts.longbench_local_dir}"
    if tier == "cpu":
        data = squad_qa.load(**CPU_SUBSET)
    else:  # the GPU tier's 200 examples, in the grid's interleaved order (a cut run covers every cell)
        data = squad_qa.load(lengths=GPU_TIER.qa_lengths, per_cell=GPU_TIER.qa_per_cell)
        data.tasks = {squad_qa.DATASET: GPU_TIER.qa_examples()}
    if opts.longbench_max_examples:
        data.tasks = {k: v[: int(opts.longbench_max_examples)] for k, v in data.tasks.items()}
    return data, f"SQuAD v2 multi-document QA (data/squad_qa, {tier} set)"


def _kl_examples(data, opts: SimpleNamespace, tier: str) -> list:
    """The KL prompts: the GPU tier's (spread evenly over the QA set, as the grid picks them), else
    the first examples."""
    examples = [ex for exs in data.tasks.values() for ex in exs]
    if tier == "gpu" and not opts.longbench_local_dir and not opts.longbench_max_examples:
        return GPU_TIER.kl_examples()
    return examples[: KL_PROMPTS[tier]]


def _qa_claim(claim, lm: SimpleNamespace, opts: SimpleNamespace, tier: str, recipes: tuple[str, ...]) -> None:
    config = lm.model.config
    bits = f"{float(opts.longbench_required_bits):g}"
    primary, note = claim_recipe(opts, bits, config)
    names, skipped = available(list(dict.fromkeys([primary, *recipes])), config)
    data, source = _qa_data(opts, tier)
    max_prompt = int(opts.longbench_max_prompt_tokens or DEFAULT_MAX_PROMPT_TOKENS)
    claim.setting(source=source, datasets=list(data.tasks), n_examples=len(data), recipes=["full", *names],
                  verdict_recipe=primary, max_prompt_tokens=max_prompt, greedy=True, shared_prefill=True,
                  model=opts.model_id or "SmolLM2-135M-Instruct (embedded GGUF)", seed=0,
                  kl_prompts=KL_PROMPTS[tier], kl_tokens=KL_TOKENS)
    records, summary = qa_run(lm.model, lm.tokenizer, data, names, max_prompt, log=print)
    prompts = [build_prompt_ids(lm.tokenizer, ex, max_prompt)[0] for ex in _kl_examples(data, opts, tier)]
    kl = teacher_forced_kl(lm.model, prompts, names, n_tokens=KL_TOKENS, log=print)
    bits_measured = measured_bits(lm.model, prompts[0], names)
    claim.measured(official_avg={s: summary[s]["official_avg"] for s in summary},
                   containment_avg={s: summary[s]["containment_avg"] for s in summary},
                   kl={n: kl[n]["kl"] for n in kl}, top1={n: kl[n]["top1"] for n in kl},
                   recipes_skipped=skipped, problems=data.problems)
    claim.threshold(rule="non-inferiority of the verdict recipe, paired bootstrap 95% interval", margin_points=MARGIN_POINTS,
                    scale="0-100 per-example official metric", verdict_recipe=primary, shuffled_control_max=MAX_SHUFFLED_F1)
    if note:
        claim.note(note)
    out = opts.out_dir / f"C10_qa_records_{tier}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "records": records, "kl": kl}, indent=1))
    verdicts = {}
    for n in names:
        comp, full = paired_scores(records, n, "official")
        verdicts[n] = decide_and_file(
            claim, n, [100 * c for c in comp], [100 * f for f in full], MARGIN_POINTS, kind="continuous", score_range=100.0,
            primary=n == primary, qa_f1=summary[n]["official_avg"], kl=kl[n]["kl"], top1=kl[n]["top1"],
            bits_measured=bits_measured[n], family=get_recipe(n).family)
    skip_rows(claim.record.measured, skipped)
    # negative control: each output scored against another example's answers must score low
    shuffled = shuffled_control(records, lambda out, answers, row: score_example(row["dataset"], out, answers),
                                "answers")
    full_f1 = summary["full"]["official_avg"] / 100
    claim.measured(shuffled_control_f1=shuffled)
    assert shuffled <= MAX_SHUFFLED_F1, f"QA scorer gives F1 {shuffled:.3f} on shuffled answers: it cannot tell"
    assert full_f1 > shuffled, f"full-precision F1 {full_f1:.3f} <= shuffled control {shuffled:.3f}: no signal"
    v = verdicts[primary]
    assert v.status != "FAIL", f"{primary}: {v.reason}"


@pytest.mark.model
@pytest.mark.claim("C10", "long-context QA: TurboQuant 3.5-bit within 1 point of full precision (official metric)")
def test_qa_claim_cpu(claim, lc_lm: SimpleNamespace, tq_options: SimpleNamespace) -> None:
    _qa_claim(claim, lc_lm, tq_options, "cpu", CPU_RECIPES)


@pytest.mark.gpu
@pytest.mark.claim("C10", "long-context QA: TurboQuant 3.5-bit within 1 point of full precision (official metric)")
def test_qa_claim_gpu(claim, cuda_lm, tq_options: SimpleNamespace) -> None:
    _qa_claim(claim, cuda_lm, tq_options, "gpu", GPU_RECIPES)


