"""Triton kernels over TurboQuant packed codes (GPU; CPU only under ``TRITON_INTERPRET=1``).

* :func:`quantize_pack` — FWHT rotation + nearest centroid + float16 norm + bit-plane packing.
* :func:`dequantize` — packed codes -> ``||x|| Π^T c[idx]`` in one pass (the history a chunked
  prefill's sdpa reads).
* :func:`decode_attention` — flash-decoding over packed K/V codes + the full-precision residual
  window, GQA, fractional bits; nothing dequantized to memory.
* :class:`KernelTables` — a layout's signs / codebooks in the form the kernels read
  (``KernelTables.from_layout``: halves layouts; every other layout gets
  :class:`~turboquant.kernels.codespace.CodeSpaceTables` and runs the code-space kernels).
* :func:`layout_unsupported` — why the kernels cannot run a layout on a device (None: they can).
* Device-side lengths (:data:`DEVICE_LENGTH`): ``decode_attention(..., length=<int32 tensor>,
  max_length=N, workspace=DecodeWorkspace())`` launches a fixed grid with no host sync.
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
from turboquant.kernels.codespace import (
    CodeSpaceTables,
    decode_attention_codespace_reference,
    dequantize_codespace_reference,
    layout_reason,
)
from turboquant.kernels.decode_attention import (
    KeyQJL,
    decode_attention,
    decode_attention_reference,
    decode_attention_store,
    store_tables,
)
from turboquant.kernels.decode_call import DecodeAttentionCall
from turboquant.kernels.dequantize import dequantize, dequantize_reference
from turboquant.kernels.hook import compressed_attention_cuda
from turboquant.kernels.quantize_pack import quantize_pack, quantize_pack_reference
from turboquant.kernels.workspace import DecodeWorkspace

# decode_attention takes an int32/int64 device `length` + `max_length` (fixed grid, no host sync)
# and a `workspace` (preallocated split buffers): what a CUDA-graph-captured decode step needs
DEVICE_LENGTH = True


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


def layout_unsupported(layout, device: torch.device | str | None = None, mode: str = "mse") -> str | None:
    """Why the Triton kernels (``quantize_pack``, ``dequantize``, ``decode_attention``) cannot run
    ``layout`` (a :class:`~turboquant.layout.CodeLayout`) in ``mode`` on ``device``; None: they can.

    Ask once per store: ``backend="auto"`` then falls back to torch (one warning) on a reason, an
    explicit kernel backend raises naming it."""
    if mode not in ("mse", "prod"):
        return f"mode {mode!r} (the kernels take 'mse' codes, and 'prod' keys of one-group layouts)"
    if mode == "prod":
        if getattr(layout, "is_grouped", False):
            return f"mode 'prod' with outlier layout {layout.name!r} (outlier layouts are TurboQuant-mse)"
        return ("mode 'prod' (quantize_pack/dequantize write and read mse codes only; decode_attention "
                "takes prod keys of one-group layouts through decode_attention_store)")
    why = layout_reason(layout)
    if why is not None:
        return f"layout {getattr(layout, 'name', layout)!r}: {why}"
    if device is not None and not kernels_available(device):
        return f"device {device} (the kernels need Triton with CUDA, or the CPU under TRITON_INTERPRET=1)"
    return None


__all__ = [  # availability, tables, ops, the attention hook (sorted)
    "DEVICE_LENGTH",
    "HAS_TRITON",
    "SUPPORTED_HEAD_DIMS",
    "SUPPORTED_KERNEL_BITS",
    "CodeSpaceTables",
    "DecodeAttentionCall",
    "DecodeWorkspace",
    "KernelTables",
    "KeyQJL",
    "compressed_attention_cuda",
    "decode_attention",
    "decode_attention_codespace_reference",
    "decode_attention_reference",
    "decode_attention_store",
    "dequantize",
    "dequantize_codespace_reference",
    "dequantize_reference",
    "interpreting",
    "kernels_available",
    "layout_unsupported",
    "quantize_pack",
    "quantize_pack_reference",
    "store_tables",
]
