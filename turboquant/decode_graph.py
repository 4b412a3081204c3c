"""One decode step of a causal LM captured in a CUDA graph (static caches only).

``GraphedDecodeStep`` owns fixed input buffers ``ids`` / ``position_ids`` ``[B, 1]``. The caller
runs a few eager ``warmup`` steps (real decode steps: each appends a token to the cache; kernels
compile and autotune outside the capture), then ``capture()`` records ``model(ids, position_ids,
cache)`` once (recording runs no kernel: the cache's device state does not move) and every
``replay(ids, position_ids)`` copies the inputs in and replays the graph: one new token a replay.
The cache must hold every buffer at a fixed address and read its lengths on the device
(transformers' ``StaticCache``, ``turboquant.static_cache.StaticTurboQuantCache``).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch


def decode_inputs(model: Any, ids: torch.Tensor, position_ids: torch.Tensor, cache: Any) -> dict[str, Any]:
    """Keyword arguments of one decode forward for this transformers version: the cache as
    ``cache`` (5.24) or ``past_key_values`` (5.17), plus ``cache_position`` where the model takes it
    (so nothing derives positions from the cache on the host)."""
    params = inspect.signature(model.forward).parameters
    kw = {"input_ids": ids, "position_ids": position_ids, "use_cache": True,
          ("cache" if "cache" in params else "past_key_values"): cache}
    if "cache_position" in params:
        kw["cache_position"] = position_ids[0]
    return kw


class GraphedDecodeStep:
    """``logits [B, V]`` of one token a row, eager (``warmup``) or replayed from a CUDA graph."""

    def __init__(self, model: Any, cache: Any, batch: int, device: torch.device) -> None:
        if torch.device(device).type != "cuda":
            raise ValueError(f"GraphedDecodeStep captures CUDA graphs: `device` must be a CUDA device, got {device}")
        self.model, self.cache = model, cache
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position_ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def _forward(self) -> torch.Tensor:
        out = self.model(**decode_inputs(self.model, self.ids, self.position_ids, self.cache))
        return out.logits[:, -1]

    @torch.no_grad()
    def warmup(self, ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """One eager decode step on a side stream (as torch asks before a capture)."""
        self.ids.copy_(ids)
        self.position_ids.copy_(position_ids)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self._forward()
        torch.cuda.current_stream().wait_stream(side)
        return out

    @torch.no_grad()
    def capture(self) -> None:
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward()

    @torch.no_grad()
    def replay(self, ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The captured step on new inputs; returns the graph's output buffer (overwritten by the
        next replay: clone it to keep it)."""
        if self.graph is None:
            raise RuntimeError("GraphedDecodeStep.replay before capture(): run warmup steps, then capture()")
        self.ids.copy_(ids)
        self.position_ids.copy_(position_ids)
        self.graph.replay()
        return self.logits


__all__ = ["GraphedDecodeStep", "decode_inputs"]
