"""Triton kernels over TurboQuant packed codes (GPU; CPU only under ``TRITON_INTERPRET=1``).

* :func:`quantize_pack` — FWHT rotation + nearest centroid + float16 norm + bit-plane packing.
* :func:`dequantize` — packed codes -> ``||x|| Π^T c[idx]`` in one pass (the history a chunked
  prefill's sdpa reads).
* :func:`decode_attention` — flash-decoding over packed K/V codes + the full-precision residual
  window, GQA, fractional bits; nothing dequantized to memory.
* :class:`KernelTables` — a quantizer's signs / codebooks in the form the kernels read.
* :func:`compressed_attention_cuda` — the hook ``turboquant.attention.compressed_attention``
  calls on CUDA (returns None where the kernels do not apply).

Each module holds ``<op>_reference`` (pure torch), the kernel and the wrapper. Importing this
package never fails: without Triton the wrappers raise and :func:`kernels_available` is False.
"""

from __future__ import annotations

import os

import torch

from turboquant.kernels._common import (
    HAS_TRITON,
    SUPPORTED_HEAD_DIMS,
    SUPPORTED_KERNEL_BITS,
    KernelTables,
)
from turboquant.kernels.decode_attention import (
    KeyQJL,
    decode_attention,
    decode_attention_reference,
    decode_attention_store,
)
from turboquant.kernels.dequantize import dequantize, dequantize_reference
from turboquant.kernels.hook import compressed_attention_cuda
from turboquant.kernels.quantize_pack import quantize_pack, quantize_pack_reference


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1`` (kernels run on CPU tensors, slowly)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernels_available(device: torch.device | str | None = None) -> bool:
    """Whether the Triton kernels can run on ``device``: Triton importable and either a CUDA
    device (compiled) or the CPU under ``TRITON_INTERPRET=1``."""
    if not HAS_TRITON:
        return False
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        return torch.cuda.is_available() and not interpreting()
    return dev.type == "cpu" and interpreting()


__all__ = [
    # availability
    "HAS_TRITON",
    "kernels_available",
    "interpreting",
    "SUPPORTED_HEAD_DIMS",
    "SUPPORTED_KERNEL_BITS",
    # tables
    "KernelTables",
    # ops
    "quantize_pack",
    "quantize_pack_reference",
    "dequantize",
    "dequantize_reference",
    "decode_attention",
    "decode_attention_reference",
    "decode_attention_store",
    "KeyQJL",
    # the attention hook (turboquant.attention dispatches here on CUDA)
    "compressed_attention_cuda",
]
