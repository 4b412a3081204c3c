"""Relaunch a compiled Triton kernel without ``JITFunction.run``'s per-call binding.

``kernel[grid](*args)`` binds and specialises every argument, hashes the specialisation, looks the
compiled kernel up and only then launches it: tens of microseconds for a kernel of ~60 arguments.
A :class:`LaunchCache` keeps the ``CompiledKernel`` that the first ``kernel[grid](...)`` returned,
under a caller key that must determine everything Triton specialises on (argument dtypes, pointer
alignment ``ptr % 16``, integer ``== 1`` / ``% 16``, the constexprs and options); later calls with
that key call the compiled launcher directly (what ``JITFunction.run`` itself does last).

Anything unexpected turns the fast path off and leaves the normal launch: no compiled handle
(Triton's interpreter), a launcher signature this module does not know, or a launcher that
rejects the arguments. :data:`ENABLED` False launches every call through ``kernel[grid]``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

ENABLED = True
STATS = {"fast": 0, "slow": 0}  # launches by path (tests and benchmarks read it)


def int_spec(v: int) -> tuple[bool, bool]:
    """What Triton specialises an integer argument on: ``v == 1`` and ``v % 16 == 0``."""
    return v == 1, v % 16 == 0


def ptr_spec(ptr: int) -> bool:
    """What Triton specialises a pointer argument on: 16-byte alignment."""
    return ptr % 16 == 0


def _hooks() -> tuple[object, object]:
    """The launch enter/exit hooks ``JITFunction.run`` passes (``triton.knobs`` since 3.4)."""
    try:
        from triton import knobs

        return knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    except (ImportError, AttributeError):  # pragma: no cover - older Triton
        from triton.compiler import CompiledKernel

        return getattr(CompiledKernel, "launch_enter_hook", None), getattr(CompiledKernel, "launch_exit_hook", None)


def _no_hook(h: object) -> bool:
    return h is None or getattr(h, "calls", None) == []


class _Handle:
    """One compiled kernel and the trailing constexpr values its launcher expects."""

    __slots__ = ("compiled", "function", "packed", "run", "tail")

    def __init__(self, compiled, tail: tuple):
        self.compiled = compiled
        self.run = compiled.run  # the launcher (initialises the module handles)
        self.function = compiled.function
        self.packed = compiled.packed_metadata
        self.tail = tail


def _handle(jit_fn, compiled, constexprs: dict) -> _Handle | None:
    """A handle for ``compiled`` or None where its launcher's argument list is not known here.

    Triton >= 3.3 launchers take every parameter in signature order (constexprs included, as in
    ``JITFunction.run``'s ``*bound_args.values()``); older ones only the runtime arguments."""
    try:
        params = jit_fn.params
        names = [p.name for p in params if p.is_constexpr]
        n_sig = len(compiled.src.signature)
        if n_sig == len(params):
            tail = tuple(constexprs[n] for n in names)
        elif n_sig == len(params) - len(names):
            tail = ()
        else:
            return None
        if list(names) != [p.name for p in params[len(params) - len(names):]]:
            return None  # constexprs not all last: positional order unknown
        return _Handle(compiled, tail)
    except (AttributeError, KeyError, TypeError):
        return None


class LaunchCache:
    """Compiled-kernel handles of one ``@triton.jit`` function, by caller key.

    ``stream_of``: ``() -> int`` the raw current stream (Triton's ``driver.active`` by default)."""

    def __init__(self, jit_fn, stream_of: Callable[[], int] | None = None):
        self.jit_fn = jit_fn
        self.handles: dict = {}
        self._stream_of = stream_of

    def _stream(self) -> int:
        if self._stream_of is None:
            from triton.runtime import driver

            act = driver.active
            self._stream_of = lambda: act.get_current_stream(act.get_current_device())
        return self._stream_of()

    def launch(self, key: Hashable | None, grid: tuple[int, int], args: Sequence,
               slow: Callable[[], tuple[Sequence, dict, dict]]):
        """Launch the kernel over ``grid``: through the cached handle of ``key`` when there is one
        (``args``: the runtime arguments in signature order; a tensor only needs ``data_ptr()``
        here), else ``jit_fn[grid](*a, **constexprs, **options)`` with ``slow() -> (a,
        constexprs, options)`` (``a``: ``args`` typed as Triton compiles them), keeping the
        compiled kernel for ``key``. Returns the ``CompiledKernel`` (None under the interpreter)."""
        h = self.handles.get(key) if ENABLED and key is not None else None
        if h is not None:
            enter, leave = _hooks()
            stream = self._stream()
            meta = None if _no_hook(enter) and _no_hook(leave) else h.compiled.launch_metadata(grid, stream, *args)
            try:
                h.run(grid[0], grid[1], 1, stream, h.function, h.packed, meta, enter, leave, *args, *h.tail)
                STATS["fast"] += 1
                return h.compiled
            except TypeError:  # the launcher rejected the argument list: never try this handle again
                self.handles[key] = None
        a, constexprs, options = slow()
        compiled = self.jit_fn[grid](*a, **constexprs, **options)
        STATS["slow"] += 1
        if ENABLED and key is not None and key not in self.handles and compiled is not None \
                and hasattr(compiled, "run") and hasattr(compiled, "packed_metadata"):
            self.handles[key] = _handle(self.jit_fn, compiled, constexprs)
        return compiled


__all__ = ["ENABLED", "STATS", "LaunchCache", "int_spec", "ptr_spec"]
