"""LongBench-style multi-document QA built from SQuAD v2 dev (real Wikipedia text, human questions).

Each example is one answerable SQuAD question; its context is the question's gold paragraph
among distractor paragraphs drawn from *other* articles, in LongBench's 2wikimqa / hotpotqa layout
(``Passage k:\\n{title}\\n{text}``), filled up to a target length in tokens of the model's tokenizer
(about 1k / 2k / 4k / 7k) with the gold passage at a set relative position (0, 0.25, 0.5, 0.75, 1).
The prompt is LongBench's multi-document QA prompt and the score LongBench's ``qa_f1_score`` (max
over the reference answers), registered as dataset ``squad_mdqa``.

What ships (``data/squad_qa/``, CC BY-SA 4.0 like SQuAD itself, see ATTRIBUTION.md):
``paragraphs.jsonl`` (the SQuAD paragraphs the examples use: id, article title, text) and
``examples.jsonl`` (question, answers, the ordered passage ids, target length, gold position). The
builder (:func:`build`, ``python -m turboquant.eval.squad_qa --squad dev-v2.0.json``) is
deterministic: the same SQuAD file, tokenizer and seed give the same files.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from turboquant.eval.longbench import LongBenchData, LongBenchExample

DATASET = "squad_mdqa"
DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "squad_qa"
LENGTHS: tuple[int, ...] = (1024, 2048, 4096, 7168)
POSITIONS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
PER_CELL = 12  # 4 lengths x 5 positions x 12 = 240 examples
SEED = 0
PROMPT_OVERHEAD = 120  # template + question + chat tokens kept free below the target length
SOURCE = ("chrischute/squad", "data/dev-v2.0.json", "85623adeb9e6639f145081fea9cae2d8f3a26379")
BUILD_HINT = (
    "build it with `python -m turboquant.eval.squad_qa --squad /path/to/dev-v2.0.json --out data/squad_qa` "
    "(SQuAD v2 dev: github.com/chrischute/squad, data/dev-v2.0.json, CC BY-SA 4.0)"
)


@dataclass(frozen=True)
class Paragraph:
    pid: str
    title: str
    text: str


def read_squad(path: str | Path) -> tuple[list[Paragraph], list[dict]]:
    """Paragraphs (id ``a{article}p{paragraph}``) and answerable questions of a SQuAD v2 json."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SQuAD file {str(path)!r} not found; {BUILD_HINT}")
    raw = json.loads(path.read_text(encoding="utf-8"))
    if raw.get("version") != "v2.0" or not isinstance(raw.get("data"), list):
        raise ValueError(f"{path}: not a SQuAD v2.0 file (version {raw.get('version')!r})")
    paragraphs, questions = [], []
    for ai, article in enumerate(raw["data"]):
        title = article["title"].replace("_", " ")
        for pi, par in enumerate(article["paragraphs"]):
            pid = f"a{ai}p{pi}"
            paragraphs.append(Paragraph(pid, title, par["context"].strip()))
            for qa in par["qas"]:
                answers = list(dict.fromkeys(a["text"].strip() for a in qa["answers"]))
                if not qa.get("is_impossible") and answers:
                    questions.append({"qid": qa["id"], "pid": pid, "article": ai, "question": qa["question"].strip(),
                                      "answers": answers})
    return paragraphs, questions


def passage_text(index: int, par: Paragraph) -> str:
    """LongBench 2wikimqa layout of one passage."""
    return f"Passage {index}:\n{par.title}\n{par.text}"


def build(squad_path: str | Path, tokenizer: Any, lengths: Sequence[int] = LENGTHS,
          positions: Sequence[float] = POSITIONS, per_cell: int = PER_CELL, seed: int = SEED) -> dict:
    """Deterministic examples: for every (length, position) cell ``per_cell`` distinct questions,
    each with distractors from other articles up to ``length - PROMPT_OVERHEAD`` context tokens."""
    paragraphs, questions = read_squad(squad_path)
    by_id = {p.pid: p for p in paragraphs}
    ntok = {p.pid: len(tokenizer(passage_text(99, p) + "\n\n", add_special_tokens=False)["input_ids"])
            for p in paragraphs}
    rng = random.Random(seed)
    order = list(range(len(questions)))
    rng.shuffle(order)
    examples, used, k = [], set(), 0
    for length in lengths:
        budget = length - PROMPT_OVERHEAD
        for pos in positions:
            for _ in range(per_cell):
                q = questions[order[k]]
                k += 1
                pool = [p.pid for p in paragraphs if not p.pid.startswith(f"a{q['article']}p")]
                rng.shuffle(pool)
                chosen, total = [], ntok[q["pid"]]
                for pid in pool:
                    if total + ntok[pid] > budget:
                        continue
                    chosen.append(pid)
                    total += ntok[pid]
                    if total > budget - 40:
                        break
                gold_at = round(pos * len(chosen))
                passages = chosen[:gold_at] + [q["pid"]] + chosen[gold_at:]
                used.update(passages)
                examples.append({
                    "_id": f"{DATASET}-{length}-{pos:g}-{q['qid']}", "qid": q["qid"], "input": q["question"],
                    "answers": q["answers"], "passages": passages, "gold_index": gold_at,
                    "gold_position": pos, "target_tokens": length, "context_tokens": total,
                })
    return {"examples": examples, "paragraphs": [by_id[p] for p in sorted(used, key=_pid_key)]}


def _pid_key(pid: str) -> tuple[int, int]:
    a, p = pid[1:].split("p")
    return int(a), int(p)


def write(built: dict, out_dir: str | Path) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "paragraphs.jsonl").open("w", encoding="utf-8") as fh:
        for p in built["paragraphs"]:
            fh.write(json.dumps({"pid": p.pid, "title": p.title, "text": p.text}, ensure_ascii=False) + "\n")
    with (out / "examples.jsonl").open("w", encoding="utf-8") as fh:
        for ex in built["examples"]:
            fh.write(json.dumps(ex, ensure_ascii=False) + "\n")


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"SQuAD multi-document QA file {str(path)!r} not found; {BUILD_HINT}")
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load(data_dir: str | Path = DATA_DIR, lengths: Sequence[int] | None = None,
         per_cell: int | None = None) -> LongBenchData:
    """The shipped set as :class:`LongBenchData` (dataset ``squad_mdqa``); ``lengths`` keeps only
    those target lengths, ``per_cell`` the first ``per_cell`` examples of each (length, position)."""
    root = Path(data_dir)
    pars = {r["pid"]: Paragraph(r["pid"], r["title"], r["text"]) for r in _read_jsonl(root / "paragraphs.jsonl")}
    rows = _read_jsonl(root / "examples.jsonl")
    if lengths is not None:
        known = sorted({r["target_tokens"] for r in rows})
        bad = [n for n in lengths if n not in known]
        if bad:
            raise ValueError(f"squad_qa lengths {bad} are not in the set; available: {known}")
        rows = [r for r in rows if r["target_tokens"] in lengths]
    if per_cell is not None:
        if per_cell < 1:
            raise ValueError(f"per_cell must be >= 1, got {per_cell}")
        seen: dict[tuple, int] = {}
        kept = []
        for r in rows:
            cell = (r["target_tokens"], r["gold_position"])
            seen[cell] = seen.get(cell, 0) + 1
            if seen[cell] <= per_cell:
                kept.append(r)
        rows = kept
    examples = []
    for r in rows:
        context = "\n\n".join(passage_text(i + 1, pars[pid]) for i, pid in enumerate(r["passages"]))
        examples.append(LongBenchExample(
            dataset=DATASET, input=r["input"], context=context, answers=tuple(r["answers"]),
            length=len(context.split()), all_classes=None, id=r["_id"], source=f"{root}/examples.jsonl",
        ))
    return LongBenchData(tasks={DATASET: examples})


def embedded_tokenizer() -> Any:
    """The embedded SmolLM2 tokenizer (offline), whose token counts set the target lengths."""
    from transformers import AutoTokenizer

    from turboquant.models import resolve_source

    source, extra = resolve_source(None)
    return AutoTokenizer.from_pretrained(source, local_files_only=True, **extra)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Build the SQuAD v2 multi-document QA set (deterministic)")
    ap.add_argument("--squad", required=True, help="path to SQuAD v2 dev-v2.0.json")
    ap.add_argument("--out", default=str(DATA_DIR))
    ap.add_argument("--per-cell", type=int, default=PER_CELL)
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args(argv)
    built = build(args.squad, embedded_tokenizer(), per_cell=args.per_cell, seed=args.seed)
    write(built, args.out)
    print(f"{len(built['examples'])} examples, {len(built['paragraphs'])} paragraphs -> {args.out}")


if __name__ == "__main__":
    main()
