"""LongBench-E: loader for the official jsonl files, prompt templates, head+tail truncation.

The official files (THUDM/LongBench, ``data/{dataset}_e.jsonl``) hold one JSON object a line with
the fields ``input, context, answers, length, dataset, language, all_classes, _id``. ``length`` is
the context length in words; LongBench-E scores per bucket ``0-4k`` / ``4-8k`` / ``8k+``.

Prompts are LongBench's ``config/dataset2prompt.json`` and generation lengths its
``config/dataset2maxlen.json``. A prompt longer than ``max_prompt_tokens`` keeps its first and
last ``max_prompt_tokens // 2`` tokens (LongBench ``pred.py``: the middle is dropped because the
instructions sit at both ends). Chat models get their chat template except on the few-shot and
code tasks, as in LongBench.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LONGBENCH_E_DATASETS: tuple[str, ...] = (
    "qasper",
    "multifieldqa_en",
    "hotpotqa",
    "2wikimqa",
    "gov_report",
    "multi_news",
    "trec",
    "triviaqa",
    "samsum",
    "passage_count",
    "passage_retrieval_en",
    "lcc",
    "repobench-p",
)

# LongBench config/dataset2prompt.json (English tasks), verbatim, typos included.
PROMPTS: dict[str, str] = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the question asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "qasper": "You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "hotpotqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "2wikimqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "musique": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ",
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    # this project's SQuAD v2 multi-document QA (turboquant.eval.squad_qa): LongBench's multi-doc QA prompt
    "squad_mdqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

# LongBench config/dataset2maxlen.json (English tasks).
MAX_NEW_TOKENS: dict[str, int] = {
    "narrativeqa": 128,
    "qasper": 128,
    "multifieldqa_en": 64,
    "hotpotqa": 32,
    "2wikimqa": 32,
    "musique": 32,
    "gov_report": 512,
    "qmsum": 512,
    "multi_news": 512,
    "trec": 64,
    "triviaqa": 32,
    "samsum": 128,
    "passage_count": 32,
    "passage_retrieval_en": 32,
    "lcc": 64,
    "repobench-p": 64,
    "squad_mdqa": 32,
}

# Tasks on which LongBench does not wrap the prompt in the chat template.
NO_CHAT_DATASETS = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})

LENGTH_BUCKETS: tuple[str, ...] = ("0-4k", "4-8k", "8k+")
REQUIRED_FIELDS: dict[str, type | tuple[type, ...]] = {
    "input": str,
    "context": str,
    "answers": list,
    "length": int,
    "dataset": str,
    "all_classes": (list, type(None)),
    "_id": str,
}


class LongBenchFormatError(ValueError):
    """A line of a LongBench jsonl file is not a valid record; the message names file and line."""


@dataclass(frozen=True)
class LongBenchExample:
    """One LongBench-E record (``answers`` and ``all_classes`` as tuples)."""

    dataset: str
    input: str
    context: str
    answers: tuple[str, ...]
    length: int
    all_classes: tuple[str, ...] | None
    id: str
    source: str = ""  # "file:line"

    @property
    def bucket(self) -> str:
        return length_bucket(self.length)


@dataclass
class LongBenchData:
    """Examples per dataset, plus the problems met when lines were skipped (``on_error="skip"``)."""

    tasks: dict[str, list[LongBenchExample]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return sum(len(v) for v in self.tasks.values())


def length_bucket(length: int) -> str:
    """LongBench-E bucket of a context length in words: <4000, <8000, else 8k+."""
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    if length < 4000:
        return "0-4k"
    if length < 8000:
        return "4-8k"
    return "8k+"


def parse_record(line: str, where: str) -> LongBenchExample:
    """Parse and validate one jsonl line; errors name ``where`` (``file:line``)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise LongBenchFormatError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise LongBenchFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in REQUIRED_FIELDS if k not in obj]
    if missing:
        raise LongBenchFormatError(f"{where}: missing field(s) {missing}; a LongBench-E record has {list(REQUIRED_FIELDS)}")
    for key, typ in REQUIRED_FIELDS.items():
        if not isinstance(obj[key], typ) or (typ is int and isinstance(obj[key], bool)):
            raise LongBenchFormatError(f"{where}: field {key!r} must be {_type_names(typ)}, got {type(obj[key]).__name__}")
    answers = obj["answers"]
    if not answers or not all(isinstance(a, str) for a in answers):
        raise LongBenchFormatError(f"{where}: field 'answers' must be a non-empty list of strings")
    classes = obj["all_classes"]
    if classes is not None and not all(isinstance(c, str) for c in classes):
        raise LongBenchFormatError(f"{where}: field 'all_classes' must be null or a list of strings")
    if obj["length"] < 0:
        raise LongBenchFormatError(f"{where}: field 'length' must be >= 0, got {obj['length']}")
    return LongBenchExample(
        dataset=obj["dataset"],
        input=obj["input"],
        context=obj["context"],
        answers=tuple(answers),
        length=obj["length"],
        all_classes=tuple(classes) if classes is not None else None,
        id=obj["_id"],
        source=where,
    )


def _type_names(typ: type | tuple[type, ...]) -> str:
    types = typ if isinstance(typ, tuple) else (typ,)
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def read_jsonl(path: Path, on_error: str = "raise", problems: list[str] | None = None) -> list[LongBenchExample]:
    """Read one LongBench jsonl file. ``on_error="skip"`` drops only the bad lines (listed in
    ``problems`` and warned about); ``"raise"`` stops at the first bad line."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = Path(path)
    out: list[LongBenchExample] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                out.append(parse_record(line, f"{path}:{lineno}"))
            except LongBenchFormatError as exc:
                if on_error == "raise":
                    raise
                if problems is not None:
                    problems.append(str(exc))
                warnings.warn(f"skipping malformed LongBench line: {exc}", stacklevel=2)
    return out


def load_longbench_e(
    local_dir: str | Path,
    datasets: Iterable[str] | None = None,
    max_examples: int | None = None,
    on_error: str = "raise",
) -> LongBenchData:
    """Load ``{dataset}_e.jsonl`` files from ``local_dir`` (all LongBench-E tasks present when
    ``datasets`` is None; a named dataset whose file is absent is an error)."""
    root = Path(local_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"LongBench directory {str(root)!r} does not exist; point --longbench-local-dir at a folder "
            f"with the official {{dataset}}_e.jsonl files (e.g. unzipped THUDM/LongBench data.zip)"
        )
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1, got {max_examples}")
    if datasets is None:
        names = [d for d in LONGBENCH_E_DATASETS if (root / f"{d}_e.jsonl").is_file()]
        if not names:
            raise FileNotFoundError(
                f"no LongBench-E file in {str(root)!r}; expected names like {LONGBENCH_E_DATASETS[0]}_e.jsonl "
                f"for datasets {list(LONGBENCH_E_DATASETS)}"
            )
    else:
        names = list(datasets)
        unknown = [d for d in names if d not in PROMPTS]
        if unknown:
            raise KeyError(f"unknown LongBench dataset(s) {unknown}; available: {sorted(PROMPTS)}")
    data = LongBenchData()
    for name in names:
        path = root / f"{name}_e.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"LongBench-E file {str(path)!r} not found (dataset {name!r})")
        examples = read_jsonl(path, on_error=on_error, problems=data.problems)
        for ex in examples:
            if ex.dataset != name:
                msg = f"{ex.source}: record says dataset {ex.dataset!r} but the file is for {name!r}"
                if on_error == "raise":
                    raise LongBenchFormatError(msg)
                data.problems.append(msg)
        examples = [ex for ex in examples if ex.dataset == name]
        if not examples:
            raise LongBenchFormatError(f"{path}: no valid record (problems: {data.problems[-3:]})")
        data.tasks[name] = examples[:max_examples] if max_examples else examples
    return data


# ---------------------------------------------------------------------------------------------
# prompts


def format_prompt(example: LongBenchExample) -> str:
    """LongBench's raw prompt for an example (before truncation and chat template)."""
    try:
        template = PROMPTS[example.dataset]
    except KeyError:
        raise KeyError(f"no LongBench prompt for dataset {example.dataset!r}; available: {sorted(PROMPTS)}") from None
    return template.format(context=example.context, input=example.input)


def truncate_middle(tokenizer: Any, prompt: str, max_prompt_tokens: int) -> tuple[str, bool]:
    """LongBench ``pred.py`` truncation: keep the first and last ``max // 2`` tokens."""
    if max_prompt_tokens < 2:
        raise ValueError(f"max_prompt_tokens must be >= 2, got {max_prompt_tokens}")
    ids = tokenizer(prompt, truncation=False, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_prompt_tokens:
        return prompt, False
    half = max_prompt_tokens // 2
    head = tokenizer.decode(ids[:half], skip_special_tokens=True)
    tail = tokenizer.decode(ids[-half:], skip_special_tokens=True)
    return head + tail, True


def build_prompt_ids(
    tokenizer: Any,
    example: LongBenchExample,
    max_prompt_tokens: int,
    use_chat_template: bool = True,
) -> tuple[list[int], bool]:
    """Token ids to feed the model, and whether the prompt was truncated."""
    prompt, truncated = truncate_middle(tokenizer, format_prompt(example), max_prompt_tokens)
    if use_chat_template and example.dataset not in NO_CHAT_DATASETS and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
    else:
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    return list(ids), truncated


def bucket_means(scores: Sequence[tuple[str, float]]) -> dict[str, float | None]:
    """Mean score (0-100, 2 decimals, as LongBench) per length bucket; None for an empty bucket."""
    out: dict[str, float | None] = {}
    for b in LENGTH_BUCKETS:
        vals = [s for bucket, s in scores if bucket == b]
        out[b] = round(100 * sum(vals) / len(vals), 2) if vals else None
    return out


# ---------------------------------------------------------------------------------------------
# evaluation


def evaluate(
    model: Any,
    tokenizer: Any,
    data: LongBenchData,
    settings: Sequence[str],
    cache_factory: Any,
    max_prompt_tokens: int,
    max_new_tokens_cap: int | None = None,
    share_prefill: bool = True,
    log: Any = None,
) -> tuple[list[dict], dict]:
    """Generate every example under every setting and score it with the dataset's official metric
    and the seed's containment. Returns (records, summary) where summary is
    ``{setting: {"tasks": {dataset: {"official", "containment", "buckets", "n"}}, "official_avg",
    "containment_avg"}}`` on LongBench's 0-100 scale (task average = mean over datasets)."""
    from turboquant.eval.metrics import score_example
    from turboquant.eval.runner import generate_settings

    limit = max_positions_of(model)
    if limit is not None and max_prompt_tokens > limit:
        raise ValueError(
            f"longbench max_prompt_tokens {max_prompt_tokens} exceeds the model's maximum context {limit}"
        )
    records: list[dict] = []
    for dataset, examples in data.tasks.items():
        max_new = MAX_NEW_TOKENS[dataset]
        if max_new_tokens_cap is not None:
            max_new = min(max_new, max_new_tokens_cap)
        for ex in examples:
            ids, truncated = build_prompt_ids(tokenizer, ex, max_prompt_tokens)
            if limit is not None and len(ids) + max_new > limit:
                raise ValueError(
                    f"{ex.source}: prompt of {len(ids)} tokens + {max_new} new tokens exceeds the model's "
                    f"maximum context {limit}; lower longbench_max_prompt_tokens"
                )
            run = generate_settings(model, tokenizer, ids, settings, cache_factory, max_new, share_prefill)
            for setting, gen in run.generations.items():
                records.append(
                    {
                        "dataset": dataset,
                        "id": ex.id,
                        "bucket": ex.bucket,
                        "length": ex.length,
                        "n_tokens": len(ids),
                        "truncated": truncated,
                        "setting": setting,
                        "output": gen.text,
                        "answers": list(ex.answers),
                        "official": score_example(dataset, gen.text, ex.answers, ex.all_classes),
                        "containment": score_example(dataset, gen.text, ex.answers, ex.all_classes, metric="containment"),
                        "prefill_s": round(run.prefill_seconds, 3),
                        "decode_s": round(gen.seconds, 3),
                    }
                )
            if log is not None:
                log(f"{ex.source} " + " ".join(f"{r['setting']}={r['official']:.2f}" for r in records[-len(settings):]))
    return records, summarize(records, settings)


def summarize(records: Sequence[dict], settings: Sequence[str]) -> dict:
    """Per-setting, per-dataset official and containment scores (0-100) and their task averages."""
    out: dict[str, dict] = {}
    for setting in settings:
        rows = [r for r in records if r["setting"] == setting]
        tasks: dict[str, dict] = {}
        for dataset in dict.fromkeys(r["dataset"] for r in rows):
            sub = [r for r in rows if r["dataset"] == dataset]
            tasks[dataset] = {
                "official": round(100 * sum(r["official"] for r in sub) / len(sub), 2),
                "containment": round(100 * sum(r["containment"] for r in sub) / len(sub), 2),
                "buckets": bucket_means([(r["bucket"], r["official"]) for r in sub]),
                "n": len(sub),
            }
        n = max(1, len(tasks))
        out[setting] = {
            "tasks": tasks,
            "official_avg": round(sum(t["official"] for t in tasks.values()) / n, 2),
            "containment_avg": round(sum(t["containment"] for t in tasks.values()) / n, 2),
        }
    return out


def max_positions_of(model: Any) -> int | None:
    """The model's maximum context (``max_position_embeddings`` of its text config)."""
    from turboquant.eval.needle import model_max_positions

    return model_max_positions(model)
