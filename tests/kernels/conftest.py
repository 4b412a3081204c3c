"""Kernel tests run compiled on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1``.

Without CUDA this conftest turns the Triton interpreter on *before* the kernel modules are
imported (and re-imports them if something imported them compiled), so the tiny CPU cases check
the same kernel code that runs on the GPU. Triton's interpreter computes ``tl.dot`` on bfloat16
operands wrongly (a standalone 16x16 load + dot returns garbage), so CPU cases use float32/float16
tensors; bfloat16 is covered by the ``gpu`` tests (``decode_attention`` refuses a bfloat16 window
on CPU).
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    for _name in ("turboquant.kernels._common", "turboquant.kernels.quantize_pack",
                  "turboquant.kernels.decode_attention", "turboquant.kernels.dequantize",
                  "turboquant.kernels.segmented", "turboquant.kernels.codespace", "turboquant.kernels.hook", "turboquant.kernels"):
        if _name in sys.modules:
            importlib.reload(sys.modules[_name])


def kernel_device() -> torch.device | None:
    """CUDA when present, else CPU when the Triton interpreter is on, else None."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return torch.device("cpu")
    return None


@pytest.fixture
def kdev() -> torch.device:
    """Device the kernels run on here; skips when neither CUDA nor the Triton interpreter exists."""
    dev = kernel_device()
    if dev is None:
        pytest.skip("needs Triton with a CUDA GPU, or Triton's interpreter (TRITON_INTERPRET=1) on CPU")
    return dev


@pytest.fixture(scope="session")
def cuda() -> torch.device:
    """A CUDA device with compiled (not interpreted) Triton; skips otherwise."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set: GPU tests need compiled kernels")
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("needs Triton (pip install triton)")
    return torch.device("cuda")
