"""Quality of every recipe and baseline on the same cases: needles, multi-document QA, next-token KL.

* :func:`needle_run` / :func:`qa_run`: real ``generate`` under each named cache
  (:mod:`turboquant.eval.recipes`) with the runner's shared prefill; per-case scores.
* :func:`paired_scores`: per-case scores of one recipe and of ``full`` on the same cases, in the
  same order (the input of :func:`turboquant.verdicts.decide`).
* :func:`teacher_forced_kl`: for each prompt, the first ``len - n_tokens`` tokens are prefilled
  exactly (one shared ``DynamicCache``) and transplanted into each cache; the last ``n_tokens`` are
  then fed one at a time (decode steps over the compressed history). Per position
  ``KL(p_full || p_recipe) = sum_v p_full(v) (log p_full(v) - log p_recipe(v))`` and top-1
  agreement ``argmax p_full == argmax p_recipe``, ``p_full`` from the full-precision decode of the
  same tokens. Also the measured bits a coordinate of each cache after the prompt.
* :func:`shuffled_control`: the scorer applied to each output against *another* case's references
  (a negative control: a scorer that always returns 1 would score 1 here too).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from turboquant.eval.recipes import FULL, recipe_cache_factory


def needle_run(model: Any, tokenizer: Any, names: Sequence[str], lengths: Sequence[int], depths: Sequence[float],
               trials: int, seed: int = 0, log: Callable[[str], None] | None = None) -> dict:
    """``run_task_grid("niah_single", ...)`` with every named cache (``full`` first)."""
    from turboquant.eval.runner import run_task_grid

    settings = list(dict.fromkeys([FULL, *names]))
    return run_task_grid(model, tokenizer, "niah_single", lengths, depths, trials, settings,
                         cache_factory=recipe_cache_factory(model), seed=seed, log=log)


def qa_run(model: Any, tokenizer: Any, data: Any, names: Sequence[str], max_prompt_tokens: int = 7500,
           max_new_tokens_cap: int | None = None, log: Callable[[str], None] | None = None) -> tuple[list[dict], dict]:
    """``longbench.evaluate`` with every named cache; records carry ``official`` per case (0-1)."""
    from turboquant.eval.longbench import evaluate

    settings = list(dict.fromkeys([FULL, *names]))
    return evaluate(model, tokenizer, data, settings, recipe_cache_factory(model), max_prompt_tokens,
                    max_new_tokens_cap=max_new_tokens_cap, log=log)


def _case_key(r: dict) -> tuple:
    return tuple(r.get(k) for k in ("task", "dataset", "id", "length", "depth", "trial"))


def paired_scores(records: Sequence[dict], name: str, score_key: str = "score") -> tuple[list[float], list[float]]:
    """(recipe scores, full scores) over the cases both have, in the records' case order."""
    full = {_case_key(r): float(r[score_key]) for r in records if r["setting"] == FULL}
    comp = {_case_key(r): float(r[score_key]) for r in records if r["setting"] == name}
    if not comp:
        raise ValueError(f"no records for {name!r}; have {sorted({r['setting'] for r in records})}")
    keys = [k for k in comp if k in full]
    if len(keys) != len(comp):
        raise ValueError(f"{len(comp) - len(keys)} case(s) of {name!r} have no full-precision pair")
    return [comp[k] for k in keys], [full[k] for k in keys]


def shuffled_control(records: Sequence[dict], score: Callable[[str, Any, dict], float], targets_key: str,
                     setting: str = FULL) -> float:
    """Mean ``score(output, references, row)`` of each output of ``setting`` against the references
    of the next case of the same task / dataset (cyclic)."""
    rows = [r for r in records if r["setting"] == setting]
    groups: dict[Any, list[dict]] = {}
    for r in rows:
        groups.setdefault(r.get("dataset", r.get("task")), []).append(r)
    vals = []
    for group in groups.values():
        if len(group) < 2:
            continue
        vals += [score(group[i]["output"], group[(i + 1) % len(group)][targets_key], group[i]) for i in range(len(group))]
    if not vals:
        raise ValueError("the shuffled control needs at least 2 cases of one task")
    return sum(vals) / len(vals)


@torch.inference_mode()
def teacher_forced_kl(model: Any, prompts: Sequence[Sequence[int]], names: Sequence[str], n_tokens: int = 16,
                      log: Callable[[str], None] | None = None) -> dict:
    """Next-token KL and top-1 agreement against full precision (see the module docstring).

    Returns ``{name: {"kl", "top1", "kl_per_prompt", "top1_per_prompt", "bits_measured",
    "n_prompts", "n_positions"}}`` (means over positions, then prompts)."""
    from transformers import DynamicCache

    from turboquant.baselines import kv_bits
    from turboquant.eval.runner import _kv_layers, attention_context, cache_argument, transplant

    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
    factory = recipe_cache_factory(model)
    device = next(model.parameters()).device
    cache_kw = cache_argument(model)
    names = list(dict.fromkeys([FULL, *names]))
    out = {n: {"kl_per_prompt": [], "top1_per_prompt": [], "bits": []} for n in names}
    for i, prompt in enumerate(prompts):
        if len(prompt) <= n_tokens:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens; needs more than n_tokens={n_tokens}")
        ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
        head, tail = ids[:, :-n_tokens], ids[:, -n_tokens:]
        base = DynamicCache(config=model.config)
        model(input_ids=head, **{cache_kw: base}, use_cache=True, logits_to_keep=1)
        prefilled = _kv_layers(base)
        del base
        logp: dict[str, torch.Tensor] = {}
        t0 = time.perf_counter()
        for name in names:
            cache = transplant(prefilled, factory(name))
            steps = []
            with attention_context(model, cache):
                for t in range(n_tokens):
                    logits = model(input_ids=tail[:, t : t + 1], **{cache_kw: cache}, use_cache=True).logits[0, -1]
                    steps.append(torch.log_softmax(logits.float(), -1))
            logp[name] = torch.stack(steps)
            out[name]["bits"].append(kv_bits(cache)["bits_per_coordinate"])
            del cache
        ref = logp[FULL]
        for name in names:
            kl = (ref.exp() * (ref - logp[name])).sum(-1).clamp(min=0)
            top1 = (ref.argmax(-1) == logp[name].argmax(-1)).float()
            out[name]["kl_per_prompt"].append(float(kl.mean()))
            out[name]["top1_per_prompt"].append(float(top1.mean()))
        if log is not None:
            log(f"[kl {i + 1}/{len(prompts)}] {ids.shape[1]} tokens {time.perf_counter() - t0:.1f}s " + " ".join(
                f"{n}={out[n]['kl_per_prompt'][-1]:.4f}" for n in names))
    result = {}
    for name, v in out.items():
        bits = [b for b in v["bits"] if b is not None]
        result[name] = {
            "kl": sum(v["kl_per_prompt"]) / len(prompts),
            "top1": sum(v["top1_per_prompt"]) / len(prompts),
            "kl_per_prompt": v["kl_per_prompt"],
            "top1_per_prompt": v["top1_per_prompt"],
            "bits_measured": sum(bits) / len(bits) if bits else None,
            "n_prompts": len(prompts),
            "n_positions": len(prompts) * n_tokens,
        }
    return result


@torch.inference_mode()
def measured_bits(model: Any, prompt: Sequence[int], names: Sequence[str]) -> dict[str, float | None]:
    """Bits a coordinate each named cache holds after receiving ``prompt``'s exact prefill (the same
    ``cache.update`` calls as a prefill), from :func:`turboquant.baselines.kv_bits`."""
    from transformers import DynamicCache

    from turboquant.baselines import kv_bits
    from turboquant.eval.runner import _kv_layers, cache_argument, transplant

    device = next(model.parameters()).device
    base = DynamicCache(config=model.config)
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    model(input_ids=ids, **{cache_argument(model): base}, use_cache=True, logits_to_keep=1)
    prefilled = _kv_layers(base)
    factory = recipe_cache_factory(model)
    return {n: kv_bits(transplant(prefilled, factory(n)))["bits_per_coordinate"] for n in names}


def package_versions(names: Sequence[str]) -> dict[str, str | None]:
    """Installed version of each distribution (None when absent), e.g. the baselines' packages."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = None
    return out


def save_result(result: dict, out: str | Path) -> None:
    """Write a quality result (``benchmarks/quality.py``'s JSON) and its two plots beside it:
    ``<stem>_needle_heatmap.png`` (one panel a recipe) and ``<stem>_vs_bits.png``."""
    import json

    from turboquant.eval.plots import draw_needle_heatmap, draw_quality_vs_bits

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    stem = out.with_suffix("")
    if result.get("needle_cells"):  # files written before the cells were kept have none
        draw_needle_heatmap(result["needle_cells"], Path(f"{stem}_needle_heatmap.png"),
                            f"Needle in a haystack per recipe ({result['meta']['device']})")
    draw_quality_vs_bits(result, Path(f"{stem}_vs_bits.png"))
