"""RULER-style synthetic long-context tasks on the needle machinery, registered by name.

* ``niah_single``     one needle (:func:`turboquant.eval.needle.make_needle_case`)
* ``niah_multikey``   the asked needle plus distractor needles with other keys (RULER
                      ``niah_multikey_1``): the answer must name the asked key's number
* ``niah_multivalue`` one key with several numbers spread through the haystack (RULER
                      ``niah_multivalue``): the answer must list all of them
* ``vt``              variable tracking (RULER ``vt``): a chain ``VAR A = 12345 ... VAR B = VAR A``
                      hidden in noise; the answer must name every variable holding the value

Scoring is RULER's ``string_match_all``: the share of the targets that occur in the answer.
Every generator is deterministic in (seed, task, length, depth, trial).
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from turboquant.eval.needle import (
    ANSWER_PREFIX,
    NEEDLE,
    QUESTION,
    TASK_INTRO,
    Case,
    build_haystack_prompt,
    check_context_tokens,
    check_depth,
    make_key,
    make_needle_case,
    make_value,
    trial_rng,
)

CaseMaker = Callable[..., Case]


@dataclass(frozen=True)
class Task:
    """A registered task: its case generator and how many tokens an answer needs."""

    name: str
    make: CaseMaker
    max_new_tokens: int


_TASKS: dict[str, Task] = {}


def register_task(name: str, max_new_tokens: int) -> Callable[[CaseMaker], CaseMaker]:
    """Register ``make(tokenizer, context_tokens, depth, trial, seed=0, max_positions=None,
    use_chat_template=True) -> Case`` under ``name``."""

    def deco(fn: CaseMaker) -> CaseMaker:
        if name in _TASKS:
            raise ValueError(f"task {name!r} is already registered")
        _TASKS[name] = Task(name, fn, max_new_tokens)
        return fn

    return deco


def get_task(name: str) -> Task:
    """The task registered as ``name``; unknown names raise ``KeyError`` listing the available."""
    try:
        return _TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; available: {sorted(_TASKS)}") from None


def available_tasks() -> list[str]:
    return sorted(_TASKS)


register_task("niah_single", max_new_tokens=8)(make_needle_case)


def _distinct(rng: Any, n: int, draw: Callable[[Any], str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        x = draw(rng)
        if x not in out:
            out.append(x)
    return out


@register_task("niah_multikey", max_new_tokens=8)
def make_multikey_case(
    tokenizer: Any,
    context_tokens: int,
    depth: float,
    trial: int,
    seed: int = 0,
    max_positions: int | None = None,
    use_chat_template: bool = True,
    n_distractors: int = 3,
) -> Case:
    """The asked needle at ``depth`` and ``n_distractors`` needles with other keys elsewhere."""
    check_context_tokens(context_tokens, max_positions)
    check_depth(depth)
    rng = trial_rng(seed, "niah_multikey", context_tokens, depth, trial)
    keys = _distinct(rng, n_distractors + 1, make_key)
    values = _distinct(rng, n_distractors + 1, make_value)
    depths = [float(depth)] + [round(rng.random(), 3) for _ in range(n_distractors)]
    needles = [(d, NEEDLE.format(key=k, value=v)) for d, k, v in zip(depths, keys, values)]
    ids, offsets = build_haystack_prompt(
        tokenizer, context_tokens, needles, TASK_INTRO, QUESTION.format(key=keys[0]),
        ANSWER_PREFIX.format(key=keys[0]), use_chat_template=use_chat_template,
    )
    return Case(
        "niah_multikey", context_tokens, float(depth), trial, tuple(ids), (values[0],), tuple(offsets),
        meta={"key": keys[0], "value": values[0], "distractors": dict(zip(keys[1:], values[1:]))},
    )


MULTIVALUE_QUESTION = "What are all the special magic numbers for {key} mentioned in the provided text?"
MULTIVALUE_PREFIX = "The special magic numbers for {key} mentioned in the provided text are"


@register_task("niah_multivalue", max_new_tokens=40)
def make_multivalue_case(
    tokenizer: Any,
    context_tokens: int,
    depth: float,
    trial: int,
    seed: int = 0,
    max_positions: int | None = None,
    use_chat_template: bool = True,
    n_values: int = 4,
) -> Case:
    """One key with ``n_values`` numbers: the first at ``depth``, the others at seeded depths."""
    check_context_tokens(context_tokens, max_positions)
    check_depth(depth)
    rng = trial_rng(seed, "niah_multivalue", context_tokens, depth, trial)
    key = make_key(rng)
    values = _distinct(rng, n_values, make_value)
    depths = [float(depth)] + [round(rng.random(), 3) for _ in range(n_values - 1)]
    needles = [(d, NEEDLE.format(key=key, value=v)) for d, v in zip(depths, values)]
    ids, offsets = build_haystack_prompt(
        tokenizer, context_tokens, needles, TASK_INTRO, MULTIVALUE_QUESTION.format(key=key),
        MULTIVALUE_PREFIX.format(key=key), use_chat_template=use_chat_template,
    )
    return Case(
        "niah_multivalue", context_tokens, float(depth), trial, tuple(ids), tuple(values), tuple(offsets),
        meta={"key": key, "values": values},
    )


VT_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text."
VT_QUESTION = "Question: Find all variables that are assigned the value {value} in the text above."
VT_PREFIX = (
    "Answer: According to the chain(s) of variable assignment in the text above, {n} variables are "
    "assigned the value {value}, they are:"
)


@register_task("vt", max_new_tokens=30)
def make_vt_case(
    tokenizer: Any,
    context_tokens: int,
    depth: float,
    trial: int,
    seed: int = 0,
    max_positions: int | None = None,
    use_chat_template: bool = True,
    n_hops: int = 4,
) -> Case:
    """A chain of ``n_hops + 1`` variables, the first assignment at ``depth``, the hops after it in
    order (each at a later depth), so every variable is defined before it is used."""
    check_context_tokens(context_tokens, max_positions)
    check_depth(depth)
    rng = trial_rng(seed, "vt", context_tokens, depth, trial)
    names = _distinct(rng, n_hops + 1, lambda r: "".join(r.choice(string.ascii_uppercase) for _ in range(5)))
    value = str(rng.randrange(10000, 100000))
    later = sorted(round(depth + (1.0 - depth) * rng.random(), 3) for _ in range(n_hops))
    sentences = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(n_hops)]
    needles = list(zip([float(depth)] + later, sentences))
    ids, offsets = build_haystack_prompt(
        tokenizer, context_tokens, needles, VT_INTRO, VT_QUESTION.format(value=value),
        VT_PREFIX.format(n=n_hops + 1, value=value), use_chat_template=use_chat_template,
    )
    return Case(
        "vt", context_tokens, float(depth), trial, tuple(ids), tuple(names), tuple(offsets),
        meta={"value": value, "chain": names},
    )
