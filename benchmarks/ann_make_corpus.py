"""Build the shipped ANN text corpus ``data/ann/corpus.txt`` (run once; the output is committed).

Source: English prose that ships with CPython itself, so no download is needed and the licence is
the PSF licence: the language reference / library topics (``pydoc_data.topics``) and the docstrings
of standard-library modules, classes and functions. Text is split into sentences, filtered to
prose-like sentences (40-300 characters, at least 7 words, no code punctuation), de-duplicated and
shuffled with a fixed seed. The output is one sentence per line.

    python benchmarks/ann_make_corpus.py [--out data/ann/corpus.txt]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import random
import re
import sys
import warnings
from pathlib import Path

_CODE = re.compile(r"[{}=<>\\|@#$]|::|\.\.\.|->|\w\(|\w_\w")
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
# Modules whose import has side effects (GUI, sounds, turtle windows, antigravity opens a browser).
_SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "__main__", "pydoc_data"}


def sentences(text: str) -> list[str]:
    """Prose sentences of ``text`` (paragraph split, whitespace collapsed, code-like text dropped)."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        if not para or para.startswith((">>>", "...")):
            continue
        for s in _SPLIT.split(para):
            s = s.strip().strip('"')
            long_prose = 40 <= len(s) <= 300 and s[0].isupper() and s.count(" ") >= 6
            if long_prose and not _CODE.search(s) and s[-1] in ".!?":
                out.append(s)
    return out


def stdlib_docstrings() -> list[str]:
    texts = []
    names = sorted(getattr(sys, "stdlib_module_names", ()))
    for name in names:
        if name in _SKIP or name.startswith("_"):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001, S112 - a stdlib module that cannot import here has no docstrings to add
            continue
        texts.append(inspect.getdoc(mod) or "")
        for _, obj in sorted(vars(mod).items()):
            defined_here = getattr(obj, "__module__", None) == name
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and defined_here:
                texts.append(inspect.getdoc(obj) or "")
    return texts


def build(seed: int = 0) -> list[str]:
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)] + stdlib_docstrings()
    seen: dict[str, None] = {}
    for t in texts:
        for s in sentences(t):
            seen.setdefault(s, None)
    out = list(seen)
    random.Random(seed).shuffle(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "data" / "ann" / "corpus.txt"))
    args = ap.parse_args()
    sents = build()
    Path(args.out).write_text("\n".join(sents) + "\n", encoding="utf-8")
    print(f"wrote {len(sents)} sentences to {args.out} (python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
