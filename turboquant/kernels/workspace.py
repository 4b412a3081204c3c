"""Graph-capturable launch state of the decode kernels: device-side lengths and split buffers.

A decode step captured in a CUDA graph may not read anything on the host that changes between
replays. So the valid length can be an int32/int64 *device* tensor (shape ``[]``, ``[1]`` or
``[B]``): the grid is sized by a fixed ``max_length`` and every program reads its sequence's
``L_b = min(length[b], max_length)`` from device memory, programs whose tokens lie past ``L_b``
exit after writing an empty partial (``m = -inf``, ``l = 0``). :class:`DecodeWorkspace` keeps the
split buffers (``m``, ``l``, ``acc``, the output) of one call shape, so repeated calls allocate
nothing and the tensors a graph captured keep their addresses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

LENGTH_DTYPES = (torch.int32, torch.int64)


@dataclass
class LengthArgs:
    """What a kernel launch needs of a length: ``bound`` sizes the grid (host int, fixed),
    ``value`` is the runtime int bound the kernel takes, ``tensor`` the device lengths (or None)
    and ``stride`` their batch stride (0: one length for every sequence)."""

    bound: int
    value: int
    tensor: torch.Tensor | None
    stride: int


def _check_int(v: object, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"`{name}` must be an int, got {type(v).__name__} {v!r}")
    return v


def resolve_length(
    length: int | torch.Tensor,
    max_length: int | None,
    batch: int,
    capacity: int,
    device: torch.device,
    name: str = "length",
) -> LengthArgs:
    """Validate ``length`` (an int, or an int32/int64 tensor of shape ``[]``, ``[1]`` or ``[B]``
    on ``device``) against ``max_length`` and the buffer ``capacity``; no host sync on CUDA.

    A CUDA length tensor cannot be checked against ``max_length`` without a host sync: the kernels
    clamp it to ``max_length`` instead (never reading past the buffers). A CPU tensor is checked."""
    if isinstance(length, torch.Tensor):
        if max_length is None:
            raise ValueError(
                f"`{name}` as a tensor needs `max_length` (an int): the launch grid is sized "
                "by it, not by the (device-side) length"
            )
        max_length = _check_int(max_length, "max_length")
        if length.dtype not in LENGTH_DTYPES:
            raise TypeError(f"`{name}` tensor must be int32 or int64, got {length.dtype}")
        if length.dim() > 1 or length.numel() not in (1, batch):
            raise ValueError(
                f"`{name}` tensor must have shape [], [1] or [B]=[{batch}], got {tuple(length.shape)}"
            )
        ldev = length.device
        if ldev != device:
            raise ValueError(f"`{name}` tensor is on {ldev}, the query on {device}")
        if not 0 <= max_length <= capacity:
            raise ValueError(
                f"`max_length`={max_length} must be in [0, {capacity}] (the buffer capacity)"
            )
        if ldev.type == "cpu" and length.numel():
            lo, hi = int(length.min()), int(length.max())
            if lo < 0 or hi > max_length:
                raise ValueError(
                    f"`{name}` tensor holds {lo if lo < 0 else hi}, outside [0, max_length={max_length}]"
                )
        stride = 0 if length.numel() == 1 else int(length.stride(0))
        return LengthArgs(
            max_length, max_length, length.reshape(-1) if length.dim() == 0 else length, stride
        )
    length = _check_int(length, name)
    if not 0 <= length <= capacity:
        raise ValueError(f"`{name}`={length} must be in [0, {capacity}] (the buffer capacity)")
    if max_length is None:
        return LengthArgs(length, length, None, 0)
    max_length = _check_int(max_length, "max_length")
    if not length <= max_length <= capacity:
        raise ValueError(
            f"`max_length`={max_length} must be in [{name}={length}, capacity={capacity}]"
        )
    return LengthArgs(max_length, length, None, 0)


@dataclass
class DecodeWorkspace:
    """Preallocated buffers of the decode kernels, one set a call shape (kept while it repeats).

    Pass one workspace a layer (or a cache) as ``decode_attention(..., workspace=ws)``: the first
    call allocates, every later call of the same shape reuses the tensors (no allocation, fixed
    addresses: what a CUDA graph replays). The returned output is a workspace tensor too; it is
    overwritten by the next call with this workspace.

    ``version`` counts the allocations (a buffer replaced changes it); ``memo`` is the decode
    wrapper's record of the last buffer set it took (plan token, splits, version, buffers), so a
    repeated call looks nothing up."""

    buffers: dict = field(default_factory=dict)
    version: int = 0
    memo: tuple | None = None

    def get(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        t = self.buffers.get(name)
        if t is None or tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != device:
            t = torch.empty(shape, dtype=dtype, device=device)
            self.buffers[name] = t
            self.version += 1
        return t

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers.values())


def buffer(
    workspace: DecodeWorkspace | None,
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """``workspace.get(...)`` or a fresh ``torch.empty`` when there is no workspace."""
    if workspace is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if not isinstance(workspace, DecodeWorkspace):
        raise TypeError(
            f"`workspace` must be a DecodeWorkspace (or None), got {type(workspace).__name__}"
        )
    return workspace.get(name, shape, dtype, device)


__all__ = ["DecodeWorkspace", "LengthArgs", "buffer", "resolve_length"]
