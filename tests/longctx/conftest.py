"""Fixtures of the long-context tests: the model (shared with the suite's ``lm`` fixture when the
suite defines one), the shipped LongBench-E fixture folder, and parsed needle options."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURE_DIR = ROOT / "data" / "longbench_e"


@pytest.fixture(scope="session")
def lc_lm(request: pytest.FixtureRequest, tq_options: SimpleNamespace) -> SimpleNamespace:
    """``model`` + ``tokenizer``: the suite's session ``lm`` fixture, or loaded here (same options)."""
    try:
        lm = request.getfixturevalue("lm")
    except pytest.FixtureLookupError:
        from turboquant.models import ModelNotAvailable, load_model

        try:
            lm = load_model(
                tq_options.model_id,
                torch_dtype=tq_options.torch_dtype,
                attn_implementation=tq_options.attn_implementation,
                local_files_only=tq_options.local_files_only,
            )
        except ModelNotAvailable as exc:
            pytest.skip(str(exc))
    return SimpleNamespace(model=lm.model, tokenizer=lm.tokenizer)


@pytest.fixture(scope="session")
def longbench_fixture_dir() -> Path:
    return FIXTURE_DIR
