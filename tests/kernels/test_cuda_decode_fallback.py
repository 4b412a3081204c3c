"""``decode_attention(backend="auto")`` falls back to the Triton kernel when NVRTC cannot compile
the CUDA kernel on this install (a warning, once), and ``backend="cuda"`` says why it cannot run.
The compile failure is provoked by replacing ``torch.cuda._compile_kernel`` with one that raises
the way NVRTC does."""

from __future__ import annotations

import math

import pytest
import torch

from turboquant.kernels import KernelTables, cuda_decode
from turboquant.quantizer import TurboQuantMSE


def _nvrtc_fails(*args, **kwargs):
    raise RuntimeError("NVRTC_ERROR_COMPILATION (provoked by the test)")


@pytest.fixture
def broken_nvrtc(monkeypatch):
    monkeypatch.setattr(cuda_decode, "_KERNELS", {})
    monkeypatch.setattr(cuda_decode, "COMPILE_FAILURES", {})
    monkeypatch.setattr(torch.cuda, "_compile_kernel", _nvrtc_fails, raising=False)


@pytest.mark.synthetic
def test_compile_failure_is_reported_and_recorded(broken_nvrtc):
    t = KernelTables.from_quantizer(TurboQuantMSE(256, 3.5, seed=0), "cpu")
    with pytest.raises(RuntimeError, match=r"did not compile with NVRTC \(RuntimeError: NVRTC_ERROR_COMPILATION"):
        cuda_decode.variant(torch.bfloat16, 6, t, t, few=True)
    assert len(cuda_decode.COMPILE_FAILURES) == 1


@pytest.mark.gpu
def test_auto_uses_triton_when_the_cuda_kernel_does_not_compile(cuda, broken_nvrtc):
    from turboquant.kernels import decode_attention, quantize_pack

    d, hq, hkv, n = 256, 24, 4, 20000  # B·H_kv·length above the crossover: auto would pick CUDA
    q8 = TurboQuantMSE(d, 3.5, seed=1)
    t = KernelTables.from_quantizer(q8, cuda)
    gen = torch.Generator(device=cuda).manual_seed(0)
    k = torch.randn(1, hkv, n, d, generator=gen, device=cuda, dtype=torch.bfloat16)
    v = torch.randn(1, hkv, n, d, generator=gen, device=cuda, dtype=torch.bfloat16)
    (kc, kn), (vc, vn) = quantize_pack(k, t), quantize_pack(v, t)
    q = torch.randn(1, hq, 1, d, generator=gen, device=cuda, dtype=torch.bfloat16)
    args = (q, kc, kn, vc, vn, n, t, t, 1 / math.sqrt(d))
    with pytest.warns(RuntimeWarning, match="uses the Triton kernel instead"):
        out = decode_attention(*args, backend="auto")
    assert torch.equal(out, decode_attention(*args, backend="triton"))
    with pytest.raises(RuntimeError, match="failed to compile earlier in this process"):
        decode_attention(*args, backend="cuda")


@pytest.mark.synthetic
def test_choose_runs_cuda_or_names_why_not(monkeypatch):
    """The one decision both decode paths take: a structural reason -> Triton for "auto", a named
    ValueError for "cuda"; a compile failure earlier in the process -> Triton without compiling
    again ("auto"), a RuntimeError naming it ("cuda"); a compile failure now -> one warning ("auto")."""
    monkeypatch.setattr(cuda_decode, "COMPILE_FAILURES", {})
    built = []

    def build():
        built.append(1)
        return "kernel"

    assert cuda_decode.choose("auto", None, build) == "kernel" and built == [1]
    assert cuda_decode.choose("auto", "head_dim 64", build) is None and built == [1]
    with pytest.raises(ValueError, match=r"cannot run this call \(head_dim 64\); it needs head_dim in"):
        cuda_decode.choose("cuda", "head_dim 64", build)

    def failing():
        cuda_decode.COMPILE_FAILURES["k"] = "NVRTC_ERROR_COMPILATION"
        raise RuntimeError("the CUDA decode kernel did not compile with NVRTC (NVRTC_ERROR_COMPILATION)")

    with pytest.warns(RuntimeWarning, match="uses the Triton kernel instead"):
        assert cuda_decode.choose("auto", None, failing) is None
    assert cuda_decode.choose("auto", None, build) is None and built == [1]  # no second compile attempt
    with pytest.raises(RuntimeError, match="failed to compile earlier in this process"):
        cuda_decode.choose("cuda", None, build)
    # after a failure unsupported() names it as its reason: still the compile failure's RuntimeError
    why = "NVRTC unavailable or a compile failure earlier in this process"
    with pytest.raises(RuntimeError, match="failed to compile earlier in this process"):
        cuda_decode.choose("cuda", why, build)


@pytest.mark.gpu
def test_outlier_layouts_fall_back_to_triton_once_when_the_cuda_kernel_does_not_compile(cuda, broken_nvrtc):
    """The paper layouts' CUDA path takes the same decision: a warning at the failure, Triton's
    output, no compile attempt (nor warning) on the next call, and backend="cuda" names the failure."""
    import warnings

    from turboquant.kernels import decode_attention, quantize_pack
    from turboquant.layout import build_layout, select_outliers

    d, hq, hkv, n = 256, 24, 4, 10000  # B·H_kv·length above the outlier path's crossover (32768)
    gen = torch.Generator(device=cuda).manual_seed(0)
    stores = []
    for name, seed in (("paper-3.5", 5), ("paper-2.5", 6)):
        lay = build_layout(name, d, seed=seed)
        t = KernelTables.from_layout(lay, cuda)
        x = torch.randn(1, hkv, n, d, generator=gen, device=cuda)
        out = select_outliers(x, lay.n_out).to(cuda)
        stores.append((t, out, *quantize_pack(x, t, outliers=out)))
    (kt, ko, kc, kn), (vt, vo, vc, vn) = stores
    q = torch.randn(1, hq, 1, d, generator=gen, device=cuda, dtype=torch.bfloat16)
    args = (q, kc, kn, vc, vn, n, kt, vt, 1 / math.sqrt(d))
    kw = {"k_outliers": ko, "v_outliers": vo}
    with pytest.warns(RuntimeWarning, match="uses the Triton kernel instead"):
        out = decode_attention(*args, backend="auto", **kw)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        again = decode_attention(*args, backend="auto", **kw)
    assert not [w for w in seen if "uses the Triton kernel instead" in str(w.message)], "warned again"
    triton_out = decode_attention(*args, backend="triton", **kw)
    assert torch.equal(out, triton_out) and torch.equal(again, triton_out)
    with pytest.raises(RuntimeError, match="failed to compile earlier in this process"):
        decode_attention(*args, backend="cuda", **kw)
