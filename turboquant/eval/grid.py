"""A resumable per-case quality grid: every recipe and baseline on needles, QA and next-token KL,
split into chunks that parallel workers claim, so one GPU runs many processes and a second call
continues what the first did not finish.

The grid (:class:`GridSpec`) is a list of cases per task, each with a stable string key:

* ``needle``: ``niah_single`` at lengths x depths x trials, key ``L{len}-d{depth}-t{trial}``, in
  trial-major order (a run cut short covers every cell with fewer trials);
* ``qa``: the SQuAD multi-document QA set (:mod:`turboquant.eval.squad_qa`), key its ``_id``,
  interleaved over (length, gold position) cells;
* ``kl``: evenly spaced QA prompts, key ``p{index}``: teacher-forced next-token KL and top-1 of
  each recipe against full precision (:func:`turboquant.eval.quality.teacher_forced_kl`).

A *chunk* is ``chunk_size`` consecutive cases of one task under a group of settings, run together
case by case so that they share one prefill (``full`` included for needles and QA; KL computes its
full-precision reference in the same call). A worker (:mod:`turboquant.eval.grid_worker`) claims
chunks; records are kept per setting, and paired with full precision by case key at merge time
(``benchmarks/quality_merge.py --grid``).

State directory (plain files, safe to copy between machines)::

    spec.json                          the grid (a resumed call must use the same one)
    <task>/<setting>/<start>.jsonl     one JSON record a finished case (a chunk's file)
    <task>/<setting>/log.jsonl         cases imported from an earlier run's log (seed_from_logs)
    claims/<call>/<chunk>              chunks claimed during one call (O_CREAT | O_EXCL)
    failed/<task>__<setting>.txt       first error of a setting: its remaining cases are skipped
    skipped/<setting>.txt              why a recipe cannot run on the model
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from turboquant.eval import squad_qa
from turboquant.eval.recipes import FULL, GRID_NAMES, get_recipe

TASKS: tuple[str, ...] = ("qa", "kl", "needle")
# recipes whose needle chunks come right after KL, before the baselines' needles: C09's verdict is
# taken on the paper recipe, and their first 238 / 241 needles are already in the H200 logs
EARLY_NEEDLES: tuple[str, ...] = ("paper-3.5", "paper-2.5")
# settings that may compile a native extension at first use (quanto builds its CUDA kernels with
# nvcc): chunks of their own after every other chunk of every task, so a build or its failure holds
# up no other setting (HQQ already stands for transformers' QuantizedCache)
ISOLATED: tuple[str, ...] = ("quanto-int4", "quanto-int2")


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
    chunk_sizes: dict[str, int] = field(default_factory=lambda: {"needle": 10, "qa": 5, "kl": 4})

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


#: The GPU tier's grid: `pytest -m gpu` (C09 ``test_needle_grid_gpu``, C10 ``test_qa_claim_gpu``)
#: and ``benchmarks/quality_gpu_grid.py`` (parallel, resumable) run these cases, every recipe and
#: baseline: 500 needles, 200 QA examples, KL over 64 of them.
GPU_TIER = GridSpec(names=GRID_NAMES)


@dataclass(frozen=True)
class Chunk:
    """Cases ``keys`` (from index ``start``) of ``task``, each under every setting of ``settings``."""

    task: str
    group: int
    settings: tuple[str, ...]
    start: int
    keys: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.task}__g{self.group}__{self.start:05d}"


def plan(spec: GridSpec) -> list[Chunk]:
    """Every chunk, in priority order: QA, KL, the :data:`EARLY_NEEDLES` recipes' needles, the other
    needles, then the :data:`ISOLATED` settings' QA, KL and needles."""
    ranked: list[tuple[int, int, Chunk]] = []
    for ti, task in enumerate(TASKS):
        keys = spec.keys(task)
        size = spec.chunk_sizes[task]
        settings = spec.settings(task)
        early = EARLY_NEEDLES if task == "needle" else ()
        groups = [  # (rank, settings): the rank orders chunks across tasks
            (2 * ti + 1, [s for s in settings if s not in ISOLATED and s not in early]),
            (2 * ti, [s for s in settings if s in early]),
            (10 + ti, [s for s in settings if s in ISOLATED]),
        ]
        for gi, (rank, group) in enumerate(g for g in groups if g[1]):
            ranked += [(rank, start, Chunk(task, gi, tuple(group), start, tuple(keys[start : start + size])))
                       for start in range(0, len(keys), size)]
    return [c for _, _, c in sorted(ranked, key=lambda r: (r[0], r[1]))]


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


def write_reason(state: Path, kind: str, name: str, text: str) -> None:
    path = _reason_file(state, kind, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def init_state(state: Path, spec: GridSpec) -> None:
    """Write ``spec.json``, or check that an existing one describes the same cases (chunk sizes
    may differ: they only split the work; the stored ones are kept)."""
    state = Path(state)
    state.mkdir(parents=True, exist_ok=True)
    path = state / "spec.json"
    if path.is_file():
        old = {k: v for k, v in json.loads(path.read_text(encoding="utf-8")).items() if k != "chunk_sizes"}
        new = {k: v for k, v in spec.to_json().items() if k != "chunk_sizes"}
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
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
