"""One worker of the resumable quality grid (:mod:`turboquant.eval.grid`): claims chunks in plan
order and records every case under every setting of the chunk until a deadline.

Per case, the chunk's settings that have no record yet run together (one shared full-precision
prefill, then each cache decodes: :func:`turboquant.eval.runner.generate_settings`; KL: one
full-precision reference for all, :func:`turboquant.eval.quality.teacher_forced_kl`). When that
raises, each setting is retried alone; one that still fails is written to ``failed/`` with its
error and left out of the rest of the grid, the others go on.

``python -m turboquant.eval.grid_worker --state DIR --call ID --deadline EPOCH [--device cuda]``
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from turboquant.eval import grid
from turboquant.eval.grid import Chunk, GridSpec

QA_MAX_PROMPT_TOKENS = 7500
NEEDLE_TASK = "niah_single"
Evaluate = Callable[[Any, str, Sequence[str], str], dict[str, dict]]


class CaseSource:
    """The model, its tokenizer and the inputs of a case from its key (built on demand)."""

    def __init__(self, model: Any, tokenizer: Any, spec: GridSpec) -> None:
        from turboquant.eval.needle import model_max_positions

        self.model, self.tokenizer, self.spec = model, tokenizer, spec
        self.limit = model_max_positions(model)
        self._qa: dict[str, Any] | None = None
        self._kl: list[Any] | None = None

    def needle(self, key: str) -> Any:
        from turboquant.eval.ruler import get_task

        length, depth, trial = key[1:].split("-")
        return get_task(NEEDLE_TASK).make(self.tokenizer, int(length), float(depth[1:]), int(trial[1:]),
                                          seed=self.spec.seed, max_positions=self.limit)

    def qa(self, key: str) -> Any:
        if self._qa is None:
            self._qa = {ex.id: ex for ex in self.spec.qa_examples()}
        return self._qa[key]

    def kl_prompt(self, key: str) -> tuple[str, list[int]]:
        from turboquant.eval.longbench import build_prompt_ids

        if self._kl is None:
            self._kl = self.spec.kl_examples()
        ex = self._kl[int(key[1:])]
        return ex.id, build_prompt_ids(self.tokenizer, ex, QA_MAX_PROMPT_TOKENS)[0]


def evaluate_case(src: CaseSource, task: str, settings: Sequence[str], key: str) -> dict[str, dict]:
    """One case under ``settings`` -> ``{setting: record}`` (scores, output, timings)."""
    from turboquant.eval.recipes import recipe_cache_factory
    from turboquant.eval.runner import generate_settings

    model, tok = src.model, src.tokenizer
    t0 = time.perf_counter()
    out: dict[str, dict] = {}
    if task == "needle":
        from turboquant.eval.ruler import get_task

        case = src.needle(key)
        run = generate_settings(model, tok, case.input_ids, list(settings), recipe_cache_factory(model),
                                get_task(NEEDLE_TASK).max_new_tokens)
        for s, gen in run.generations.items():
            out[s] = {"length": case.context_tokens, "depth": case.depth, "trial": case.trial,
                      "n_tokens": case.n_tokens, "output": gen.text, "score": case.score(gen.text),
                      "prefill_s": round(run.prefill_seconds, 3), "seconds": round(gen.seconds, 3)}
    elif task == "qa":
        from turboquant.eval.longbench import MAX_NEW_TOKENS, build_prompt_ids
        from turboquant.eval.metrics import score_example

        ex = src.qa(key)
        ids, truncated = build_prompt_ids(tok, ex, QA_MAX_PROMPT_TOKENS)
        max_new = MAX_NEW_TOKENS[ex.dataset]
        if src.limit is not None and len(ids) + max_new > src.limit:
            raise ValueError(f"{key}: prompt of {len(ids)} tokens + {max_new} exceeds the context {src.limit}")
        run = generate_settings(model, tok, ids, list(settings), recipe_cache_factory(model), max_new)
        for s, gen in run.generations.items():
            out[s] = {"n_tokens": len(ids), "truncated": truncated, "output": gen.text, "answers": list(ex.answers),
                      "official": score_example(ex.dataset, gen.text, ex.answers, ex.all_classes),
                      "containment": score_example(ex.dataset, gen.text, ex.answers, ex.all_classes,
                                                   metric="containment"),
                      "prefill_s": round(run.prefill_seconds, 3), "seconds": round(gen.seconds, 3)}
    elif task == "kl":
        from turboquant.eval.quality import teacher_forced_kl

        example_id, ids = src.kl_prompt(key)
        res = teacher_forced_kl(model, [ids], list(settings), n_tokens=src.spec.kl_tokens)
        seconds = round((time.perf_counter() - t0) / max(1, len(settings)), 3)
        for s in settings:
            out[s] = {"example": example_id, "n_tokens": len(ids), "kl": res[s]["kl"], "top1": res[s]["top1"],
                      "bits_measured": res[s]["bits_measured"], "positions": res[s]["n_positions"],
                      "seconds": seconds}
    else:
        raise ValueError(f"unknown grid task {task!r}; valid: {list(grid.TASKS)}")
    return {s: {"key": key, "setting": s, **rec} for s, rec in out.items()}


def _record_path(state: Path, chunk: Chunk, setting: str) -> Path:
    return state / chunk.task / grid.slug(setting) / f"{chunk.start:05d}.jsonl"


def _live(state: Path, chunk: Chunk) -> list[str]:
    """The chunk's settings that can still run (not skipped on this model, not failed)."""
    return [s for s in chunk.settings
            if not grid.skip_reason(state, s) and grid.failure(state, chunk.task, s) is None]


def _missing(state: Path, chunk: Chunk) -> dict[str, list[str]]:
    """``{key: [settings without a record]}`` for the chunk's keys (empty when it is done)."""
    done = {s: set(grid.setting_records(state, chunk.task, s)) for s in _live(state, chunk)}
    out = {}
    for key in chunk.keys:
        todo = [s for s in done if key not in done[s]]
        if todo:
            out[key] = todo
    return out


def _run_case(state: Path, src: Any, chunk: Chunk, key: str, settings: list[str], evaluate: Evaluate,
              log: Callable[[str], None]) -> dict[str, dict]:
    """All settings together; on an error each alone, writing ``failed/`` for those that fail."""
    try:
        return evaluate(src, chunk.task, settings, key)
    except Exception:  # noqa: BLE001  (find which setting cannot run here, keep the others)
        if len(settings) == 1:
            errors = {settings[0]: traceback.format_exc()}
            recs: dict[str, dict] = {}
        else:
            recs, errors = {}, {}
            for s in settings:
                try:
                    recs.update(evaluate(src, chunk.task, [s], key))
                except Exception:  # noqa: BLE001
                    errors[s] = traceback.format_exc()
        for s, tb in errors.items():
            last = tb.strip().splitlines()[-1]
            grid.write_reason(state, "failed", f"{chunk.task}__{grid.slug(s)}", f"{last}\n\n{tb}")
            log(f"[failed] {chunk.task} {s} at {key}: {last}")
        return recs


def run_worker(model: Any, tokenizer: Any, state: Path, call: str, deadline: float,
               log: Callable[[str], None] = print, evaluate: Evaluate = evaluate_case) -> int:
    """Claim pending chunks of this call in plan order and record their cases until ``deadline``
    (epoch seconds, checked before every case). Returns the number of records written."""
    from turboquant.eval.recipes import available

    state = Path(state)
    spec = grid.load_spec(state)
    _, skipped = available(list(spec.names), model.config)
    for name, reason in skipped.items():
        grid.write_reason(state, "skipped", grid.slug(name), reason)
    src = CaseSource(model, tokenizer, spec)
    written = 0
    for chunk in grid.plan(spec):
        if time.time() >= deadline:
            break
        if not _missing(state, chunk) or not grid.claim(state, call, chunk):
            continue
        for key, settings in _missing(state, chunk).items():
            settings = [s for s in settings if s in _live(state, chunk)]
            if not settings:
                continue
            if time.time() >= deadline:
                log(f"[deadline] {chunk.name} stopped before {key}")
                return written
            recs = _run_case(state, src, chunk, key, settings, evaluate, log)
            for s, rec in recs.items():
                grid.append_record(_record_path(state, chunk, s), rec)
                written += 1
            log(f"[{chunk.task}] {key} " + " ".join(
                f"{s}={r.get('score', r.get('official', r.get('kl'))):.4f}" for s, r in recs.items()))
    return written


def main(argv: Sequence[str] | None = None) -> None:
    """One worker: load the embedded model, then :func:`run_worker`."""
    import argparse

    import torch

    ap = argparse.ArgumentParser(description="one worker of the resumable quality grid")
    ap.add_argument("--state", required=True)
    ap.add_argument("--call", required=True)
    ap.add_argument("--deadline", type=float, required=True, help="epoch seconds")
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--model-id", default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from turboquant.models import load_model

    lm = load_model(args.model_id, device=args.device)
    n = run_worker(lm.model, lm.tokenizer, Path(args.state), args.call, args.deadline,
                   log=lambda s: print(s, flush=True))
    print(f"[worker done] {n} records", flush=True)


if __name__ == "__main__":
    main()
