"""Input checks shared by the quantizers, the cache and the index: clear errors, never silent."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_float_tensor(x: object, name: str, d: int | None = None, allow_empty: bool = False) -> torch.Tensor:
    """Return ``x`` if it is a finite floating tensor with last dim ``d``; raise otherwise.

    Raises ``TypeError`` for non-tensors and integer/bool dtypes, ``ValueError`` for a wrong last
    dimension, empty tensors and NaN/Inf values. Messages name the parameter and what is allowed.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        allowed = ", ".join(str(t).removeprefix("torch.") for t in FLOAT_DTYPES)
        raise TypeError(f"`{name}` must have a floating dtype ({allowed}), got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"`{name}` must have at least one dimension (the vector dimension), got a scalar")
    if d is not None and x.shape[-1] != d:
        raise ValueError(f"`{name}` has last dimension {x.shape[-1]}, but the quantizer was built for d={d}")
    if x.numel() == 0:
        if allow_empty:
            return x
        raise ValueError(f"`{name}` is empty (shape {tuple(x.shape)}); pass at least one vector")
    if not bool(torch.isfinite(x).all()):
        n_bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"`{name}` contains {n_bad} NaN/Inf values; only finite inputs can be quantized")
    return x


def check_power_of_two(d: int, name: str = "d") -> int:
    if not isinstance(d, int) or isinstance(d, bool) or d < 1:
        raise ValueError(f"`{name}` must be a positive int, got {d!r}")
    if d & (d - 1):
        raise ValueError(
            f"`{name}`={d} is not a power of two; the signed-Hadamard rotation needs d in "
            "{2, 4, 8, ..., 2^k}: use rotation='dense' for other dimensions"
        )
    return d
