"""The cached launch plan of ``decode_attention``: same numbers as an uncached call, rebuilt
whenever what it was validated for changes, the same named errors on every call, and a hot path
that issues (almost) no torch ops of its own.

Runs compiled on CUDA or under ``TRITON_INTERPRET=1`` on CPU (tiny shapes, about a second a call).
Equality is bitwise: a planned call launches the same kernels with the same arguments.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import math
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from tests.kernels.stores import packed_store

pytestmark = pytest.mark.integration  # CPU under TRITON_INTERPRET=1 in CI; compiled where CUDA is
D, HQ, HKV, B = 64, 4, 2, 2
SCALE = 1 / math.sqrt(D)


def _da():
    """The decode_attention module (the package re-exports the function under the same name)."""
    import turboquant.kernels  # noqa: F401  (conftest may have reloaded it)

    return sys.modules["turboquant.kernels.decode_attention"]


@pytest.fixture
def fresh():
    """No plans before and after the test; plan cache on."""
    da = _da()
    da.clear_plans()
    old = da.PLAN_CACHE
    da.PLAN_CACHE = True
    yield da
    da.PLAN_CACHE = old
    da.clear_plans()


def _store(dev, cap, seed, bits=3.5, prod=False):
    """Codes + norms [B, H_kv, cap] of random keys and values; tables; optional prod-key QJL part."""
    return packed_store(dev, cap, seed, b=B, hkv=HKV, d=D, kbits=bits, prod=prod)


def _inputs(dev, seed=0, r=5):
    g = torch.Generator().manual_seed(100 + seed)
    q = torch.randn(B, HQ, 1, D, generator=g).to(dev)
    rk = torch.randn(B, HKV, r, D, generator=g).to(dev)
    rv = torch.randn(B, HKV, r, D, generator=g).to(dev)
    return q, rk, rv


def _call(s, q, length, rk, rv, **kw):
    from turboquant.kernels import decode_attention

    return decode_attention(q, s["kc"], s["kn"], s["vc"], s["vn"], length, s["kt"], s["vt"], SCALE, rk, rv,
                            k_qjl=s["kj"], **kw)


def _reference(s, q, n, rk, rv):
    from turboquant.kernels import decode_attention_reference

    return decode_attention_reference(q, s["kc"], s["kn"], s["vc"], s["vn"], n, s["kt"], s["vt"], SCALE, rk, rv,
                                      k_qjl=s["kj"])


CASES = {  # name -> (store kwargs, call kwargs builder)
    "mse-int-length": ({}, lambda dev: (37, {})),
    "mse-device-length-workspace": (
        {}, lambda dev: (torch.tensor([37, 21], dtype=torch.int32, device=dev), {"max_length": 40})),
    "prod-int-length": ({"prod": True}, lambda dev: (37, {})),
}


def _case(dev, case: str) -> tuple:
    """Store, query, residual window, length and call kwargs (a fresh workspace where the case
    passes ``max_length``) of one :data:`CASES` entry."""
    from turboquant.kernels import DecodeWorkspace

    store_kw, make = CASES[case]
    s = _store(dev, 48, seed=1, **store_kw)
    q, rk, rv = _inputs(dev)
    length, kw = make(dev)
    if "max_length" in kw:
        kw["workspace"] = DecodeWorkspace()
    return s, q, rk, rv, length, kw


@pytest.mark.parametrize("case", list(CASES))
def test_planned_call_equals_the_uncached_call_bitwise(kdev, fresh, case):
    """Plan off, plan built, plan reused: the three outputs are bitwise equal (and match the reference)."""

    s, q, rk, rv, length, kw = _case(kdev, case)
    fresh.PLAN_CACHE = False
    uncached = _call(s, q, length, rk, rv, **kw).clone()
    assert fresh.PLAN_STATS["hits"] == 0 or not fresh._PLANS
    fresh.PLAN_CACHE = True
    hits = fresh.PLAN_STATS["hits"]
    first = _call(s, q, length, rk, rv, **kw).clone()
    q2 = q.clone()  # a new query tensor (another address) of the same shape reuses the plan
    second = _call(s, q2, length, rk, rv, **kw).clone()
    assert fresh.PLAN_STATS["hits"] == hits + 1, "the second call of one structure must reuse the plan"
    assert torch.equal(first, uncached) and torch.equal(second, uncached)
    if isinstance(length, int):
        ref = _reference(s, q, length, rk, rv)
        torch.testing.assert_close(first, ref, atol=3e-3, rtol=1e-2)


def test_plan_is_rebuilt_when_the_store_grows_or_reallocates(kdev, fresh):
    """A store that grows (new capacity: other strides) or reallocates (same shape, new address)
    gets a new plan; a stale plan would read head rows at the old strides or refuse the length."""
    q, rk, rv = _inputs(kdev)
    small = _store(kdev, 40, seed=2)
    assert small["kt"] is _store(kdev, 8, seed=0)["kt"], "the stores must share their tables"
    out_small = _call(small, q, 40, rk, rv)
    torch.testing.assert_close(out_small, _reference(small, q, 40, rk, rv), atol=3e-3, rtol=1e-2)
    built = fresh.PLAN_STATS["built"]
    grown = _store(kdev, 96, seed=3)  # capacity 96 > 40: other head strides, longer valid length
    out_grown = _call(grown, q, 90, rk, rv)
    assert fresh.PLAN_STATS["built"] == built + 1
    torch.testing.assert_close(out_grown, _reference(grown, q, 90, rk, rv), atol=3e-3, rtol=1e-2)
    realloc = _store(kdev, 96, seed=4)  # same shapes, other buffers and contents
    out_realloc = _call(realloc, q, 90, rk, rv)
    assert fresh.PLAN_STATS["built"] == built + 2
    torch.testing.assert_close(out_realloc, _reference(realloc, q, 90, rk, rv), atol=3e-3, rtol=1e-2)
    assert not torch.allclose(out_realloc, out_grown, atol=1e-2), "different stores must give different outputs"


def test_plan_is_rebuilt_when_a_dtype_changes_and_the_check_fires(kdev, fresh):
    """Norms that turn float32 after a planned call get the named dtype error, not the old plan."""
    q, rk, rv = _inputs(kdev)
    s = _store(kdev, 40, seed=5)
    _call(s, q, 30, rk, rv)
    bad = dict(s, kn=s["kn"].to(torch.float32))
    with pytest.raises(ValueError, match="`k_norms` must be float16"):
        _call(bad, q, 30, rk, rv)
    q64 = q.to(torch.float64)  # another query dtype: a new plan, output in that dtype
    assert _call(s, q64, 30, rk, rv).dtype == torch.float64


def _bad_calls(dev):
    """name -> (call kwargs overriding the good call, exception type, message pattern)."""
    n = torch.tensor([30, 30], dtype=torch.int32, device=dev)
    return {
        "length past capacity": ({"length": 41}, ValueError, r"`length`=41 must be in \[0, 40\]"),
        "negative length": ({"length": -1}, ValueError, r"`length`=-1 must be in"),
        "bool length": ({"length": True}, TypeError, "`length` must be an int"),
        "tensor length without max_length": ({"length": n}, ValueError, "needs `max_length`"),
        "float tensor length": ({"length": n.float(), "max_length": 40}, TypeError, "must be int32 or int64"),
        "max_length past capacity": ({"length": n, "max_length": 41}, ValueError, r"`max_length`=41 must be in"),
        "residual rows differ": ({"rv_rows": 4}, ValueError, "`residual_k`/`residual_v` must both be"),
        "residual_length past R": ({"residual_length": 6}, ValueError, r"`residual_length`=6 must be in \[0, 5\]"),
        "unknown backend": ({"backend": "cpu"}, ValueError, "`backend` must be one of"),
        "workspace of another type": ({"workspace": {}}, TypeError, "`workspace` must be a DecodeWorkspace"),
    }


@pytest.mark.parametrize("bad", list(_bad_calls(torch.device("cpu"))))
def test_bad_input_raises_the_named_error_on_the_first_and_a_later_call(kdev, fresh, bad):
    """Before any plan, after the good call built one, and again after that: the same error."""
    s = _store(kdev, 40, seed=6)
    q, rk, rv = _inputs(kdev)
    over, exc, pattern = _bad_calls(kdev)[bad]

    def run(**o):
        kw = {k: v for k, v in o.items() if k not in ("length", "rv_rows")}
        rvx = rv[:, :, : o["rv_rows"]] if "rv_rows" in o else rv
        return _call(s, q, o.get("length", 30), rk, rvx, **kw)

    with pytest.raises(exc, match=pattern):
        run(**over)
    run()  # the good call: builds (or reuses) the plan of this structure
    run()
    for _ in range(2):
        with pytest.raises(exc, match=pattern):
            run(**over)


class _OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active (not inside a kernel launch, see below)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _launches_uncounted(monkeypatch):
    """Kernel launches run with the counter suspended: the interpreter's own tensor traffic is
    not the wrapper's host work (the launch is the same with or without a plan)."""
    from turboquant.kernels import fast_launch

    orig = fast_launch.LaunchCache.launch

    def launch(self, *a, **k):
        with _disable_current_modes():
            return orig(self, *a, **k)

    monkeypatch.setattr(fast_launch.LaunchCache, "launch", launch)
    yield


def test_hot_path_issues_at_most_one_torch_op(kdev, fresh, monkeypatch):
    """A repeated call with a plan: no torch op with a workspace, one (the new output) without.
    The uncached path runs >= 2 (dtype views of the codes to validate and launch them)."""
    from turboquant.kernels import DecodeWorkspace

    s = _store(kdev, 48, seed=7)
    q, rk, rv = _inputs(kdev)
    ws = DecodeWorkspace()

    def count(**kw):
        with _launches_uncounted(monkeypatch), _OpCounter() as c:
            _call(s, q, 37, rk, rv, **kw)
        monkeypatch.undo()
        return sum(c.ops.values()), dict(c.ops)

    _call(s, q, 37, rk, rv, workspace=ws)
    _call(s, q, 37, rk, rv)
    n_ws, ops_ws = count(workspace=ws)
    n_new, ops_new = count()
    assert n_ws == 0, f"planned call with a workspace issued torch ops: {ops_ws}"
    assert n_new <= 1, f"planned call without a workspace issued more than the output allocation: {ops_new}"
    fresh.PLAN_CACHE = False
    n_off, ops_off = count(workspace=ws)
    assert n_off >= 2, f"the uncached path should validate with dtype views: {ops_off}"


def test_workspace_buffers_stay_the_call_outputs(kdev, fresh):
    """With a workspace the output is its ``out`` buffer on every planned call (fixed addresses)."""
    from turboquant.kernels import DecodeWorkspace

    s = _store(kdev, 48, seed=8)
    q, rk, rv = _inputs(kdev)
    ws = DecodeWorkspace()
    a = _call(s, q, 37, rk, rv, workspace=ws)
    b = _call(s, q, 37, rk, rv, workspace=ws)
    assert a.data_ptr() == b.data_ptr() == ws.buffers["out"].data_ptr()
    c = _call(s, q, 37, rk[:, :, :3], rv[:, :, :3], workspace=ws)  # fewer residual rows: same splits here
    torch.testing.assert_close(c, _reference(s, q, 37, rk[:, :, :3], rv[:, :, :3]), atol=3e-3, rtol=1e-2)


@pytest.mark.parametrize("case", list(CASES))
def test_relaunch_arguments_are_the_typed_launch_arguments(kdev, fresh, case, monkeypatch):
    """What the compiled-kernel relaunch passes (addresses and scalars, ``fast_launch``) is,
    position by position, what Triton's own launch gets (typed tensors): same count, every tensor
    at the address given, every scalar equal. The relaunch itself needs a GPU; this check does not
    (an extra address here once made Triton's launcher refuse every relaunch on the H200)."""
    from turboquant.kernels import fast_launch

    s, q, rk, rv, length, kw = _case(kdev, case)
    seen = []
    orig = fast_launch.LaunchCache.launch

    def launch(self, key, grid, args, slow, *rest):
        typed, constexprs, _ = slow()
        seen.append((self.jit_fn, tuple(args), tuple(typed), constexprs))
        return orig(self, key, grid, args, slow, *rest)

    monkeypatch.setattr(fast_launch.LaunchCache, "launch", launch)
    _call(s, q, length, rk, rv, **kw)
    assert len(seen) == 2, "one partial and one combine launch"
    for jit_fn, fast, typed, constexprs in seen:
        names = list(inspect.signature(jit_fn.fn).parameters)  # compiled (JITFunction) or interpreted
        const = [n for n in names if "constexpr" in str(jit_fn.fn.__annotations__.get(n, ""))]
        runtime = [n for n in names if n not in const]
        assert len(typed) == len(runtime), f"{jit_fn.__name__}: typed launch has {len(typed)} of {len(runtime)}"
        assert len(fast) == len(typed), f"{jit_fn.__name__}: relaunch passes {len(fast)} arguments, launch {len(typed)}"
        for name, f, t in zip(runtime, fast, typed):
            want = t.data_ptr() if isinstance(t, torch.Tensor) else t
            assert f == want, f"{jit_fn.__name__}: argument {name!r} is {f!r} in the relaunch, {want!r} in the launch"
        assert sorted(constexprs) == sorted(const), f"{jit_fn.__name__}: constexprs given {sorted(constexprs)}"
