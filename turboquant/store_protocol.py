"""What the attention reads from a compressed cache layer: two small protocols, so that
``turboquant.attention`` and the kernels depend on these attributes, not on ``turboquant.cache``.

A store holds tokens ``[0, length)`` of one tensor (K or V) of one layer as packed codes
``c = Q(Π x / ||x||)`` with float16 norms ``||x||``; its ``codec`` knows the rotation ``Π``
(``rotate``/``unrotate``), the centroid tables and the ``CodeLayout``.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class CodeStore(Protocol):
    """Packed codes of one (layer, K|V): uint8 ``codes`` [B, H, cap, code_nbytes], float16
    ``norms`` [B, H, cap] (or [B, H, cap, groups]), optional QJL plane ``qjl`` and residual norms
    ``rnorms`` (prod keys), outlier channels ``outliers`` [H, n_out] or None."""

    codec: Any
    codes: torch.Tensor | None
    norms: torch.Tensor | None
    qjl: torch.Tensor | None
    rnorms: torch.Tensor | None
    outliers: torch.Tensor | None
    length: int


class CompressedLayer(Protocol):
    """A cache layer the ``"turboquant"`` attention scores: K/V stores plus the full-precision
    residual window of the newest tokens (``residual_keys()`` [B, H, r, D] or None)."""

    layer_idx: int
    num_heads: int
    key_store: CodeStore
    value_store: CodeStore

    def residual_keys(self) -> torch.Tensor | None: ...

    def residual_values(self) -> torch.Tensor | None: ...
