"""``PackedStore``: the packed codes of one (layer, K|V), in buffers that grow by whole chunks."""

from __future__ import annotations

import math

import torch

from turboquant.cache.backends import CodesBackend, TorchCodes, norm_range_message, select_backend
from turboquant.cache.codec import TensorCodec
from turboquant.cache.settings import APPEND_BACKENDS
from turboquant.layout import select_outliers
from turboquant.quantizer import NORM_DTYPE


class PackedStore:
    """Packed codes of one (layer, K|V): tokens ``[0, length)`` of buffers of ``capacity`` tokens.

    ``codes`` uint8 [B, H, cap, code_nbytes] (bit planes, rotated domain); ``norms`` float16
    [B, H, cap]; prod mode: ``qjl`` uint8 [B, H, cap, D/8], ``rnorms`` float16 [B, H, cap].
    Outlier layouts: ``norms`` float16 [B, H, cap, groups] and ``outliers`` [H, n_out] (the
    layout's index dtype), the raw channels of the outlier group of each head, fixed at the first
    update (:meth:`set_outliers`). How codes are written and read is the store's ``engine``
    (:mod:`turboquant.cache.backends`), chosen once at the first write.
    """

    FIELDS = ("codes", "norms", "qjl", "rnorms")
    # CUDA kernel appends check the float16 norm range without a host sync (see append / check_norms);
    # False: a blocking check at every append (benchmarks compare the two)
    defer_norm_check = True

    def __init__(self, codec: TensorCodec, chunk_tokens: int, backend: str = "auto", reserve_tokens: int = 0) -> None:
        if backend not in APPEND_BACKENDS:
            raise ValueError(f"`backend` must be one of {APPEND_BACKENDS}, got {backend!r}")
        self.codec = codec
        self.chunk_tokens = chunk_tokens
        self.reserve_tokens = reserve_tokens
        self.backend = backend
        self.engine: CodesBackend | None = None  # chosen at the first write (select_backend)
        self.codes: torch.Tensor | None = None
        self.norms: torch.Tensor | None = None
        self.qjl: torch.Tensor | None = None
        self.rnorms: torch.Tensor | None = None
        self.outliers: torch.Tensor | None = None
        self.length = 0
        self.capacity = 0
        self.kernel_appends = 0  # appends encoded by the Triton kernel (the rest: pure torch)
        self.kernel_dequantizes = 0  # dequantize calls served by the Triton kernel
        self._pending_checks: list = []  # (event, pinned bool, start, stop) of deferred norm checks

    def _buffers(self) -> dict[str, torch.Tensor]:
        return {f: getattr(self, f) for f in self.FIELDS if getattr(self, f) is not None}

    def _engine(self, device: torch.device, action: str) -> CodesBackend:
        if self.engine is None:
            self.engine = select_backend(self.backend, self.codec, device, action)
        return self.engine

    def norm_trail(self) -> tuple[int, ...]:
        """Trailing dims of ``norms`` a token: ``()`` (one norm), or ``(groups,)`` (outlier layouts)."""
        return (len(self.codec.layout.groups),) if self.codec.grouped else ()

    def reserve(self, need: int, specs: dict[str, tuple[tuple[int, ...], tuple[int, ...], torch.dtype, torch.device]]) -> None:
        """Grow the buffers named in ``specs`` (field -> (lead dims, trailing dims, dtype, device)) to hold
        ``need`` tokens: the first allocation exact (at least ``reserve_tokens``), later growth in whole
        chunks (a new buffer, the old tokens copied in)."""
        if need <= self.capacity:
            return
        t = need - self.length
        cap = max(need, self.reserve_tokens) if self.capacity == 0 else \
            self.length + math.ceil(t / self.chunk_tokens) * self.chunk_tokens
        cap = max(cap, need)
        for f, (lead, trail, dtype, device) in specs.items():
            buf = torch.empty((*lead, cap, *trail), dtype=dtype, device=device)
            old = getattr(self, f)
            if old is not None and self.length:
                buf[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, f, buf)
        self.capacity = cap

    def commit_checked(self, norms: torch.Tensor, need: int, defer: bool) -> None:
        """Commit tokens ``[length, need)`` whose ``norms`` a kernel wrote unchecked. A norm beyond
        float16 (or a non-finite input) is stored as inf/nan, a float16 subnormal (0 < n < 6.1e-5)
        is refused like the torch path does. On CUDA (``defer``) the verdict is copied to pinned
        memory without stalling the host (a blocking check is a host sync at every append) and read
        by :meth:`check_norms` once it has landed: at the latest at the next write or read."""
        ok = torch.isfinite(norms).all() & ~((norms > 0) & (norms < torch.finfo(NORM_DTYPE).tiny)).any()
        start, self.length = self.length, need
        if defer and self.defer_norm_check:
            flag = torch.empty((), dtype=torch.bool, pin_memory=True)
            flag.copy_(ok, non_blocking=True)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(norms.device))
            self._pending_checks.append((done, flag, start, need))
        elif not bool(ok):
            self.length = start  # not committed
            raise ValueError(norm_range_message(start, need, start))

    def check_norms(self, wait: bool = False) -> None:
        """Read the deferred float16 norm-range checks of CUDA kernel appends whose verdict has
        landed (all of them with ``wait=True``, which waits for the GPU). A failed one crops the
        store to the tokens before that append and raises ``ValueError``."""
        while self._pending_checks:
            done, flag, start, stop = self._pending_checks[0]
            if not done.query():
                if not wait:
                    return
                done.synchronize()
            self._pending_checks.pop(0)
            if not bool(flag):
                self._pending_checks.clear()
                self.length = min(self.length, start)
                raise ValueError(norm_range_message(start, stop, self.length))

    def set_outliers(self, x: torch.Tensor) -> None:
        """Outlier layouts: fix each head's outlier channels from ``x`` [B, H, T, D] (the first
        update: the prompt), the ``n_out`` of largest L2 norm over batch and tokens. Once."""
        if self.codec.grouped and self.outliers is None:
            lay = self.codec.layout
            self.outliers = select_outliers(x, lay.n_out).to(device=x.device, dtype=lay.index_dtype)

    def append(self, x: torch.Tensor) -> None:
        """Quantize and pack ``x`` [B, H, T, D] after the stored tokens (through the engine)."""
        self.check_norms()
        if x.shape[-2] == 0:
            return
        self._engine(x.device, "encode this append").append(self, x)

    def dequantize(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction ``x̃ = ||x|| Π^T c[idx]`` [B, H, length, D] (transient; for the non-fused
        attention path and tests). ``out``: optional [B, H, >= length, D] destination whose first
        ``length`` rows are written; returns those rows."""
        self.check_norms()
        held = self.codes if self.codes is not None else self.qjl
        if held is None:  # nothing written yet: no engine chosen, the reference decodes nothing
            return TorchCodes().dequantize(self, dtype, out)
        return self._engine(held.device, "dequantize this store").dequantize(self, dtype, out)

    def snapshot(self) -> tuple:
        """The store's state before a write (buffers by reference, length, capacity, pending checks):
        :meth:`restore` puts it back exactly, bytes included (a grown buffer is dropped)."""
        return self.length, self.capacity, self._buffers(), list(self._pending_checks), self.outliers

    def restore(self, state: tuple) -> None:
        self.length, self.capacity, buffers, pending, self.outliers = state
        for f in self.FIELDS:
            setattr(self, f, buffers.get(f))
        self._pending_checks = pending

    def crop(self, n_keep: int) -> None:
        self.length = min(self.length, max(0, n_keep))
        self._pending_checks = [p for p in self._pending_checks if p[2] < self.length]

    def index_batch(self, fn) -> None:
        for f, buf in self._buffers().items():
            setattr(self, f, fn(buf))

    def used_nbytes(self) -> dict[str, int]:
        out = {}
        for f, buf in self._buffers().items():
            per_token = buf[:, :, :1].numel() * buf.element_size()
            out[f] = per_token * self.length
        return out
