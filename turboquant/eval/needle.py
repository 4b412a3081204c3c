"""Needle in a haystack (RULER ``niah_single`` style) over a grid of lengths x depths x trials.

The haystack is RULER's repeated-noise text ("The grass is green. The sky is blue. ..."): a small
model can read through it, and a needle stands out as the only fact. The needle is
``"One of the special magic numbers for {key} is: {value}."``, the question asks for the number of
``{key}`` and the answer starts with a prefix that ends right before the number, so the model's
first tokens are the value. Scoring is exact: the value (7 digits) must appear in the generated
text. Keys and values are drawn from ``random.Random`` seeded by (seed, length, depth, trial), so
a grid is identical on every machine.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic numbers for {key} is: {value}."
TASK_INTRO = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards."
)
QUESTION = "What is the special magic number for {key} mentioned in the provided text?"
ANSWER_PREFIX = "The special magic number for {key} mentioned in the provided text is"

# Key words (RULER draws adjective-noun keys from a word list; a fixed list keeps this offline).
ADJECTIVES = (
    "ancient", "bitter", "brave", "calm", "clever", "crimson", "curious", "dusty", "eager", "fancy",
    "fragile", "gentle", "golden", "hollow", "humble", "icy", "jolly", "lively", "lucky", "mellow",
    "misty", "noisy", "proud", "quiet", "rapid", "rusty", "silent", "silver", "sleepy", "smooth",
    "sour", "steady", "stormy", "sunny", "swift", "tender", "tidy", "vivid", "wild", "witty",
)
NOUNS = (
    "anchor", "badger", "barn", "beacon", "bridge", "canyon", "castle", "cedar", "comet", "crane",
    "desert", "falcon", "ferry", "forest", "garden", "glacier", "harbor", "island", "kettle", "lantern",
    "meadow", "mirror", "orchard", "otter", "pepper", "pillow", "planet", "quarry", "raven", "river",
    "saddle", "spruce", "teapot", "thistle", "tunnel", "valley", "violin", "walrus", "willow", "zephyr",
)


@dataclass(frozen=True)
class Needle:
    key: str
    value: str


@dataclass(frozen=True)
class Case:
    """One trial of a long-context task: prompt ids, where the needles sit, what counts as correct.

    ``targets`` are the strings the answer must contain; the score is the share found
    (:func:`score_all`), so a single-needle trial scores 0 or 1.
    """

    task: str
    context_tokens: int  # requested length of the whole prompt (the prompt never exceeds it)
    depth: float  # requested relative position of the (first) needle in the haystack
    trial: int
    input_ids: tuple[int, ...]
    targets: tuple[str, ...]
    needle_token_indices: tuple[int, ...]  # token offsets of the inserted sentences
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def actual_depth(self) -> float:
        return self.needle_token_indices[0] / max(1, self.n_tokens)

    def score(self, generated: str) -> float:
        return score_all(generated, self.targets)


def check_depth(depth: float) -> float:
    """Depths are fractions of the haystack in [0, 1]."""
    d = float(depth)
    if not 0.0 <= d <= 1.0:
        raise ValueError(f"needle depth must be in [0, 1], got {depth!r}")
    return d


def check_context_tokens(context_tokens: int, max_positions: int | None) -> int:
    """A context must be positive and fit the model's maximum positions."""
    n = int(context_tokens)
    if n <= 0:
        raise ValueError(f"needle context length must be > 0 tokens, got {context_tokens!r}")
    if max_positions is not None and n > max_positions:
        raise ValueError(
            f"needle context length {n} exceeds the model's maximum context {max_positions} tokens "
            f"(max_position_embeddings); choose lengths <= {max_positions}"
        )
    return n


def model_max_positions(model_or_config: Any) -> int | None:
    """``max_position_embeddings`` of a model or config (text config for multimodal ones)."""
    cfg = getattr(model_or_config, "config", model_or_config)
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    return getattr(cfg, "max_position_embeddings", None)


def make_key(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def make_value(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def trial_rng(seed: int, *parts: object) -> random.Random:
    """A ``random.Random`` seeded from ``seed`` and the grid coordinates (stable across runs)."""
    return random.Random(f"{seed}|" + "|".join(str(p) for p in parts))


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class PromptBuilder:
    """Wraps a (context, question, answer prefix) into model input ids, with the chat template when
    the tokenizer has one (the answer prefix goes after the assistant header)."""

    def __init__(self, tokenizer: Any, use_chat_template: bool = True) -> None:
        self.tokenizer = tokenizer
        self.chat = bool(use_chat_template and getattr(tokenizer, "chat_template", None))

    def around(self, user_text: str, marker: str, answer_prefix: str) -> tuple[str, str]:
        """The final prompt text before and after ``marker`` (which occurs once in ``user_text``)."""
        if self.chat:
            full = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": user_text}], add_generation_prompt=True, tokenize=False
            )
        else:
            full = (self.tokenizer.bos_token or "") + user_text + "\n\nAnswer: "
        pre, post = full.split(marker)
        return pre, post + answer_prefix


def build_haystack_prompt(
    tokenizer: Any,
    context_tokens: int,
    depth_needles: Sequence[tuple[float, str]],
    intro: str,
    question: str,
    answer_prefix: str,
    noise: str = NOISE,
    use_chat_template: bool = True,
) -> tuple[list[int], list[int]]:
    """Prompt ids of about ``context_tokens`` tokens (never more) with each needle sentence
    inserted at its depth between noise sentences; returns (ids, token offsets of the needles)."""
    marker = "\x00CONTEXT\x00"
    pre, post = PromptBuilder(tokenizer, use_chat_template).around(
        f"{intro}\n{marker}\n{question}", marker, answer_prefix
    )
    pre_ids = _encode(tokenizer, pre)
    post_ids = _encode(tokenizer, post)
    sentences = [s.strip() + "." for s in noise.split(".") if s.strip()]
    sent_ids = [_encode(tokenizer, " " + s) for s in sentences]
    needle_ids = [_encode(tokenizer, " " + n) for _, n in depth_needles]
    budget = context_tokens - len(pre_ids) - len(post_ids) - sum(len(n) for n in needle_ids)
    if budget < 0:
        raise ValueError(
            f"context length {context_tokens} is too short for the template and needles "
            f"({context_tokens - budget} tokens needed)"
        )
    hay: list[list[int]] = []
    used, i = 0, 0
    while used + len(sent_ids[i % len(sent_ids)]) <= budget:
        hay.append(sent_ids[i % len(sent_ids)])
        used += len(hay[-1])
        i += 1
    # needles: insert at sentence boundaries, deepest last so earlier indices stay valid
    order = sorted(range(len(depth_needles)), key=lambda k: (depth_needles[k][0], k))
    slots = [round(check_depth(depth_needles[k][0]) * len(hay)) for k in order]
    ids: list[int] = list(pre_ids)
    offsets: dict[int, int] = {}
    cursor = 0
    for k, slot in zip(order, slots):
        for chunk in hay[cursor:slot]:
            ids.extend(chunk)
        cursor = max(cursor, slot)
        offsets[k] = len(ids)
        ids.extend(needle_ids[k])
    for chunk in hay[cursor:]:
        ids.extend(chunk)
    ids.extend(post_ids)
    return ids, [offsets[k] for k in range(len(depth_needles))]


def make_needle_case(
    tokenizer: Any,
    context_tokens: int,
    depth: float,
    trial: int,
    seed: int = 0,
    max_positions: int | None = None,
    use_chat_template: bool = True,
) -> Case:
    """One single-needle trial at ``context_tokens`` and ``depth`` (deterministic in its args)."""
    check_context_tokens(context_tokens, max_positions)
    check_depth(depth)
    rng = trial_rng(seed, "niah", context_tokens, depth, trial)
    needle = Needle(make_key(rng), make_value(rng))
    ids, offsets = build_haystack_prompt(
        tokenizer,
        context_tokens,
        [(depth, NEEDLE.format(key=needle.key, value=needle.value))],
        TASK_INTRO,
        QUESTION.format(key=needle.key),
        ANSWER_PREFIX.format(key=needle.key),
        use_chat_template=use_chat_template,
    )
    return Case(
        task="niah_single",
        context_tokens=context_tokens,
        depth=float(depth),
        trial=trial,
        input_ids=tuple(ids),
        targets=(needle.value,),
        needle_token_indices=tuple(offsets),
        meta={"key": needle.key, "value": needle.value},
    )


def needle_grid(
    tokenizer: Any,
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int,
    seed: int = 0,
    max_positions: int | None = None,
    use_chat_template: bool = True,
) -> list[Case]:
    """All trials of a lengths x depths x trials grid; bad lengths or depths fail before any work."""
    if trials < 1:
        raise ValueError(f"needle trials must be >= 1, got {trials}")
    for n in lengths:
        check_context_tokens(n, max_positions)
    for d in depths:
        check_depth(d)
    return [
        make_needle_case(tokenizer, n, d, t, seed, max_positions, use_chat_template)
        for n in lengths
        for d in depths
        for t in range(trials)
    ]


def score_all(generated: str, targets: Sequence[str]) -> float:
    """Share of ``targets`` found in ``generated`` (RULER ``string_match_all``, case-insensitive),
    each as a whole token: not preceded or followed by a letter or digit, so the value inside a
    longer number ("21840686" for "1840686") is a miss, where a plain substring test finds it."""
    if not targets:
        raise ValueError("a case needs at least one target")
    text = generated.lower()
    found = (re.search(rf"(?<![0-9a-z]){re.escape(t.lower())}(?![0-9a-z])", text) for t in targets)
    return sum(1.0 for m in found if m) / len(targets)


def parse_int_list(text: str | Sequence[int] | None, default: Sequence[int]) -> list[int]:
    """Comma list (``"1024,2048"``, ``"4k"`` allowed) -> ints; None -> ``default``."""
    if text is None:
        return list(default)
    if not isinstance(text, str):
        return [int(x) for x in text]
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        mult = 1024 if part.endswith("k") else 1
        out.append(int(float(part.rstrip("k")) * mult))
    if not out:
        raise ValueError(f"expected a comma list of integers, got {text!r}")
    return out


def parse_float_list(text: str | Sequence[float] | None, default: Sequence[float]) -> list[float]:
    """Comma list of floats (``"0.1,0.5,0.9"``); None -> ``default``."""
    if text is None:
        return list(default)
    if not isinstance(text, str):
        return [float(x) for x in text]
    out = [float(p) for p in text.split(",") if p.strip()]
    if not out:
        raise ValueError(f"expected a comma list of numbers, got {text!r}")
    return out
