"""Input checks shared by the quantizers, the cache and the index: clear errors, never silent."""

from __future__ import annotations

import operator

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


def check_seed(seed: object, name: str = "seed") -> int:
    """A seed is an int (``1.7`` would silently seed like ``1``; ``True`` like ``1``)."""
    if isinstance(seed, bool) or not hasattr(type(seed), "__index__"):
        raise TypeError(f"`{name}` must be an int, got {seed!r} ({type(seed).__name__})")
    seed = operator.index(seed)
    if seed < 0:
        raise ValueError(f"`{name}` must be an int >= 0, got {seed}")
    return seed


def check_choice(value: object, name: str, allowed: tuple) -> object:
    """``value`` must be one of ``allowed`` (named in the error)."""
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}")
    return value


def check_float_dtype(dtype: object, name: str = "dtype") -> torch.dtype:
    """An output dtype must be floating: an integer dtype would truncate reconstructions."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        allowed = ", ".join(str(t).removeprefix("torch.") for t in FLOAT_DTYPES)
        raise TypeError(f"`{name}` must be a floating torch.dtype ({allowed}), got {dtype!r}")
    return dtype


def check_packed(t: object, name: str, dtype: torch.dtype, last: int | None = None,
                 lead: tuple[int, ...] | None = None) -> torch.Tensor:
    """A stored tensor of a packed code: ``dtype``, last dim ``last`` (if given) and leading shape
    ``lead`` (if given: the vectors' shape, the same for codes and norms)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"`{name}` must have dtype {dtype}, got {t.dtype}")
    shape = tuple(t.shape)
    if last is not None and (not shape or shape[-1] != last):
        raise ValueError(f"`{name}` has shape {shape}: expected a last dimension of {last}")
    vectors = shape[:-1] if last is not None else shape
    if lead is not None and vectors != tuple(lead):
        raise ValueError(f"`{name}` covers vectors of shape {vectors}, but the codes cover {tuple(lead)}")
    return t
