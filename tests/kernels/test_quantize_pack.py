"""quantize_pack kernel vs the core quantizer (``TurboQuantMSE.pack(quantize(x))``) and the
pure-torch reference. Tolerance: codes equal except coordinates within 1e-5 of a codebook
boundary (float32 rounding of the rotation may flip those), norms equal (both float16-rounded)."""

from __future__ import annotations

import pytest
import torch

from turboquant.quantizer import PackedMSE, TurboQuantMSE

# (d, bits) grid declared once; tiny CPU cases run under TRITON_INTERPRET=1 in about a second.
TINY = [(64, 3.5), (128, 2.5), (256, 4), (64, 1.5), (128, 3)]
FULL = [(d, b) for d in (64, 128, 256) for b in (1, 1.5, 2, 2.5, 3, 3.5, 4)]


def _check_codes(x: torch.Tensor, q: TurboQuantMSE, codes: torch.Tensor, norms: torch.Tensor) -> None:
    ref = q.quantize(x.cpu())
    got = q.unpack(PackedMSE(codes=codes.cpu(), norms=norms.cpu()))
    # float16 norms: equal up to one float16 ulp (the GPU sums squares in another order)
    torch.testing.assert_close(norms.cpu().float(), ref.norms, rtol=1e-3, atol=0)
    diff = (got.idx != ref.idx) & (ref.norms > 0).unsqueeze(-1)  # zero vectors: any code decodes to 0
    if diff.any():  # only coordinates sitting on a boundary may differ
        y = q.rotation.apply(x.cpu().float() / torch.linalg.vector_norm(x.cpu().float(), dim=-1, keepdim=True))
        bnd = torch.cat([q._table(torch.device("cpu"))[s][0] for s in range(len(q.segments))])
        dist = (y.unsqueeze(-1) - bnd).abs().amin(-1)
        assert float(dist[diff].max()) < 1e-5, f"{int(diff.sum())} codes differ away from boundaries"
    assert diff.float().mean() < 1e-4, f"code mismatch rate {diff.float().mean():.2e}"
    # dequantized vectors agree (the contract the cache relies on)
    torch.testing.assert_close(q.decode(PackedMSE(codes=codes.cpu(), norms=norms.cpu())), q.dequantize(ref),
                               atol=1e-3 * float(ref.norms.max()), rtol=0)


def _run(dev: torch.device, d: int, bits: float, shape: tuple[int, ...], dtype=torch.float32) -> None:
    from turboquant.kernels import KernelTables, quantize_pack, quantize_pack_reference

    q = TurboQuantMSE(d, bits, seed=7)
    t = KernelTables.from_quantizer(q, dev)
    gen = torch.Generator().manual_seed(int(d * bits))
    x = (torch.randn(*shape, d, generator=gen) * 3).to(dtype)
    x[..., 0, :] = 0  # zero vectors must round-trip to zeros
    codes, norms = quantize_pack(x.to(dev), t)
    assert codes.shape == (*shape, q.code_nbytes) and codes.dtype == torch.uint8
    _check_codes(x.float(), q, codes, norms)
    rc, rn = quantize_pack_reference(x.to(dev), t)
    nz = (norms > 0).unsqueeze(-1)
    assert ((rc != codes) & nz).float().mean() < 1e-4
    torch.testing.assert_close(rn, norms)
    assert float(q.decode(PackedMSE(codes=codes.cpu(), norms=norms.cpu()))[..., 0, :].abs().max()) == 0.0


@pytest.mark.integration
@pytest.mark.parametrize("d,bits", TINY, ids=[f"d{d}-b{b}" for d, b in TINY])
def test_quantize_pack_tiny(kdev, d, bits):
    _run(kdev, d, bits, (2, 3, 5))


@pytest.mark.gpu
@pytest.mark.parametrize("d,bits", FULL, ids=[f"d{d}-b{b}" for d, b in FULL])
def test_quantize_pack_gpu(cuda, d, bits):
    _run(cuda, d, bits, (3, 4, 517))
    _run(cuda, d, bits, (1, 4, 1), dtype=torch.bfloat16)  # a single decode token, bf16 input


@pytest.mark.gpu
def test_quantize_pack_writes_into_store_slice(cuda):
    """Writes straight into ``store.codes[:, :, L:L+T]`` of a larger buffer from a transposed input."""
    from turboquant.kernels import KernelTables, quantize_pack

    d, bits = 256, 3.5
    q = TurboQuantMSE(d, bits, seed=3)
    t = KernelTables.from_quantizer(q, cuda)
    B, H, T, cap, L = 2, 4, 37, 128, 50
    x = torch.randn(B, T, H, d, device=cuda, dtype=torch.bfloat16).transpose(1, 2)  # [B, H, T, d], strided
    codes = torch.zeros(B, H, cap, q.code_nbytes, dtype=torch.uint8, device=cuda)
    norms = torch.zeros(B, H, cap, dtype=torch.float16, device=cuda)
    quantize_pack(x, t, out_codes=codes[:, :, L : L + T], out_norms=norms[:, :, L : L + T])
    assert int(codes[:, :, :L].count_nonzero()) == 0 and int(codes[:, :, L + T :].count_nonzero()) == 0
    _check_codes(x.float(), q, codes[:, :, L : L + T], norms[:, :, L : L + T])


@pytest.mark.integration
def test_quantize_pack_rejects_bad_head_dim():
    from turboquant.kernels import KernelTables

    with pytest.raises(ValueError, match=r"\(64, 128, 256\)"):
        KernelTables.build(96, 4, torch.ones(96), torch.linspace(-0.1, 0.1, 16))
    with pytest.raises(ValueError, match="bits"):
        KernelTables.build(64, 5, torch.ones(64), torch.linspace(-0.1, 0.1, 32))
