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
