"""A resumable per-case quality grid: every recipe and baseline on needles, QA and next-token KL,
split into chunks that parallel workers claim, so one GPU runs many processes and a second call
continues what the first did not finish.

The grid (:class:`GridSpec`) is a list of cases per task, each with a stable string key:

* ``needle``: ``niah_single`` at lengths x depths x trials, key ``L{len}-d{depth}-t{trial}``, in
  trial-major order (a run cut short covers every cell with fewer trials);
* ``qa``: the SQuAD multi-document QA set (:mod:`turboquant.eval.squad_qa`), key its ``_id``,
  interleaved over (length, gold position) cells;
* ``kl``: evenly spaced QA prompts, key ``p{index}``: teacher-forced next-token KL and top-1 of one
  recipe against full precision (:func:`turboquant.eval.quality.teacher_forced_kl`).

A *chunk* is ``chunk_size`` consecutive cases of one task under one setting (``full`` included for
needles and QA; KL computes its full-precision reference in the same call). Pairing is by case key
at merge time (:mod:`benchmarks.quality_merge`), so the full-precision run happens once a grid.

State directory (plain files, safe to copy between machines)::

    spec.json                          the grid (a resumed call must use the same one)
    <task>/<setting>/<start>.jsonl     one JSON record a finished case (a chunk's file)
    <task>/<setting>/log.jsonl         cases imported from an earlier run's log (seed_from_logs)
    claims/<call>/<chunk>              chunks claimed during one call (O_CREAT | O_EXCL)
    failed/<task>__<setting>.txt       first error of a setting: its remaining chunks are skipped
    skipped/<setting>.txt              why a recipe cannot run on the model
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from turboquant.eval import squad_qa
from turboquant.eval.recipes import FULL, get_recipe

TASKS: tuple[str, ...] = ("qa", "kl", "needle")
NEEDLE_TASK = "niah_single"
QA_MAX_PROMPT_TOKENS = 7500
# recipes whose needle chunks come after every other needle chunk (slowest on CUDA, and their
# first 238 / 241 needles are already in the H200 logs)
LATE_NEEDLES: tuple[str, ...] = ("paper-3.5", "paper-2.5")


def slug(setting: str) -> str:
    """File-system name of a setting (``K4/V3`` -> ``K4_V3``)."""
    return setting.replace("/", "_")


def needle_key(length: int, depth: float, trial: int) -> str:
    return f"L{int(length)}-d{float(depth):g}-t{int(trial)}"


@dataclass(frozen=True)
class GridSpec:
    """The cases of each task and the recipes run on them (``names`` excludes ``full``)."""

    names: tuple[str, ...]
    needle_lengths: tuple[int, ...] = (1024, 2048, 4096, 7680)
    needle_depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    needle_trials: int = 25
    qa_lengths: tuple[int, ...] = squad_qa.LENGTHS
    qa_per_cell: int = 10
    kl_prompts: int = 64
    kl_tokens: int = 16
    seed: int = 0
    chunk_sizes: dict[str, int] = field(default_factory=lambda: {"needle": 25, "qa": 10, "kl": 8})

    def __post_init__(self) -> None:
        for n in self.names:
            get_recipe(n)  # unknown names raise listing the valid ones
        if FULL in self.names:
            raise ValueError("`names`: list recipes and baselines only; `full` is always run")
        for task in TASKS:
            if self.chunk_sizes.get(task, 0) < 1:
                raise ValueError(f"`chunk_sizes[{task!r}]` must be >= 1, got {self.chunk_sizes.get(task)}")
        if self.needle_trials < 1 or self.qa_per_cell < 1 or self.kl_prompts < 1 or self.kl_tokens < 1:
            raise ValueError("needle_trials, qa_per_cell, kl_prompts and kl_tokens must be >= 1")

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_json(cls, data: dict) -> GridSpec:
        tuples = ("names", "needle_lengths", "needle_depths", "qa_lengths")
        return cls(**{k: tuple(v) if k in tuples else v for k, v in data.items()})

    def needle_cases(self) -> list[tuple[int, float, int]]:
        """(length, depth, trial), trial-major."""
        return [(n, d, t) for t in range(self.needle_trials) for n in self.needle_lengths for d in self.needle_depths]

    def qa_examples(self) -> list[Any]:
        """The QA examples, interleaved over (length, position) cells: example ``k`` of every cell,
        then ``k + 1``."""
        examples = squad_qa.load(lengths=self.qa_lengths, per_cell=self.qa_per_cell).tasks[squad_qa.DATASET]
        rank: dict[tuple, int] = {}
        order = []
        for i, ex in enumerate(examples):
            cell = ex.id.rsplit("-", 1)[0]
            rank[cell] = rank.get(cell, -1) + 1
            order.append((rank[cell], i))
        return [examples[i] for _, i in sorted(order)]

    def kl_examples(self) -> list[Any]:
        """``kl_prompts`` QA examples spread evenly over the (interleaved) QA set."""
        examples = self.qa_examples()
        if self.kl_prompts > len(examples):
            raise ValueError(f"kl_prompts {self.kl_prompts} exceeds the {len(examples)} QA examples")
        step = len(examples) / self.kl_prompts
        return [examples[int(i * step)] for i in range(self.kl_prompts)]

    def keys(self, task: str) -> list[str]:
        """Case keys of ``task`` in run order."""
        if task == "needle":
            return [needle_key(*c) for c in self.needle_cases()]
        if task == "qa":
            return [ex.id for ex in self.qa_examples()]
        if task == "kl":
            return [f"p{i}" for i in range(self.kl_prompts)]
        raise ValueError(f"unknown grid task {task!r}; valid: {list(TASKS)}")

    def settings(self, task: str) -> list[str]:
        return list(self.names) if task == "kl" else [FULL, *self.names]


@dataclass(frozen=True)
class Chunk:
    task: str
    setting: str
    start: int
    keys: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.task}__{slug(self.setting)}__{self.start:05d}"


def plan(spec: GridSpec) -> list[Chunk]:
    """Every chunk, in priority order: QA (all settings), KL, needles, then :data:`LATE_NEEDLES`
    needles; within a task, chunk ``k`` of every setting before chunk ``k + 1``."""
    out: list[Chunk] = []
    for task in TASKS:
        keys = spec.keys(task)
        size = spec.chunk_sizes[task]
        groups = [spec.settings(task)]
        if task == "needle":
            early = [s for s in groups[0] if s not in LATE_NEEDLES]
            groups = [early, [s for s in groups[0] if s in LATE_NEEDLES]]
        for group in groups:
            for start in range(0, len(keys), size):
                out += [Chunk(task, s, start, tuple(keys[start : start + size])) for s in group]
    return out


# ---------------------------------------------------------------------------------------------
# state files


def read_records(path: Path) -> list[dict]:
    """Complete JSON lines of a records file (a line cut by a killed process is dropped)."""
    out = []
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def setting_records(state: Path, task: str, setting: str) -> dict[str, dict]:
    """``{key: record}`` of one task and setting over all its files (first record of a key wins)."""
    out: dict[str, dict] = {}
    folder = Path(state) / task / slug(setting)
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        for rec in read_records(path):
            out.setdefault(rec["key"], rec)
    return out


def append_record(path: Path, record: dict) -> None:
    """One line, written and flushed in a single call."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def claim(state: Path, call: str, chunk: Chunk) -> bool:
    """True for the one worker of this call that creates the chunk's claim file."""
    path = Path(state) / "claims" / call / chunk.name
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _reason_file(state: Path, kind: str, name: str) -> Path:
    return Path(state) / kind / f"{name}.txt"


def failure(state: Path, task: str, setting: str) -> str | None:
    path = _reason_file(state, "failed", f"{task}__{slug(setting)}")
    return path.read_text(encoding="utf-8") if path.is_file() else None


def skip_reason(state: Path, setting: str) -> str | None:
    path = _reason_file(state, "skipped", slug(setting))
    return path.read_text(encoding="utf-8").strip() if path.is_file() else None


def _write_reason(state: Path, kind: str, name: str, text: str) -> None:
    path = _reason_file(state, kind, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def init_state(state: Path, spec: GridSpec) -> None:
    """Write ``spec.json``, or check that an existing one describes the same grid."""
    state = Path(state)
    state.mkdir(parents=True, exist_ok=True)
    path = state / "spec.json"
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old != spec.to_json():
            diff = sorted(k for k in set(old) | set(spec.to_json()) if old.get(k) != spec.to_json().get(k))
            raise ValueError(f"{path} holds another grid (differs in {diff}); resume with the same grid "
                             f"or use a fresh --state directory")
        return
    path.write_text(json.dumps(spec.to_json(), indent=1), encoding="utf-8")


def load_spec(state: Path) -> GridSpec:
    path = Path(state) / "spec.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a grid state directory (benchmarks/quality_gpu_grid.py "
                                f"creates it)")
    return GridSpec.from_json(json.loads(path.read_text(encoding="utf-8")))


def progress(state: Path, spec: GridSpec) -> dict[str, dict[str, int]]:
    """``{task: {setting: finished cases}}``."""
    out: dict[str, dict[str, int]] = {}
    for task in TASKS:
        keys = set(spec.keys(task))
        out[task] = {s: len(keys & set(setting_records(state, task, s))) for s in spec.settings(task)}
    return out


def parse_runner_log(text: str) -> dict[str, dict[str, float]]:
    """``{setting: {needle key: score}}`` from the runner's per-case lines
    (``[i/N] niah_single len=L depth=D trial=T prefill=..s full=1.00 <recipe>=0.00``)."""
    import re

    line_re = re.compile(r"^\[(\d+)/(\d+)\] niah_single len=(\d+) depth=([\d.]+) trial=(\d+) prefill=\S+ (.*)$")
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        m = line_re.match(line.strip())
        if not m:
            continue
        key = needle_key(int(m.group(3)), float(m.group(4)), int(m.group(5)))
        for item in m.group(6).split():
            name, _, score = item.rpartition("=")
            out.setdefault(name, {})[key] = float(score)
    return out


def seed_from_logs(state: Path, spec: GridSpec, logs: Sequence[Path]) -> dict[str, int]:
    """Import needle outcomes printed by an earlier run (:func:`parse_runner_log`) into
    ``needle/<setting>/log.jsonl`` so the grid skips them (keys and settings of this grid only;
    a key already imported is kept). Returns ``{setting: cases imported}``."""
    keys = set(spec.keys("needle"))
    wanted = set(spec.settings("needle"))
    counts: dict[str, int] = {}
    for log in logs:
        for setting, scores in parse_runner_log(Path(log).read_text(encoding="utf-8")).items():
            if setting not in wanted:
                continue
            have = setting_records(state, "needle", setting)
            path = Path(state) / "needle" / slug(setting) / "log.jsonl"
            for key, score in scores.items():
                if key in keys and key not in have:
                    length, depth, trial = key[1:].split("-")
                    append_record(path, {"key": key, "setting": setting, "length": int(length),
                                         "depth": float(depth[1:]), "trial": int(trial[1:]), "score": score,
                                         "source": Path(log).name})
                    have[key] = {}
                    counts[setting] = counts.get(setting, 0) + 1
    return counts


# ---------------------------------------------------------------------------------------------
# the worker


class CaseSource:
    """Builds the inputs of a case from its key (needle prompts are made on demand)."""

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


def evaluate_case(src: CaseSource, task: str, setting: str, key: str) -> dict:
    """One case under one setting -> its record (scores, output, timings)."""
    from turboquant.eval.recipes import recipe_cache_factory
    from turboquant.eval.runner import generate_settings

    model, tok = src.model, src.tokenizer
    t0 = time.perf_counter()
    if task == "needle":
        from turboquant.eval.ruler import get_task

        case = src.needle(key)
        run = generate_settings(model, tok, case.input_ids, [setting], recipe_cache_factory(model),
                                get_task(NEEDLE_TASK).max_new_tokens)
        gen = run.generations[setting]
        rec = {"length": case.context_tokens, "depth": case.depth, "trial": case.trial, "n_tokens": case.n_tokens,
               "output": gen.text, "score": case.score(gen.text)}
    elif task == "qa":
        from turboquant.eval.longbench import MAX_NEW_TOKENS, build_prompt_ids
        from turboquant.eval.metrics import score_example

        ex = src.qa(key)
        ids, truncated = build_prompt_ids(tok, ex, QA_MAX_PROMPT_TOKENS)
        max_new = MAX_NEW_TOKENS[ex.dataset]
        if src.limit is not None and len(ids) + max_new > src.limit:
            raise ValueError(f"{key}: prompt of {len(ids)} tokens + {max_new} exceeds the context {src.limit}")
        run = generate_settings(model, tok, ids, [setting], recipe_cache_factory(model), max_new)
        gen = run.generations[setting]
        rec = {"n_tokens": len(ids), "truncated": truncated, "output": gen.text, "answers": list(ex.answers),
               "official": score_example(ex.dataset, gen.text, ex.answers, ex.all_classes),
               "containment": score_example(ex.dataset, gen.text, ex.answers, ex.all_classes, metric="containment")}
    elif task == "kl":
        from turboquant.eval.quality import teacher_forced_kl

        example_id, ids = src.kl_prompt(key)
        res = teacher_forced_kl(model, [ids], [setting], n_tokens=src.spec.kl_tokens)[setting]
        rec = {"example": example_id, "n_tokens": len(ids), "kl": res["kl"], "top1": res["top1"],
               "bits_measured": res["bits_measured"], "positions": res["n_positions"]}
    else:
        raise ValueError(f"unknown grid task {task!r}; valid: {list(TASKS)}")
    return {"key": key, "setting": setting, **rec, "seconds": round(time.perf_counter() - t0, 3)}


def pending(state: Path, chunks: Sequence[Chunk]) -> Iterator[tuple[Chunk, list[str]]]:
    """Chunks with cases not yet recorded (and whose setting has not failed), with those keys."""
    cache: dict[tuple[str, str], set[str]] = {}
    for chunk in chunks:
        if failure(state, chunk.task, chunk.setting) is not None or skip_reason(state, chunk.setting):
            continue
        ident = (chunk.task, chunk.setting)
        if ident not in cache:
            cache[ident] = set(setting_records(state, *ident))
        missing = [k for k in chunk.keys if k not in cache[ident]]
        if missing:
            yield chunk, missing


def run_worker(model: Any, tokenizer: Any, state: Path, call: str, deadline: float,
               log: Callable[[str], None] = print, evaluate: Callable[..., dict] = evaluate_case) -> int:
    """Claim pending chunks of this call in plan order and record their cases until ``deadline``
    (epoch seconds; checked before every case). Returns the number of cases recorded."""
    from turboquant.eval.recipes import available

    state = Path(state)
    spec = load_spec(state)
    _, skipped = available(list(spec.names), model.config)
    for name, reason in skipped.items():
        _write_reason(state, "skipped", slug(name), reason)
    src = CaseSource(model, tokenizer, spec)
    done = 0
    for chunk, missing in pending(state, plan(spec)):
        if time.time() >= deadline:
            break
        if not claim(state, call, chunk):
            continue
        path = state / chunk.task / slug(chunk.setting) / f"{chunk.start:05d}.jsonl"
        for key in missing:
            if time.time() >= deadline:
                log(f"[deadline] {chunk.name} stopped before {key}")
                return done
            try:
                rec = evaluate(src, chunk.task, chunk.setting, key)
            except Exception as exc:  # noqa: BLE001  (a setting that cannot run here: record why)
                _write_reason(state, "failed", f"{chunk.task}__{slug(chunk.setting)}",
                              f"{type(exc).__name__}: {exc}\n\n{traceback.format_exc()}")
                log(f"[failed] {chunk.name} at {key}: {type(exc).__name__}: {exc}")
                break
            append_record(path, rec)
            done += 1
            score = rec.get("score", rec.get("official", rec.get("kl")))
            log(f"[{chunk.task}] {chunk.setting} {key} {score:.4f} {rec['seconds']:.2f}s")
    return done


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m turboquant.eval.grid --state DIR --call ID --deadline EPOCH [--device cuda]``:
    one worker (loads the embedded model, then :func:`run_worker`)."""
    import argparse

    import torch

    ap = argparse.ArgumentParser(description="one worker of the resumable quality grid")
    ap.add_argument("--state", required=True)
    ap.add_argument("--call", required=True)
    ap.add_argument("--deadline", type=float, required=True, help="epoch seconds")
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--model-id", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from turboquant.models import load_model

    lm = load_model(args.model_id, device=args.device)
    n = run_worker(lm.model, lm.tokenizer, Path(args.state), args.call, args.deadline,
                   log=lambda s: print(s, flush=True))
    print(f"[worker done] {n} cases", flush=True)


if __name__ == "__main__":
    main()
