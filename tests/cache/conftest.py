"""Fixtures of the model-level cache claims: one 2048-token prefill of the selected model, shared
by C08 (real KV proxy) and C11 (decode throughput)."""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch

from turboquant.eval.throughput import Prefill, run_prefill

PROMPT_TOKENS = 2048
# Real English prose, deterministic for a Python version: standard-library documentation.
_DOC_MODULES = ("json", "argparse", "collections", "textwrap", "difflib", "logging", "pathlib", "unittest",
                "subprocess", "threading", "asyncio", "email", "http.client", "sqlite3", "csv", "datetime")


def prose(n_chars: int = 60_000) -> str:
    parts = []
    for name in _DOC_MODULES:
        mod = importlib.import_module(name)
        for obj in [mod, *[getattr(mod, a) for a in sorted(dir(mod)) if not a.startswith("_")]]:
            doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isfunction(obj)) else None
            if doc and len(doc) > 200:
                parts.append(doc)
            if sum(map(len, parts)) > n_chars:
                return "\n\n".join(parts)
    return "\n\n".join(parts)


@pytest.fixture(scope="session")
def prefill_2048(lm) -> Prefill:
    """The model's exact prefill of a 2048-token prose prompt (DynamicCache + next-token logits)."""
    ids = lm.tokenizer(prose(), return_tensors="pt").input_ids[:, :PROMPT_TOKENS]
    if ids.shape[1] < PROMPT_TOKENS:
        pytest.skip(f"prompt has only {ids.shape[1]} tokens")
    threads = torch.get_num_threads()
    try:
        return run_prefill(lm.model, ids.to(lm.model.device))
    finally:
        torch.set_num_threads(threads)
