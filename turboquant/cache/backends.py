"""How a :class:`~turboquant.cache.store.PackedStore` encodes and decodes: one backend object a
store, chosen once (at its first write, when the device is known) by :func:`select_backend`.

* :class:`TorchCodes` — the pure-torch quantizer (the reference): ``x -> (codes, norms, ...)``
  then copied into the store; decode = centroid gather ``c[idx]``, times ``||x||``, then ``Π^T``.
* :class:`TritonCodes` — the Triton ``quantize_pack`` kernel writing straight into the store's
  buffers and the ``dequantize`` kernel (CUDA, or the CPU under ``TRITON_INTERPRET=1``).

Both write the same layout (``codec.layout``); a backend overrides only encode and decode, like
transformers' ``QuantizedLayer`` backends.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Protocol

import torch

from turboquant.attention import qjl_signs
from turboquant.cache.settings import APPEND_BACKENDS
from turboquant.quantizer import NORM_DTYPE

if TYPE_CHECKING:
    from turboquant.cache.codec import TensorCodec
    from turboquant.cache.store import PackedStore

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_WARNED_LAYOUTS: set = set()


class CodesBackend(Protocol):
    """Encode ``x`` [B, H, T, D] after a store's tokens; decode its tokens back."""

    name: str

    def append(self, store: PackedStore, x: torch.Tensor) -> None: ...

    def dequantize(self, store: PackedStore, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor: ...


def norm_range_message(start: int, stop: int, kept: int) -> str:
    f16 = torch.finfo(NORM_DTYPE)
    return (f"a vector norm appended at tokens [{start}, {stop}) lies outside the float16 norm storage range "
            f"[{f16.tiny:.3g}, {f16.max:.0f}] (or is not finite); the store keeps its first {kept} tokens")


def kernel_unsupported(codec: TensorCodec, device: torch.device) -> str | None:
    """Why the Triton kernels (``quantize_pack``, ``dequantize``) cannot serve ``codec`` on
    ``device`` (``None``: they can). The one place this rule lives."""
    from turboquant import kernels

    if codec.mode != "mse":
        return f"mode {codec.mode!r} (the kernels handle 'mse' codes only, no QJL plane)"
    if codec.grouped:
        why = kernels.layout_unsupported(codec.layout)  # the device is checked below, once
        if why is not None:
            return why
    else:
        if codec.rotation is None or codec.rotation.kind != "hadamard":
            kind = getattr(codec.rotation, "kind", None)
            return f"rotation {kind!r} (the kernels rotate with the Hadamard transform only)"
        if codec.d not in kernels.SUPPORTED_HEAD_DIMS:
            return f"head_dim {codec.d} (the kernels support {kernels.SUPPORTED_HEAD_DIMS})"
        if codec.bits not in kernels.SUPPORTED_KERNEL_BITS:
            return f"{codec.bits} bits (the kernels support {kernels.SUPPORTED_KERNEL_BITS})"
    if not kernels.kernels_available(device):
        return f"device {device} (the kernels need Triton with CUDA, or the CPU under TRITON_INTERPRET=1)"
    return None


def input_unsupported(x: torch.Tensor) -> str | None:
    """Why the encoder kernel cannot read ``x`` (``None``: it can)."""
    if x.dtype not in KERNEL_DTYPES:
        return f"dtype {x.dtype} (the kernel reads float32/float16/bfloat16)"
    if x.dim() != 4:
        return f"a {x.dim()}-dim input (the store appends [B, H, T, D])"
    return None


def _refuse(action: str, why: str) -> ValueError:
    return ValueError(f"`append_backend`='triton' cannot {action}: {why}; use append_backend='auto' "
                      "(kernel where it applies, pure torch elsewhere) or 'torch'")


def select_backend(requested: str, codec: TensorCodec, device: torch.device, action: str) -> CodesBackend:
    """``"torch"`` -> :class:`TorchCodes`; ``"triton"`` -> :class:`TritonCodes` or a ``ValueError``
    naming why the kernels cannot run; ``"auto"`` -> the kernels on CUDA where they apply (one
    ``RuntimeWarning`` a layout that falls back), else torch."""
    if requested not in APPEND_BACKENDS:
        raise ValueError(f"`backend` must be one of {APPEND_BACKENDS}, got {requested!r}")
    if requested == "torch" or (requested == "auto" and device.type != "cuda"):
        return TorchCodes()
    why = kernel_unsupported(codec, device)
    if why is None:
        return TritonCodes(codec, device, strict=requested == "triton")
    if requested == "triton":
        raise _refuse(action, why)
    if codec.grouped and codec.layout.name not in _WARNED_LAYOUTS:
        _WARNED_LAYOUTS.add(codec.layout.name)
        warnings.warn(f"append_backend='auto': the Triton kernels cannot run {why}; encoding and decoding with "
                      "the pure-torch quantizer instead", RuntimeWarning, stacklevel=5)
    return TorchCodes()


class TorchCodes:
    """The pure-torch quantizer: encode, then copy into the store; decode by gather + ``Π^T``."""

    name = "torch"

    def append(self, store: PackedStore, x: torch.Tensor) -> None:
        store.set_outliers(x)
        parts = {f: p for f, p in zip(store.FIELDS, store.codec.encode(x, store.outliers)) if p is not None}
        need = store.length + x.shape[-2]
        store.reserve(need, {f: (tuple(p.shape[:2]), tuple(p.shape[3:]), p.dtype, p.device) for f, p in parts.items()})
        for f, p in parts.items():
            getattr(store, f)[:, :, store.length : need] = p
        store.length = need

    def dequantize(self, store: PackedStore, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
        c, n = store.codec, store.length
        res = None
        if store.codes is not None:
            y = c.scale_norms(c.table.gather(store.codes[:, :, :n]), store.norms[:, :, :n])
            res = c.unrotate(y, store.outliers)
        if store.qjl is not None:
            z = qjl_signs(store.qjl[:, :, :n], c.d)
            o = c.qjl_scale * store.rnorms[:, :, :n].float().unsqueeze(-1) * (z @ c.S)
            res = o if res is None else res + o
        if out is None:
            return res.to(dtype)
        out[:, :, :n] = res
        return out[:, :, :n]


class TritonCodes:
    """The Triton kernels: ``quantize_pack`` into ``codes[:, :, L:L+T]`` / ``norms[:, :, L:L+T]``
    (one pass over ``x``, no intermediate tensors) and ``dequantize`` in one pass."""

    name = "triton"

    def __init__(self, codec: TensorCodec, device: torch.device, strict: bool) -> None:
        from turboquant.kernels import KernelTables

        self.tables = KernelTables.from_quantizer(codec.quantizer, device)
        self.strict = strict  # explicit "triton": an input the kernel cannot read raises
        self._torch = TorchCodes()

    def append(self, store: PackedStore, x: torch.Tensor) -> None:
        why = input_unsupported(x)
        if why is not None:
            if self.strict:
                raise _refuse("encode this append", why)
            return self._torch.append(store, x)
        from turboquant.kernels import quantize_pack

        store.set_outliers(x)
        t = self.tables
        need = store.length + x.shape[-2]
        lead = tuple(x.shape[:2])
        store.reserve(need, {"codes": (lead, (t.code_nbytes,), torch.uint8, x.device),
                             "norms": (lead, store.norm_trail(), NORM_DTYPE, x.device)})
        codes, norms = store.codes[:, :, store.length : need], store.norms[:, :, store.length : need]
        kw = {"outliers": store.outliers} if store.codec.grouped else {}
        quantize_pack(x, t, out_codes=codes, out_norms=norms, check_range=False, **kw)
        store.kernel_appends += 1
        store.commit_checked(norms, need, defer=x.is_cuda)

    def dequantize(self, store: PackedStore, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
        from turboquant.kernels.dequantize import dequantize

        store.kernel_dequantizes += 1
        kw = {"outliers": store.outliers} if store.codec.grouped else {}
        return dequantize(store.codes, store.norms, store.length, self.tables, dtype, out=out, **kw)
