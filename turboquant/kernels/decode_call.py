"""A decode-attention call bound to one layer's stores: planned once, then only launched.

``decode_attention`` validates its arguments and looks its launch plan up on every call (a key
of every tensor's address, shape and strides). A decode loop calls it with the same stores,
lengths and buffers every step and only a new query, so :class:`DecodeAttentionCall` splits the
call the way serving engines split attention into *plan* and *run*: the first call plans,
validates and compiles exactly as ``decode_attention`` does and keeps the prepared launch (split-K
shape, buffers, every launch argument but the query's address); each later call checks what could
have moved and launches. The output is the same tensor as ``decode_attention``'s with the bound
arguments, bit for bit: both run :func:`~turboquant.kernels.decode_attention._launch_step`. On
CUDA the call goes one step further by default: it captures itself into a CUDA graph at its second
call and replays that graph on later eager calls (one launch, whatever the layout).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

import torch

from turboquant.kernels.workspace import DecodeWorkspace

# the module (the package re-exports its function under the same name)
_da = importlib.import_module("turboquant.kernels.decode_attention")

_BOUND_NAMES = ("k_codes", "k_norms", "v_codes", "v_norms", "residual_k", "residual_v", "length",
                "residual_length", "k_outliers", "v_outliers")

if TYPE_CHECKING:  # cuda_decode imports this package at run time
    from turboquant.kernels.cuda_decode import CudaConfig


class DecodeAttentionCall:
    """``decode_attention(query, <bound arguments>)`` for a query of one fixed shape, step after step.

    Bound at construction (the arguments of :func:`~turboquant.kernels.decode_attention`): the
    packed stores, ``length`` and ``residual_length`` (ints, or int32/int64 device tensors whose
    *values* may change between calls, updated in place: the static cache's case, with
    ``max_length``), the residual buffers, ``backend``, ``cuda_config`` and a
    :class:`DecodeWorkspace` (one is made when none is given; the output is overwritten by the next
    call, as with any workspace).

    ``call(query)`` returns ``[B, 1, H_q, d]``. The first call fixes the query's shape, strides,
    dtype and device; a later query that differs raises ``ValueError``, and so does a bound tensor
    whose address, shape or strides changed since (resized or ``set_`` in place), naming it.
    Calls while a CUDA graph is being captured, and calls on a device other than the current one,
    take the general path of ``decode_attention`` (the same kernels and arguments).

    ``graph`` (default: True on CUDA): from the second call on, an eager call copies the query into
    a fixed buffer and replays a CUDA graph of the call captured then (one graph launch in place of
    the 2-5 kernel launches and the Python between them, for every layout and key mode); the
    returned tensor is the graph's output, overwritten by the next call. ``graph=False``: halves
    layouts relaunch the kept step, outlier (code-space) layouts run ``decode_attention`` every call.
    """

    def __init__(self, k_codes: torch.Tensor, k_norms: torch.Tensor, v_codes: torch.Tensor,
                 v_norms: torch.Tensor, length: int | torch.Tensor, k_tables, v_tables, scaling: float,
                 residual_k: torch.Tensor | None = None, residual_v: torch.Tensor | None = None, *,
                 k_qjl=None, k_outliers: torch.Tensor | None = None, v_outliers: torch.Tensor | None = None,
                 max_length: int | None = None, residual_length: int | torch.Tensor | None = None,
                 backend: str = "auto", workspace: DecodeWorkspace | None = None, cuda_config: CudaConfig | None = None,
                 graph: bool | None = None):
        if workspace is not None and not isinstance(workspace, DecodeWorkspace):
            raise TypeError(f"`workspace` must be a DecodeWorkspace or None, got {type(workspace).__name__}")
        self.workspace = workspace if workspace is not None else DecodeWorkspace()
        self._args = (k_codes, k_norms, v_codes, v_norms, length, k_tables, v_tables, scaling)
        self._kw = {"residual_k": residual_k, "residual_v": residual_v, "k_qjl": k_qjl, "k_outliers": k_outliers,
                    "v_outliers": v_outliers, "max_length": max_length, "residual_length": residual_length,
                    "backend": backend, "cuda_config": cuda_config}
        named = list(zip(_BOUND_NAMES, (k_codes, k_norms, v_codes, v_norms, residual_k, residual_v, length,
                                        residual_length, k_outliers, v_outliers)))
        if k_qjl is not None:
            named += [("k_qjl.qjl", getattr(k_qjl, "qjl", None)), ("k_qjl.rnorms", getattr(k_qjl, "rnorms", None))]
        # (name, tensor, address, shape, strides) of every bound tensor: checked before each launch
        self._bound = tuple((n, t, t.data_ptr(), t.shape, t.stride()) for n, t in named if isinstance(t, torch.Tensor))
        self._planned = isinstance(k_tables, _da.KernelTables) and isinstance(v_tables, _da.KernelTables)
        self._plan = self._step = self._query = None
        if graph is not None and not isinstance(graph, bool):
            raise TypeError(f"`graph` must be None, True or False, got {graph!r}")
        self._use_graph = graph
        self._graph = self._gq = self._gout = self._keep = None

    def _general(self, query: torch.Tensor) -> torch.Tensor:
        return _da.decode_attention(query, *self._args, **self._kw, workspace=self.workspace)

    def _check_bound(self) -> None:
        for name, t, ptr, shape, stride in self._bound:
            if t.data_ptr() != ptr or t.shape != shape or t.stride() != stride:
                raise ValueError(
                    f"DecodeAttentionCall: bound `{name}` moved (address, shape or strides changed since the "
                    f"call was built: now {tuple(t.shape)} at {t.data_ptr():#x}, bound {tuple(shape)} at "
                    f"{ptr:#x}); build a new DecodeAttentionCall for the new tensor")

    def _prepare(self, current) -> _da._Step:
        """``decode_attention``'s per-call checks (lengths, residual rows) and launch arguments."""
        a, kw = self._args, self._kw
        return _da._prepare_step(self._plan, a[0], a[1], a[2], a[3], a[4], kw["residual_k"], kw["residual_v"],
                                 kw["max_length"], kw["residual_length"], self.workspace, False, current)

    def _first(self, query: torch.Tensor) -> torch.Tensor:
        """Plan, validate and compile like ``decode_attention`` (its plan cache included); keep the step."""
        out = self._general(query)  # the full validation; compiles the variants this call needs
        self._query = (query.shape, query.stride(), query.dtype, query.device)
        if self._use_graph is None:
            self._use_graph = query.device.type == "cuda"
        elif self._use_graph and query.device.type != "cuda":
            raise ValueError(f"DecodeAttentionCall(graph=True) needs a CUDA query, got one on {query.device}")
        if not self._planned:
            return out
        a, kw = self._args, self._kw
        key = _da._plan_key(query, a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], kw["residual_k"],
                            kw["residual_v"], None, None, None, 1, None, kw["backend"], kw["k_qjl"],
                            kw["max_length"], kw["residual_length"], kw["cuda_config"])
        plan = _da._PLANS.get(key) if key is not None else None
        if plan is None:  # plans off (or a key the cache cannot hold): general path every call
            self._planned = False
            return out
        self._plan = plan
        self._step = self._prepare(_da._stream_state(plan.dev)[0])
        return out

    def _capture(self, query: torch.Tensor) -> None:
        """Capture one call into this call's own CUDA graph (the query read from a fixed buffer);
        keep every workspace tensor the graph writes, so a workspace that later replaces a buffer
        cannot free memory the graph replays into."""
        gq = torch.empty_strided(query.shape, query.stride(), dtype=query.dtype, device=query.device)
        gq.copy_(query)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = self._general(gq)
        self._keep = tuple(self.workspace.buffers.values())
        self._graph, self._gq, self._gout = g, gq, out

    def __call__(self, query: torch.Tensor) -> torch.Tensor:
        if self._query is None:
            return self._first(query)
        shape, stride, dtype, device = self._query
        if query.shape != shape or query.dtype is not dtype or query.device != device or query.stride() != stride:
            raise ValueError(
                f"DecodeAttentionCall: `query` must keep the first call's shape {tuple(shape)}, strides "
                f"{stride}, dtype {dtype} and device {device}; got {tuple(query.shape)}, {query.stride()}, "
                f"{query.dtype}, {query.device} (build one call per query shape)")
        self._check_bound()
        current, capturing = _da._stream_state(device)
        if current is not None:
            if capturing or current[0] != device.index:
                return self._general(query)  # a graph being captured forks streams; another device switches first
            if self._use_graph:  # eager: replay this call's own graph (one launch, any layout)
                if self._graph is None:
                    self._capture(query)
                self._gq.copy_(query)
                self._graph.replay()
                return self._gout
        st = self._step
        if st is None:  # code-space layouts, or no plan: the general path every call
            return self._general(query)
        # prepared anew where the workspace's buffers were replaced, and on the host (CPU) every call:
        # there host length tensors are checked against max_length, as decode_attention checks them
        if current is None or st.ws_version != self.workspace.version:
            self._step = st = self._prepare(current)
        a, kw = self._args, self._kw
        return _da._launch_step(self._plan, st, query, a[0], a[1], a[2], a[3], kw["residual_k"], kw["residual_v"],
                                kw["k_qjl"], False, current)


__all__ = ["DecodeAttentionCall"]
