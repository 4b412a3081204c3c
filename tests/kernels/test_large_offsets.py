"""Kernels over stores larger than 2 GiB index with 64-bit offsets.

Found by the 48 x 128k capacity probe on the H200 (`results/gpu_e2e_qwen36_capacity.md`): the
`[48, 4, 131072, 112]` code buffer of one layer is 2.8 GB, and 32-bit offsets made
``quantize_pack`` write outside it (illegal memory access). Here a store of 3 sequences x 1 KV head
x 9.6M tokens (3.2 GB of 3.5-bit codes at head_dim 256) puts the third sequence's slab past 2^31
bytes; the tests write, decode and attend at its far end and compare with the same data at small
offsets. Only the last 64 tokens of each sequence hold data (the rest: zero codes with zero norms,
i.e. zero vectors), so the references stay small.
"""

from __future__ import annotations

import math

import pytest
import torch

from turboquant.kernels import KernelTables
from turboquant.quantizer import TurboQuantMSE

B, HKV, HQ, D, BITS, TAIL = 3, 1, 6, 256, 3.5, 64
CAP = 9_600_000  # 2 * CAP * 112 B > 2^31: sequence 2 starts beyond 2 GiB


@pytest.fixture(scope="module")
def big_store(cuda):
    from turboquant.kernels import quantize_pack

    t = KernelTables.from_quantizer(TurboQuantMSE(D, BITS, seed=3), cuda)
    gen = torch.Generator(device=cuda).manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(D, generator=gen, device=cuda), dim=0)
    k = (40 * u + 0.3 * torch.randn(B, HKV, TAIL, D, generator=gen, device=cuda)).to(torch.bfloat16)
    v = torch.randn(B, HKV, TAIL, D, generator=gen, device=cuda, dtype=torch.bfloat16)
    store = {}
    for name, x in (("k", k), ("v", v)):
        codes = torch.zeros(B, HKV, CAP, t.code_nbytes, dtype=torch.uint8, device=cuda)
        norms = torch.zeros(B, HKV, CAP, dtype=torch.float16, device=cuda)
        quantize_pack(x, t, out_codes=codes[:, :, CAP - TAIL:], out_norms=norms[:, :, CAP - TAIL:])
        store[name] = (codes, norms, x)
    q = (40 * u).to(torch.bfloat16).expand(B, HQ, 1, D).contiguous()
    return t, store, q


@pytest.mark.gpu
def test_quantize_pack_writes_past_2gib(cuda, big_store):
    from turboquant.kernels import quantize_pack

    t, store, _ = big_store
    for codes, norms, x in store.values():
        ref_c, ref_n = quantize_pack(x, t)
        assert torch.equal(codes[:, :, CAP - TAIL:], ref_c) and torch.equal(norms[:, :, CAP - TAIL:], ref_n)
        assert not codes[:, :, : CAP - TAIL].any(), "bytes written outside the appended rows"


@pytest.mark.gpu
def test_dequantize_reads_and_writes_past_2gib(cuda, big_store):
    from turboquant.kernels import dequantize, dequantize_reference

    t, store, _ = big_store
    codes, norms, _ = store["v"]
    out = dequantize(codes, norms, CAP, t, torch.bfloat16)  # 14.7 GB output
    ref = dequantize_reference(codes[:, :, CAP - TAIL:], norms[:, :, CAP - TAIL:], t)
    rel = float((out[:, :, CAP - TAIL:].float() - ref).norm() / ref.norm())
    assert rel < 5e-3, f"tail relative error {rel:.2e}"
    assert float(out[:, :, : CAP - TAIL].abs().max()) == 0.0
    del out


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_decode_attention_past_2gib(cuda, big_store, backend):
    """Queries aligned with the tail keys (scores ~100 against 0 elsewhere), so attention over all
    9.6M tokens equals attention over the 64-token tail to float32 precision."""
    from turboquant.kernels import decode_attention, decode_attention_reference

    t, store, q = big_store
    (kc, kn, _), (vc, vn, _) = store["k"], store["v"]
    scale = 1 / math.sqrt(D)
    out = decode_attention(q, kc, kn, vc, vn, CAP, t, t, scale, backend=backend)
    tail = lambda a: a[:, :, CAP - TAIL:].contiguous()
    ref = decode_attention_reference(q, tail(kc), tail(kn), tail(vc), tail(vn), TAIL, t, t, scale)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    rel = float((out.float() - ref.float()).norm() / ref.float().norm())
    assert rel < 1e-2, f"{backend}: relative error {rel:.2e}"
