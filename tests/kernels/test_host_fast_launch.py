"""GPU: the compiled-kernel relaunch (``kernels/fast_launch.py``) gives the normal launch's result.

A planned ``decode_attention`` call relaunches the ``CompiledKernel`` that Triton returned for
the first call of the same specialisation, passing addresses instead of tensors. Checked bitwise
against ``fast_launch.ENABLED = False`` (every launch through ``kernel[grid]``) for the Triton
partial kernel (mse and prod keys, int and device lengths, a workspace), the CUDA partial kernel
with the residual splits (same stream eager, a forked stream under capture), and a CUDA graph that
replays a planned call.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

from turboquant.quantizer import TurboQuantMSE, TurboQuantProd

HQ, HKV, D = 24, 4, 256
SCALE = 1 / math.sqrt(D)


def _modules():
    import turboquant.kernels  # noqa: F401
    from turboquant.kernels import fast_launch

    return sys.modules["turboquant.kernels.decode_attention"], fast_launch


def _store(dev, B, n, kb, vb, prod=False, seed=0):
    from turboquant.kernels import KernelTables, KeyQJL, quantize_pack

    g = torch.Generator(device=dev).manual_seed(seed)
    k = torch.randn(B, HKV, n, D, device=dev, generator=g)
    v = torch.randn(B, HKV, n, D, device=dev, generator=g)
    vt = KernelTables.from_quantizer(TurboQuantMSE(D, vb, seed=6), dev)
    vc, vn = quantize_pack(v, vt)
    kj = None
    if prod:
        pq = TurboQuantProd(D, kb, seed=5)
        kt = KernelTables.from_quantizer(pq.mse, dev)
        pk = pq.encode(k)
        kc, kn = pk.mse.codes, pk.mse.norms
        kj = KeyQJL(qjl=pk.qjl, rnorms=pk.rnorms, S=pq.S.to(dev), scale=float(pq.qjl_scale))
    else:
        kt = KernelTables.from_quantizer(TurboQuantMSE(D, kb, seed=5), dev)
        kc, kn = quantize_pack(k, kt)
    q = torch.randn(B, HQ, 1, D, device=dev, generator=g, dtype=torch.bfloat16)
    rk = torch.randn(B, HKV, 128, D, device=dev, generator=g, dtype=torch.bfloat16)
    rv = torch.randn(B, HKV, 128, D, device=dev, generator=g, dtype=torch.bfloat16)
    return {"kc": kc, "kn": kn, "vc": vc, "vn": vn, "kt": kt, "vt": vt, "kj": kj, "q": q, "rk": rk, "rv": rv}


def _call(s, length, **kw):
    from turboquant.kernels import decode_attention

    return decode_attention(s["q"], s["kc"], s["kn"], s["vc"], s["vn"], length, s["kt"], s["vt"], SCALE,
                            s["rk"], s["rv"], k_qjl=s["kj"], **kw)


CASES = {  # name -> (B, n, key bits, value bits, prod, length mode, backend)
    "halves-3.5-int": (1, 4096, 3.5, 3.5, False, "int", "triton"),
    "halves-2.5-device-workspace": (1, 4096, 2.5, 2.5, False, "device", "triton"),
    "K4V3-int-batch8": (8, 2048, 4, 3, False, "int", "triton"),
    "prod-3.5-int": (1, 4096, 3.5, 3.5, True, "int", "triton"),
    "prod-3.5-device-workspace": (2, 2048, 3.5, 3.5, True, "device", "triton"),
    "cuda-kernel-side-stream": (8, 8192, 3.5, 3.5, False, "int", "auto"),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES))
def test_fast_relaunch_equals_the_normal_launch_bitwise(cuda, case):
    from turboquant.kernels import DecodeWorkspace

    da, fl = _modules()
    B, n, kb, vb, prod, mode, backend = CASES[case]
    s = _store(cuda, B, n, kb, vb, prod)
    if mode == "int":
        length, kw = n - 5, {}
    else:
        length = torch.tensor([n - 5 - 7 * b for b in range(B)], dtype=torch.int32, device=cuda)
        kw = {"max_length": n, "workspace": DecodeWorkspace()}
    da.clear_plans()
    fl.ENABLED = False
    try:
        slow = _call(s, length, backend=backend, **kw).clone()
    finally:
        fl.ENABLED = True
    _call(s, length, backend=backend, **kw)  # builds the plan, keeps the compiled handles
    before = fl.STATS["fast"]
    fast = _call(s, length, backend=backend, **kw).clone()
    torch.cuda.synchronize()
    assert fl.STATS["fast"] > before, f"the planned call did not take the compiled relaunch: {fl.WHY_SLOW}"
    assert torch.equal(fast, slow)


@pytest.mark.gpu
def test_cuda_graph_replays_a_planned_call(cuda):
    """Capture a planned call (device lengths, workspace), replay it with other lengths: eager's result."""
    from turboquant.kernels import DecodeWorkspace

    _modules()[0].clear_plans()
    s = _store(cuda, 2, 4096, 3.5, 3.5)
    ws = DecodeWorkspace()
    ln = torch.tensor([4000, 3000], dtype=torch.int32, device=cuda)
    rl = torch.tensor([128], dtype=torch.int32, device=cuda)
    for _ in range(2):
        _call(s, ln, max_length=4096, residual_length=rl, workspace=ws)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = _call(s, ln, max_length=4096, residual_length=rl, workspace=ws)
    for lens, r in (([4096, 17], 3), ([1, 2048], 128)):
        ln.copy_(torch.tensor(lens, dtype=torch.int32))
        rl.fill_(r)
        g.replay()
        got = out.clone()
        want = _call(s, ln, max_length=4096, residual_length=rl, workspace=DecodeWorkspace())
        assert torch.equal(got, want), f"graph replay differs from eager at lengths {lens}, residual {r}"


@pytest.mark.gpu
def test_captured_cuda_kernel_call_with_forked_residual_stream_equals_eager(cuda):
    """The CUDA partial kernel with a residual window: eager runs the residual splits first on the
    same stream, a captured call forks them onto a side stream. Both give the same bits."""
    _modules()[0].clear_plans()
    s = _store(cuda, 8, 8192, 3.5, 3.5)
    eager = _call(s, 8000, backend="cuda").clone()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = _call(s, 8000, backend="cuda")
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager), "captured (forked residual stream) and eager CUDA-kernel calls differ"
