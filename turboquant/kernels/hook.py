"""The fused decode path for ``turboquant.attention.compressed_attention`` on CUDA.

``compressed_attention(query, layer, scaling, mask)`` calls :func:`compressed_attention_cuda`
first; it returns ``None`` (and the pure-torch reference runs) wherever the kernels do not apply:
more than one query token (prefill / chunked prefill), an explicit attention mask (padding), QJL
(prod) *values*, prod keys at 1 bit (no MSE part), a dense rotation of a one-group layout, a
layout :func:`turboquant.kernels.layout_unsupported` names a reason for, or a head dim outside
``SUPPORTED_HEAD_DIMS``. Outlier layouts (``turboquant.layout``, two channel groups; K and V may
differ) run the grouped decode kernels when :data:`GROUPED_DECODE` is True: the word decoder of
:mod:`turboquant.kernels.segmented` where every group's code rows are whole 32-bit words, else
the byte-column kernel of :mod:`turboquant.kernels.codespace`. Prod keys of 2 ... 4 bits run in the Triton kernel: the MSE part (``b-1``
bits) from ``codec.mse``'s tables, the QJL term ``√(π/2)/d · ||r|| · (S q)·z`` from ``codec.S``.
"""

from __future__ import annotations

import torch

from turboquant.kernels._common import HAS_TRITON, SUPPORTED_HEAD_DIMS, KernelTables

# outlier layouts through the grouped decode kernels (False: they take the torch reference)
GROUPED_DECODE = True


def compressed_attention_cuda(query: torch.Tensor, layer, scaling: float, attention_mask) -> torch.Tensor | None:
    """Decode attention of ``query`` [B, H_q, 1, D] over a ``TurboQuantLayer`` (packed K/V stores +
    residual window) with the Triton kernel; ``[B, 1, H_q, D]`` or ``None`` when not applicable."""
    if not query.is_cuda:
        return None
    return fused_decode(query, layer, scaling, attention_mask)


def fused_decode(query: torch.Tensor, layer, scaling: float, attention_mask) -> torch.Tensor | None:
    """:func:`compressed_attention_cuda` without the CUDA check (on CPU tensors it needs
    ``TRITON_INTERPRET=1``: the tests run the whole decode path through it there)."""
    if not HAS_TRITON or query.shape[2] != 1 or attention_mask is not None:
        return None
    if query.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return None
    ks, vs = getattr(layer, "key_store", None), getattr(layer, "value_store", None)
    if ks is None or vs is None or ks.codes is None or vs.codes is None:
        return None  # nothing stored yet, or prod at 1 bit (QJL only)
    if getattr(vs, "qjl", None) is not None:
        return None  # prod values: the kernels accumulate mse values only
    if getattr(ks.codec, "grouped", False) or getattr(vs.codec, "grouped", False):
        return _grouped_decode(query, layer, ks, vs, scaling) if GROUPED_DECODE else None
    kq, vq = ks.codec.mse, vs.codec.mse  # TurboQuant-mse part: the quantizer itself, or prod's b-1 bits
    if getattr(kq.rotation, "kind", None) != "hadamard" or getattr(vq.rotation, "kind", None) != "hadamard":
        return None
    from turboquant.kernels.decode_attention import KeyQJL, decode_attention

    kt = KernelTables.from_quantizer(kq, query.device)
    vt = KernelTables.from_quantizer(vq, query.device)
    k_qjl = KeyQJL.from_store(ks) if getattr(ks, "qjl", None) is not None else None
    rk, rv = layer.residual_keys(), layer.residual_values()
    return decode_attention(query, ks.codes, ks.norms, vs.codes, vs.norms, int(ks.length), kt, vt, scaling, rk, rv,
                            k_qjl=k_qjl)


def _grouped_decode(query: torch.Tensor, layer, ks, vs, scaling: float) -> torch.Tensor | None:
    """Outlier layouts (either store): the code-space decode kernel, or None where a layout (or the
    other store's codec) is one no kernel runs."""
    from turboquant.kernels import layout_unsupported
    from turboquant.kernels.decode_attention import decode_attention_store

    for st in (ks, vs):
        if getattr(st.codec, "mode", "mse") != "mse" or layout_unsupported(st.codec.layout, query.device) is not None:
            return None
    return decode_attention_store(query, ks, vs, scaling=scaling, residual_k=layer.residual_keys(),
                                  residual_v=layer.residual_values())
