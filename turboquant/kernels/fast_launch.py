"""Relaunch a compiled Triton kernel without ``JITFunction.run``'s per-call binding.

``kernel[grid](*args)`` binds and specialises every argument, hashes the specialisation, looks the
compiled kernel up and only then launches it: tens of microseconds for a kernel of ~60 arguments.
A :class:`LaunchCache` keeps the ``CompiledKernel`` that the first ``kernel[grid](...)`` returned,
under a caller key that must determine everything Triton specialises on (argument dtypes, pointer
alignment ``ptr % 16``, integer ``== 1`` / ``% 16``, the constexprs and options); later calls with
that key call the compiled launcher directly (what ``JITFunction.run`` itself does last).

Anything unexpected turns the fast path off and leaves the normal launch: no compiled handle
(Triton's interpreter), a launcher signature this module does not know, a launcher that rejects
the arguments, or launch hooks set (a profiler). :data:`ENABLED` False launches every call
through ``kernel[grid]``. Pointer arguments may be plain ints (addresses): Triton's launcher then
skips its per-pointer ``cuPointerGetAttribute`` check, which the first (normal) launch of the
same addresses already made.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

ENABLED = True
STATS = {"fast": 0, "slow": 0}  # launches by path (tests and benchmarks read it)
WHY_SLOW: dict[str, int] = {}  # why a launch took ``kernel[grid]``: reason -> count (diagnostics)


def _slow_because(reason: str) -> None:
    WHY_SLOW[reason] = WHY_SLOW.get(reason, 0) + 1


def int_spec(v: int) -> tuple[bool, bool]:
    """What Triton specialises an integer argument on: ``v == 1`` and ``v % 16 == 0``."""
    return v == 1, v % 16 == 0


def ptr_spec(ptr: int) -> bool:
    """What Triton specialises a pointer argument on: 16-byte alignment."""
    return ptr % 16 == 0


_HOOK_HOLDER: list = []  # where the launch hooks live: triton.knobs.runtime (>= 3.4) or CompiledKernel


def _hooks() -> tuple[object, object]:
    """The launch enter/exit hooks ``JITFunction.run`` passes to the launcher."""
    if not _HOOK_HOLDER:
        try:
            from triton import knobs

            _HOOK_HOLDER.append(knobs.runtime)
        except ImportError:  # pragma: no cover - older Triton
            from triton.compiler import CompiledKernel

            _HOOK_HOLDER.append(CompiledKernel)
    h = _HOOK_HOLDER[0]
    return getattr(h, "launch_enter_hook", None), getattr(h, "launch_exit_hook", None)


def _no_hook(h: object) -> bool:
    """No hook set: None (Triton < 3.6) or an empty ``HookChain``."""
    return h is None or getattr(h, "calls", None) == []


class _Handle:
    """One compiled kernel and the trailing constexpr values its launcher expects."""

    __slots__ = ("compiled", "device", "function", "packed", "run", "tail")

    def __init__(self, compiled, tail: tuple, device: int):
        self.compiled = compiled
        self.device = device  # the current device it was loaded for (its CUfunction lives there)
        self.run = compiled.run  # the launcher (initialises the module handles)
        self.function = compiled.function
        self.packed = compiled.packed_metadata
        self.tail = tail


def _handle(jit_fn, compiled, constexprs: dict, device: int) -> _Handle | None:
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
            _slow_because(f"handle: signature of {n_sig} for {len(params)} parameters ({len(names)} constexpr)")
            return None
        if list(names) != [p.name for p in params[len(params) - len(names):]]:
            _slow_because("handle: constexprs not all last")
            return None  # constexprs not all last: positional order unknown
        return _Handle(compiled, tail, device)
    except (AttributeError, KeyError, TypeError) as err:
        _slow_because(f"handle: {type(err).__name__}: {err}"[:200])
        return None


_DRIVER: list = []


def _current() -> tuple[int, int]:
    """(current device, its current raw stream), as ``JITFunction.run`` reads them."""
    if not _DRIVER:
        from triton.runtime import driver

        _DRIVER.append(driver.active)
    act = _DRIVER[0]
    dev = act.get_current_device()
    return dev, act.get_current_stream(dev)


class LaunchCache:
    """Compiled-kernel handles of one ``@triton.jit`` function, by caller key."""

    def __init__(self, jit_fn):
        self.jit_fn = jit_fn
        self.handles: dict = {}

    def launch(self, key: Hashable | None, grid: tuple[int, int], args: Sequence,
               slow: Callable[[], tuple[Sequence, dict, dict]], current: tuple[int, int] | None = None):
        """Launch the kernel over ``grid``: through the cached handle of ``key`` when there is one
        (``args``: the runtime arguments in signature order; a tensor only needs ``data_ptr()``
        here), else ``jit_fn[grid](*a, **constexprs, **options)`` with ``slow() -> (a,
        constexprs, options)`` (``a``: ``args`` typed as Triton compiles them), keeping the
        compiled kernel for ``key``. ``current``: (current device index, its current raw stream) where
        the caller knows them (saves two driver queries a launch). Returns the ``CompiledKernel``
        (None under the interpreter)."""
        h = self.handles.get(key) if ENABLED and key is not None else None
        if h is None and ENABLED and key is not None:
            _slow_because("no handle for the key" if key not in self.handles else "handle refused earlier")
        if h is not None:
            enter, leave = _hooks()
            if not (_no_hook(enter) and _no_hook(leave)):
                _slow_because(f"launch hooks set: {type(enter).__name__} / {type(leave).__name__}")
                h = None  # a profiler's launch hooks: the normal launch builds their metadata
        if h is not None:
            dev, stream = current if current is not None else _current()
            if dev != h.device:
                _slow_because("another current device")
                h = None  # another current device: Triton's own lookup loads the kernel there
        if h is not None:
            try:
                # no hooks: None for both (the launcher then calls nothing) and no launch metadata
                h.run(grid[0], grid[1], 1, stream, h.function, h.packed, None, None, None, *args, *h.tail)
                STATS["fast"] += 1
                return h.compiled
            except TypeError as err:  # the launcher rejected the argument list: never try this handle again
                _slow_because(f"launcher: TypeError: {err}"[:200])
                self.handles[key] = None
        a, constexprs, options = slow()
        compiled = self.jit_fn[grid](*a, **constexprs, **options)
        STATS["slow"] += 1
        if ENABLED and key is not None and key not in self.handles and compiled is not None:
            missing = [a for a in ("run", "packed_metadata") if not hasattr(compiled, a)]
            if missing:
                _slow_because(f"compiled kernel has no {missing}")
                self.handles[key] = None
            else:
                self.handles[key] = _handle(self.jit_fn, compiled, constexprs, _current()[0])
        return compiled


__all__ = ["ENABLED", "STATS", "WHY_SLOW", "LaunchCache", "int_spec", "ptr_spec"]
