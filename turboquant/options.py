"""The suite's options, in the seed review's spelling: one table for pytest (``--model-id``) and the
CLI (``--model_id``), and one parser per kind of value, used by both.

Every parser takes the text a user typed and returns the parsed value, or raises
:class:`OptionError` with a message that states the allowed values; the caller prefixes the flag
name (argparse in ``python -m turboquant verify``, :func:`parse_suite_options` for pytest), so a bad
value stops the run before any model is loaded or any test runs (exit code 2 on the CLI, a
``pytest.UsageError`` under pytest). Booleans are switches on the CLI and ``true/false`` for pytest.
"""

from __future__ import annotations

import math
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from turboquant.models import ATTN_IMPLEMENTATIONS, DTYPES
from turboquant.quantizer import SUPPORTED_BITS

ANN_SCALAR_BITS = (1, 2, 3, 4)
"""Bit widths of the C12/C13 ANN grid (integers: the scalar baseline has no fractional widths)."""


class OptionError(ValueError):
    """A suite option's value is not allowed; the message names the allowed values."""


Parser = Callable[[str], Any]
_INT = re.compile(r"^[+]?\d+$")


def _items(text: str, what: str) -> list[str]:
    parts = [p.strip() for p in str(text).split(",")]
    if not parts or any(not p for p in parts):
        raise OptionError(f"must be a comma list of {what}, got {text!r}")
    return parts


def parse_bool(text: str) -> bool:
    """``true/false`` (also ``1/0``, ``yes/no``, ``on/off``)."""
    if isinstance(text, bool):
        return text
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise OptionError(f"must be true or false, got {text!r}")


def parse_positive_int(text: str) -> int:
    """A count: an integer >= 1 (``2.7`` and ``0`` are refused, not rounded)."""
    s = str(text).strip()
    if not _INT.match(s) or int(s) < 1:
        raise OptionError(f"must be an integer >= 1, got {text!r}")
    return int(s)


def parse_non_negative_int(text: str) -> int:
    """An integer >= 0 (e.g. warmup runs)."""
    s = str(text).strip()
    if not _INT.match(s):
        raise OptionError(f"must be an integer >= 0, got {text!r}")
    return int(s)


def parse_positive_float(text: str) -> float:
    """A finite number > 0."""
    try:
        value = float(str(text).strip())
    except ValueError:
        raise OptionError(f"must be a number > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise OptionError(f"must be a number > 0, got {text!r}")
    return value


def parse_token_counts(text: str) -> list[int]:
    """Comma list of token counts >= 1; a ``k`` suffix means x1024 (``"1024,2k,4K"``)."""
    out = []
    for part in _items(text, "token counts such as 1024,2k,4k"):
        low = part.lower()
        digits, mult = (low[:-1], 1024) if low.endswith("k") else (low, 1)
        if not _INT.match(digits) or int(digits) < 1:
            raise OptionError(
                f"must be a comma list of token counts >= 1 (e.g. 1024,2k,4k), got {text!r}")
        out.append(int(digits) * mult)
    return out


def parse_unit_floats(text: str) -> list[float]:
    """Comma list of fractions in [0, 1] (needle depths)."""
    out = []
    for part in _items(text, "numbers in [0, 1]"):
        try:
            value = float(part)
        except ValueError:
            raise OptionError(f"must be a comma list of numbers in [0, 1], got {text!r}") from None
        if not 0.0 <= value <= 1.0:  # NaN fails too
            raise OptionError(
                f"must be a comma list of numbers in [0, 1], got {text!r} ({part} is outside)")
        out.append(value)
    return out


def parse_bit_width(text: str) -> float:
    """One TurboQuant bit width from :data:`turboquant.quantizer.SUPPORTED_BITS`."""
    try:
        value = float(str(text).strip())
    except ValueError:
        value = math.nan
    if value not in SUPPORTED_BITS:
        widths = ", ".join(f"{b:g}" for b in SUPPORTED_BITS)
        raise OptionError(f"must be one of {widths}, got {text!r}")
    return value


LAYOUT_CHOICES = ("halves-3.5", "halves-2.5", "halves-1.5", "paper-3.5", "paper-2.5",
                  "int-1", "int-2", "int-3", "int-4", "outliers-<n_out>-<b_hi>-<b_lo>")


def parse_layout_option(text: str) -> str:
    """A code layout name (``turboquant.layout``), returned in its canonical spelling."""
    from turboquant.layout import layout_name

    try:
        return layout_name(str(text).strip())
    except (TypeError, ValueError) as exc:
        raise OptionError(f"must be one of {', '.join(LAYOUT_CHOICES)}, got {text!r} ({exc})") from None


def layout_bits_table(head_dims: tuple[int, ...] = (64, 128)) -> str:
    """``name (bits a coordinate at d=64 / d=128, norms included)`` for the presets: what the
    bytes of one stored vector cost, read from the layout (outlier indices excluded)."""
    from turboquant.layout import build_layout

    rows = []
    for name in LAYOUT_CHOICES[:-1]:
        per_d = [build_layout(name, d, rotation="dense").nbytes_per_vector * 8 / d for d in head_dims]
        rows.append(f"{name} ({' / '.join(f'{b:.3g}' for b in per_d)})")
    return ", ".join(rows) + f"; bits a coordinate at head_dim {' / '.join(map(str, head_dims))}"


def int_list_from(allowed: tuple[int, ...]) -> Parser:
    """A parser for comma lists of integers drawn from ``allowed`` (no rounding of ``2.7``)."""
    names = ", ".join(str(a) for a in allowed)

    def parse(text: str) -> list[int]:
        parts = _items(text, f"integers from {{{names}}}")
        if any(not _INT.match(p) or int(p) not in allowed for p in parts):
            raise OptionError(f"must be a comma list of integers from {{{names}}}, got {text!r}")
        return list(dict.fromkeys(int(p) for p in parts))

    parse.__doc__ = f"Comma list of integers from {{{names}}}."
    return parse


def choice_from(allowed: tuple[str, ...]) -> Parser:
    """A parser accepting exactly one of ``allowed``."""

    def parse(text: str) -> str:
        if str(text) not in allowed:
            raise OptionError(f"must be one of {', '.join(allowed)}, got {text!r}")
        return str(text)

    parse.__doc__ = f"One of {', '.join(allowed)}."
    return parse


def parse_existing_dir(text: str) -> Path:
    """A directory that exists."""
    path = Path(str(text)).expanduser()
    if not path.is_dir():
        what = "is a file" if path.exists() else "does not exist"
        raise OptionError(f"must be an existing directory, got {str(text)!r} ({what})")
    return path


def parse_out_dir(text: str) -> Path:
    """A report directory that can be created and written (checked by writing a probe file in it, or
    in its nearest existing parent when it does not exist yet; nothing is left behind)."""
    path = Path(str(text)).expanduser()
    if path.exists() and not path.is_dir():
        raise OptionError(
            f"must be a directory that can be created and written, got {str(text)!r} (a file)")
    probe_dir = path.absolute()
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise OptionError(
            f"must be a directory that can be created and written, got {str(text)!r} "
            f"({probe_dir} is a file, not a directory)")
    try:
        with tempfile.TemporaryFile(dir=probe_dir):
            pass
    except OSError as exc:
        raise OptionError(
            f"must be a directory that can be created and written, got {str(text)!r} "
            f"({probe_dir} is not writable: {exc.strerror or exc})") from None
    return path


@dataclass(frozen=True)
class SuiteOption:
    """One option of the suite: name (CLI spelling), default (as typed text), help, parser."""

    name: str
    default: str | bool | None
    help: str
    parse: Parser

    @property
    def pytest_flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def is_switch(self) -> bool:
        return isinstance(self.default, bool)

    def value(self, raw: Any) -> Any:
        """The parsed value of ``raw`` (None -> the default, which stays None when it is None)."""
        if raw is None:
            raw = self.default
        return None if raw is None else self.parse(raw)


_TORCH_DTYPE = choice_from(tuple(DTYPES))
_ATTN = choice_from(tuple(ATTN_IMPLEMENTATIONS))

SUITE_OPTIONS: list[SuiteOption] = [
    SuiteOption("model_id", None, "Hugging Face model id or local directory "
                "(default: the embedded SmolLM2-135M-Instruct GGUF)", str),
    SuiteOption("local_files_only", True,
                "never download; load from the local HF cache or a directory", parse_bool),
    SuiteOption("torch_dtype", "float32", f"model dtype: {' | '.join(DTYPES)}", _TORCH_DTYPE),
    SuiteOption("attn_implementation", "sdpa", "attention backend for full-precision runs: "
                + " | ".join(ATTN_IMPLEMENTATIONS), _ATTN),
    SuiteOption("kv_layout", None, "code layout of keys and values of the recipe the C09/C10 "
                "verdicts are taken on (default: the paper's recipe paper-<required bits>); also "
                "reported in C08. One of: " + layout_bits_table(), parse_layout_option),
    SuiteOption("key_layout", None, "code layout of the keys of that recipe (overrides "
                "--kv_layout for keys)", parse_layout_option),
    SuiteOption("value_layout", None, "code layout of the values of that recipe (overrides "
                "--kv_layout for values)", parse_layout_option),
    SuiteOption("needle_context_tokens", None, "needle-in-a-haystack context lengths, comma list "
                "(default: CPU grid 1k,2k,4k)", parse_token_counts),
    SuiteOption("needle_required_bits", "3.5", "bit width whose needle accuracy must match full "
                "precision (C09)", parse_bit_width),
    SuiteOption("needle_trials", None, "needle trials per (length, depth) cell",
                parse_positive_int),
    SuiteOption("needle_positions", None, "needle depths in [0, 1], comma list", parse_unit_floats),
    SuiteOption("longbench_local_dir", None, "directory of LongBench-E jsonl files "
                "(default: the shipped fixture in data/)", parse_existing_dir),
    SuiteOption("longbench_required_bits", "3.5", "bit width whose LongBench score must match full "
                "precision (C10)", parse_bit_width),
    SuiteOption("longbench_max_examples", None, "examples per LongBench task", parse_positive_int),
    SuiteOption("longbench_max_prompt_tokens", None, "truncate LongBench prompts (head + tail) to "
                "this many tokens", parse_positive_int),
    SuiteOption("throughput_new_tokens", "128", "new tokens per decode-throughput repeat (C11)",
                parse_positive_int),
    SuiteOption("throughput_warmup", "1", "decode-throughput warmup runs", parse_non_negative_int),
    SuiteOption("throughput_repeats", "3", "decode-throughput measured repeats",
                parse_positive_int),
    SuiteOption("ann_use_qwen_embeddings", False, "ANN data = mean-pooled hidden states of the "
                "selected model (C12/C13)", parse_bool),
    SuiteOption("ann_required_scalar_bits", "2,3,4", "bits at which TurboQuant must beat scalar "
                "no-rotation recall (C12)", int_list_from(ANN_SCALAR_BITS)),
    SuiteOption("ann_pq_index_speedup_threshold", "10", "minimum PQ / TurboQuant index build-time "
                "ratio (C13)", parse_positive_float),
]
OPTIONS_BY_NAME: dict[str, SuiteOption] = {o.name: o for o in SUITE_OPTIONS}


def parse_suite_options(raw: Mapping[str, Any],
                        flag: Callable[[SuiteOption], str]) -> dict[str, Any]:
    """Parse every suite option of ``raw`` (name -> typed text or None); the first bad value
    raises :class:`OptionError` whose message starts with ``flag(option)`` (the user's spelling)."""
    values = {}
    for opt in SUITE_OPTIONS:
        try:
            values[opt.name] = opt.value(raw.get(opt.name))
        except OptionError as exc:
            raise OptionError(f"{flag(opt)} {exc}") from None
    return values
