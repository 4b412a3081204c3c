"""A decode call bound to its stores (:class:`DecodeAttentionCall`): the numbers of
``decode_attention`` with the same arguments, bit for bit, step after step (new queries, device
lengths changed in place), and a named error where a bound tensor or the query's shape moved.

Runs compiled on CUDA or under ``TRITON_INTERPRET=1`` on CPU (tiny shapes).
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

from tests.kernels.stores import packed_store
from turboquant.quantizer import TurboQuantMSE

pytestmark = pytest.mark.integration
D, HQ, HKV, B, CAP = 64, 4, 2, 2, 48
SCALE = 1 / math.sqrt(D)


def _store(dev, kbits=3.5, vbits=3.5, prod=False, seed=1):
    return packed_store(dev, CAP, seed, b=B, hkv=HKV, d=D, kbits=kbits, vbits=vbits, prod=prod)


def _queries(dev, n, r=6):
    g = torch.Generator().manual_seed(11)
    qs = [torch.randn(B, HQ, 1, D, generator=g).to(dev) for _ in range(n)]
    rk, rv = torch.randn(B, HKV, r, D, generator=g).to(dev), torch.randn(B, HKV, r, D, generator=g).to(dev)
    return qs, rk, rv


CASES = {  # name -> (store kwargs, device lengths)
    "halves-3.5-int-length": ({}, False),
    "halves-3.5-device-lengths": ({}, True),
    "k4-v3-device-lengths": ({"kbits": 4, "vbits": 3}, True),
    "prod-3.5-int-length": ({"prod": True}, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bound_call_equals_decode_attention_step_after_step(kdev, case):
    """Three steps, each a new query (and, with device lengths, new length values written in place):
    every output of the bound call equals ``decode_attention`` of the same arguments bitwise, and the
    outputs differ from step to step (the bound call follows the query and the lengths)."""
    from turboquant.kernels import DecodeAttentionCall, DecodeWorkspace, decode_attention

    store_kw, device_lengths = CASES[case]
    s = _store(kdev, **store_kw)
    qs, rk, rv = _queries(kdev, 3)
    if device_lengths:
        length = torch.tensor([37, 21], dtype=torch.int32, device=kdev)
        rlen = torch.tensor([6, 3], dtype=torch.int32, device=kdev)
        kw = {"max_length": 40, "residual_length": rlen}
    else:
        length, rlen, kw = 37, None, {}
    call = DecodeAttentionCall(s["kc"], s["kn"], s["vc"], s["vn"], length, s["kt"], s["vt"], SCALE, rk, rv,
                               k_qjl=s["kj"], **kw)
    outs = []
    for step, q in enumerate(qs):
        if device_lengths and step:  # the static cache's step: lengths move on the device, in place
            length.add_(1)
            rlen.copy_(torch.tensor([5, 6 - step], dtype=torch.int32))
        got = call(q).clone()
        want = decode_attention(q, s["kc"], s["kn"], s["vc"], s["vn"], length, s["kt"], s["vt"], SCALE, rk, rv,
                                k_qjl=s["kj"], workspace=DecodeWorkspace(), **kw)
        assert torch.equal(got, want), f"step {step}: bound call differs from decode_attention"
        outs.append(got)
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])


def test_bound_call_keeps_its_prepared_step(kdev):
    """After the first call the bound call launches its kept step (no plan lookup, no validation):
    the plan-cache hit counter does not move on later calls."""
    from turboquant.kernels import DecodeAttentionCall

    da = sys.modules["turboquant.kernels.decode_attention"]
    s = _store(kdev)
    qs, rk, rv = _queries(kdev, 3)
    call = DecodeAttentionCall(s["kc"], s["kn"], s["vc"], s["vn"], 37, s["kt"], s["vt"], SCALE, rk, rv)
    call(qs[0])
    assert call._step is not None
    hits = da.PLAN_STATS["hits"]
    call(qs[1])
    call(qs[2])
    assert da.PLAN_STATS["hits"] == hits, "later calls must not look the plan up again"


def test_bound_call_names_a_bound_tensor_that_moved(kdev):
    """A bound store set to new memory in place (same object, another address) raises a ValueError
    naming it, instead of launching on the old address."""
    from turboquant.kernels import DecodeAttentionCall

    s = _store(kdev)
    qs, rk, rv = _queries(kdev, 2)
    call = DecodeAttentionCall(s["kc"], s["kn"], s["vc"], s["vn"], 37, s["kt"], s["vt"], SCALE, rk, rv)
    call(qs[0])
    s["vn"].set_(s["vn"].clone())
    with pytest.raises(ValueError, match="`v_norms` moved"):
        call(qs[1])


def test_bound_call_refuses_a_query_of_another_shape_or_dtype(kdev):
    """The first query fixes shape, strides, dtype and device: another batch or dtype is named."""
    from turboquant.kernels import DecodeAttentionCall

    s = _store(kdev)
    qs, rk, rv = _queries(kdev, 1)
    call = DecodeAttentionCall(s["kc"], s["kn"], s["vc"], s["vn"], 37, s["kt"], s["vt"], SCALE, rk, rv)
    call(qs[0])
    with pytest.raises(ValueError, match="`query` must keep the first call's shape"):
        call(qs[0][:1])
    with pytest.raises(ValueError, match="dtype"):
        call(qs[0].to(torch.float16))


def test_bound_call_checks_host_lengths_like_decode_attention(kdev):
    """A host (CPU) length tensor changed past ``max_length`` is refused on the next call, as
    ``decode_attention`` refuses it (CUDA lengths are clamped in the kernels instead)."""
    from turboquant.kernels import DecodeAttentionCall

    if kdev.type != "cpu":
        pytest.skip("host length tensors: the CPU (interpreter) path")
    s = _store(kdev)
    qs, rk, rv = _queries(kdev, 2)
    length = torch.tensor([37, 21], dtype=torch.int32)
    call = DecodeAttentionCall(s["kc"], s["kn"], s["vc"], s["vn"], length, s["kt"], s["vt"], SCALE, rk, rv,
                               max_length=40)
    call(qs[0])
    length[0] = 41
    with pytest.raises(ValueError, match="outside"):
        call(qs[1])


def _gpu_store(dev, kbits, vbits, n=3000, r=64, hq=24, hkv=4, b=2, d=256):
    """A head_dim-256 store that the CUDA kernel takes (Qwen3.6-27B's full-attention shape)."""
    from turboquant.kernels import KernelTables, quantize_pack

    g = torch.Generator(device=dev).manual_seed(3)
    kt = KernelTables.from_quantizer(TurboQuantMSE(d, kbits, seed=1), dev)
    vt = KernelTables.from_quantizer(TurboQuantMSE(d, vbits, seed=2), dev)
    kc, kn = quantize_pack(torch.randn(b, hkv, n, d, device=dev, generator=g), kt)
    vc, vn = quantize_pack(torch.randn(b, hkv, n, d, device=dev, generator=g), vt)
    rk = torch.randn(b, hkv, r, d, device=dev, generator=g, dtype=torch.bfloat16)
    rv = torch.randn(b, hkv, r, d, device=dev, generator=g, dtype=torch.bfloat16)
    qs = [torch.randn(b, hq, 1, d, device=dev, generator=g, dtype=torch.bfloat16) for _ in range(3)]
    return {"kc": kc, "kn": kn, "vc": vc, "vn": vn, "kt": kt, "vt": vt, "rk": rk, "rv": rv, "qs": qs}


@pytest.mark.gpu
@pytest.mark.parametrize("graph", [False, True], ids=["relaunch", "own-graph"])
@pytest.mark.parametrize("kv", [(3.5, 3.5), (4, 3)], ids=["halves-3.5", "K4-V3"])
def test_bound_call_through_the_cuda_kernel_equals_decode_attention(cuda, kv, graph):
    """The static cache's call shape (device code and window lengths, bfloat16 window, head_dim 256)
    through the CUDA kernel: each eager step of the bound call (relaunching its kept step, or
    replaying its own CUDA graph) equals ``decode_attention`` bitwise, lengths moved in place
    between steps; the same bound call captured in an outer CUDA graph replays to the eager outputs."""
    from turboquant.kernels import DecodeAttentionCall, DecodeWorkspace, decode_attention
    from turboquant.kernels.decode_attention import LAST_LAUNCH

    s = _gpu_store(cuda, *kv)
    length = torch.tensor([2000, 2999], dtype=torch.int32, device=cuda)
    rlen = torch.tensor([64, 17], dtype=torch.int32, device=cuda)
    args = (s["kc"], s["kn"], s["vc"], s["vn"], length, s["kt"], s["vt"], 1 / 16, s["rk"], s["rv"])
    kw = {"max_length": 3000, "residual_length": rlen, "backend": "cuda"}
    call = DecodeAttentionCall(*args, **kw, graph=graph)
    steps = ([2000, 2999], [1, 2500], [0, 3000], [2999, 17])
    eager = []
    for lens, q in zip(steps, s["qs"] + s["qs"][:1]):
        length.copy_(torch.tensor(lens, dtype=torch.int32))
        got = call(q).clone()
        assert LAST_LAUNCH["cuda"], "the bound call must run the CUDA kernel here"
        assert (call._graph is not None) == (graph and len(eager) > 0)
        want = decode_attention(q, *args, **kw, workspace=DecodeWorkspace())
        assert torch.equal(got, want), f"lengths {lens}: bound call differs from decode_attention"
        eager.append(got)
    q_in = s["qs"][0].clone()
    call(q_in)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call(q_in)
    for lens, q, want in zip(steps, s["qs"] + s["qs"][:1], eager):
        length.copy_(torch.tensor(lens, dtype=torch.int32))
        q_in.copy_(q)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want), f"lengths {lens}: graph replay differs from the eager bound call"


@pytest.mark.gpu
def test_bound_call_graph_of_prod_keys_equals_decode_attention(cuda):
    """TurboQuant-prod keys (the query-side ``S q`` product is part of the call): the bound call's
    own-graph replays equal ``decode_attention`` bitwise over steps with moved device lengths."""
    from turboquant.kernels import DecodeAttentionCall, DecodeWorkspace, decode_attention

    s = _store(cuda, prod=True)
    qs, rk, rv = _queries(cuda, 3)
    length = torch.tensor([37, 21], dtype=torch.int32, device=cuda)
    args = (s["kc"], s["kn"], s["vc"], s["vn"], length, s["kt"], s["vt"], SCALE, rk, rv)
    call = DecodeAttentionCall(*args, k_qjl=s["kj"], max_length=40, graph=True)
    for step, (lens, q) in enumerate(zip(([37, 21], [40, 1], [2, 39]), qs)):
        length.copy_(torch.tensor(lens, dtype=torch.int32))
        got = call(q).clone()
        want = decode_attention(q, *args, k_qjl=s["kj"], max_length=40, workspace=DecodeWorkspace())
        assert torch.equal(got, want), f"step {step} (lengths {lens})"
    assert call._graph is not None
