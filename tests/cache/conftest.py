"""Fixtures of the model-level cache claims: one 2048-token prefill of the selected model, shared
by C08 (real KV proxy) and C11 (decode throughput)."""

from __future__ import annotations

import pytest
import torch

from turboquant.eval.prose import prose_token_ids
from turboquant.eval.throughput import Prefill, run_prefill

PROMPT_TOKENS = 2048  # exactly: turboquant.eval.prose cycles its text until the count is reached


@pytest.fixture(scope="session")
def prefill_2048(lm) -> Prefill:
    """The model's exact prefill of a prose prompt of exactly 2048 tokens (standard-library
    documentation, cycled if a Python version ships less of it; DynamicCache + next-token
    logits)."""
    ids = torch.tensor([prose_token_ids(lambda text: lm.tokenizer(text).input_ids, PROMPT_TOKENS)])
    threads = torch.get_num_threads()
    try:
        return run_prefill(lm.model, ids.to(lm.model.device))
    finally:
        torch.set_num_threads(threads)
