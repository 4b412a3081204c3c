"""The CUDA decode kernel's launch configuration is a value passed per call
(:class:`~turboquant.kernels.cuda_decode.CudaConfig`), not global state: checked fields, the
benchmarks' sweep syntax, and a plan per configuration."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from turboquant.kernels.cuda_decode import DEFAULT_CONFIG, CudaConfig
from turboquant.quantizer import TurboQuantMSE


@pytest.mark.synthetic
@pytest.mark.parametrize("kw,match", [({"stages": 5}, r"CudaConfig.stages must be one of \(1, 2, 3, 4\)"),
                                      ({"chains": 3}, "CudaConfig.chains"), ({"qf_smem": 2}, "CudaConfig.qf_smem"),
                                      ({"warps": 6}, r"CudaConfig.warps must be one of \(None, 4, 8, 16\)"),
                                      ({"min_blocks": 0}, "CudaConfig.min_blocks must be None or an int in"),
                                      ({"programs_per_sm": True}, "CudaConfig.programs_per_sm")])
def test_cuda_config_names_a_field_out_of_range(kw, match):
    with pytest.raises(ValueError, match=match):
        CudaConfig(**kw)


@pytest.mark.synthetic
def test_cuda_config_parses_the_sweep_syntax_and_resolves_by_load():
    """``programs_per_sm:stages:min_blocks:chains:qf_smem:warps``, 0 = by load: the default's text
    parses to the default, whose launch shape follows the load (few KV heads: one 16-warp CTA an SM)."""
    assert CudaConfig.parse("0:2:0:2:1:0") == DEFAULT_CONFIG
    assert DEFAULT_CONFIG.launch_shape(True) == {"warps": 16, "min_blocks": 1, "programs_per_sm": 1}
    assert DEFAULT_CONFIG.launch_shape(False) == {"warps": 4, "min_blocks": 4, "programs_per_sm": 4}
    c = CudaConfig.parse("3:1:2:4:0:8")
    assert (c.programs_per_sm, c.stages, c.min_blocks, c.chains, c.qf_smem, c.warps) == (3, 1, 2, 4, 0, 8)
    assert c.launch_shape(True) == {"warps": 8, "min_blocks": 2, "programs_per_sm": 3}
    with pytest.raises(ValueError, match="expected programs_per_sm:stages:min_blocks:chains:qf_smem:warps"):
        CudaConfig.parse("4:2:0")


@pytest.mark.integration
def test_each_cuda_config_gets_its_own_plan(kdev):
    """The configuration is part of the launch-plan key: a call with another configuration plans
    anew (a global setting changed between calls could not be told apart), the same one reuses its plan."""
    from turboquant.kernels import KernelTables, decode_attention, quantize_pack

    da = sys.modules["turboquant.kernels.decode_attention"]
    d, g = 64, torch.Generator().manual_seed(0)
    kt = KernelTables.from_quantizer(TurboQuantMSE(d, 3.5, seed=1), kdev)
    kc, kn = quantize_pack(torch.randn(1, 2, 16, d, generator=g).to(kdev), kt)
    q = torch.randn(1, 4, 1, d, generator=g).to(kdev)
    da.clear_plans()
    built = da.PLAN_STATS["built"]
    outs = [decode_attention(q, kc, kn, kc, kn, 16, kt, kt, 1 / math.sqrt(d), cuda_config=c)
            for c in (None, CudaConfig(stages=3), CudaConfig(stages=3))]
    assert da.PLAN_STATS["built"] == built + 2
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])  # Triton here: the CUDA knobs unused


@pytest.mark.gpu
@pytest.mark.parametrize("text", ["4:3:0:4:0:0", "2:1:2:1:1:8", "0:2:0:2:1:16"])
def test_swept_cuda_configs_match_the_reference_on_the_gpu(text):
    """A non-default launch configuration runs the CUDA kernel and stays as close to the float32
    reference as the default does (relative Frobenius error within 1.5x the default's, and below
    2e-3: the kernels' float16 operands, results/gpu_error_by_backend_2026-12-01_s6.txt)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)")
    from turboquant.kernels import (
        KernelTables,
        decode_attention,
        decode_attention_reference,
        quantize_pack,
    )
    from turboquant.kernels.decode_attention import LAST_LAUNCH

    dev, d = torch.device("cuda"), 256
    g = torch.Generator(device=dev).manual_seed(4)
    kt = KernelTables.from_quantizer(TurboQuantMSE(d, 3.5, seed=1), dev)
    kc, kn = quantize_pack(torch.randn(2, 4, 4000, d, device=dev, generator=g), kt)
    vc, vn = quantize_pack(torch.randn(2, 4, 4000, d, device=dev, generator=g), kt)
    q = torch.randn(2, 24, 1, d, device=dev, generator=g, dtype=torch.bfloat16)
    ref = decode_attention_reference(q.float(), kc, kn, vc, vn, 3999, kt, kt, 1 / 16).float()

    def rel(cfg):
        out = decode_attention(q, kc, kn, vc, vn, 3999, kt, kt, 1 / 16, backend="cuda", cuda_config=cfg)
        assert LAST_LAUNCH["cuda"]
        return ((out.float() - ref).norm() / ref.norm()).item()

    base, swept = rel(None), rel(CudaConfig.parse(text))
    assert swept <= max(1.5 * base, 1e-4) and swept < 2e-3, f"{text}: rel err {swept:.2e} (default {base:.2e})"
