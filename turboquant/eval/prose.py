"""Deterministic English prose of an exact token count (the 2048-token C08 / C11 prompt).

The text is the standard library's own documentation (docstrings of a fixed list of modules and
their public classes and functions, in a fixed order), so it needs no download. How much of it a
Python version ships varies, so the documents are cycled until the tokenizer count exceeds the
target and the token ids are then cut to exactly ``n_tokens``: the prompt cannot come out short.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence

DOC_MODULES = ("json", "argparse", "collections", "textwrap", "difflib", "logging", "pathlib",
               "unittest", "subprocess", "threading", "asyncio", "email", "http.client", "sqlite3",
               "csv", "datetime")
MIN_DOC_CHARS = 200
CHARS_PER_TOKEN_GUESS = 6  # first text length tried: n_tokens x this; doubled until long enough


def stdlib_docs(modules: Sequence[str] = DOC_MODULES, min_chars: int = MIN_DOC_CHARS) -> list[str]:
    """Docstrings of at least ``min_chars`` characters of ``modules`` and their public classes and
    functions, in a fixed order (deterministic for a given Python version)."""
    docs = []
    for name in modules:
        mod = importlib.import_module(name)
        for obj in [mod, *[getattr(mod, a) for a in sorted(dir(mod)) if not a.startswith("_")]]:
            if inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isfunction(obj):
                doc = inspect.getdoc(obj)
                if doc and len(doc) >= min_chars:
                    docs.append(doc)
    return docs


def _cycled_text(docs: Sequence[str], n_chars: int) -> str:
    parts, total, i = [], 0, 0
    while total < n_chars:
        doc = docs[i % len(docs)]
        parts.append(doc)
        total += len(doc) + 2
        i += 1
    return "\n\n".join(parts)


def prose_token_ids(encode: Callable[[str], Sequence[int]], n_tokens: int,
                    docs: Sequence[str] | None = None) -> list[int]:
    """Exactly ``n_tokens`` token ids of ``docs`` (default :func:`stdlib_docs`) joined by blank
    lines and cycled as often as needed. ``encode(text) -> ids`` is the tokenizer (e.g.
    ``lambda t: tokenizer(t).input_ids``). The ids are cut, not the text, and only once the text
    has more tokens than asked for, so the last kept token is never a word cut in half."""
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens must be an integer >= 1, got {n_tokens!r}")
    docs = [d for d in (stdlib_docs() if docs is None else docs) if d]
    if not docs:
        raise ValueError("docs must hold at least one non-empty text")
    n_chars, previous = n_tokens * CHARS_PER_TOKEN_GUESS, -1
    while True:
        ids = list(encode(_cycled_text(docs, n_chars)))
        if len(ids) > n_tokens:
            return ids[:n_tokens]
        if len(ids) <= previous:
            raise ValueError(f"encode gave {len(ids)} tokens for {n_chars} characters of text, no "
                             f"more than for half of it: it cannot reach n_tokens={n_tokens}")
        previous, n_chars = len(ids), n_chars * 2
