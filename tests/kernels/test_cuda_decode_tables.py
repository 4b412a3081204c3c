"""The CUDA decode kernel's host-side contract, checked on CPU (CI has no GPU; the kernel itself is
checked against the torch reference by the ``gpu`` tests in ``test_decode_attention.py``).

* the byte tables ``_tables_of`` builds, read the way the kernel's ``prmt`` decoder reads them
  (8-entry low/high byte tables, 4-bit codes as 3-bit magnitude + sign), give back exactly the
  float16 centroid of every code of every supported width;
* a codebook that is not symmetric in float16 is refused (the kernel would decode it wrongly);
* ``_dst_index`` inverts the Triton combine kernel's position order (``coord_perm``), so the
  CUDA partials land where the combine reads them.
"""

from __future__ import annotations

import pytest
import torch

from turboquant.kernels import cuda_decode
from turboquant.kernels._common import KernelTables, coord_perm
from turboquant.quantizer import TurboQuantMSE

pytestmark = pytest.mark.synthetic


def _prmt(a: int, b: int, sel: int) -> int:
    """PTX ``prmt.b32`` (default mode): byte k of the result = byte (sel nibble k & 7) of {b, a},
    replicated sign bit when the nibble's bit 3 is set."""
    src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = 0
    for k in range(4):
        n = (sel >> (4 * k)) & 0xF
        byte = src[n & 7]
        if n & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * k)
    return out


def _decode_code(code: int, bits: int, tab: list[int]) -> float:
    """One code through the kernel's table logic (``decode32``), as a float."""
    if bits == 4:
        h, r = code >> 3, code & 7
        sel = r if h else 7 - r
        lo = _prmt(tab[0], tab[1], sel) & 0xFF
        hi = _prmt(tab[2], tab[3], sel) & 0xFF
        raw = (h << 3) | r
        t = (_prmt(0x80808080, 0x80808080, raw) << 1) & 0xFF
        hi |= (~t) & 0x80
    else:
        lo = _prmt(tab[0], tab[1], code) & 0xFF
        hi = _prmt(tab[2], tab[3], code) & 0xFF
    return torch.tensor([lo | (hi << 8)], dtype=torch.int32).to(torch.int16).view(torch.float16).item()


@pytest.mark.parametrize("bits", [1.5, 2.0, 2.5, 3.0, 3.5, 4.0])
def test_cuda_tables_decode_every_code_to_its_float16_centroid(bits):
    kt = KernelTables.from_quantizer(TurboQuantMSE(256, bits, seed=0))
    tabs = cuda_decode._tables_of(kt)
    assert tabs is not None
    for s, (nb, _, _) in enumerate(kt.seg):
        cent = kt.centroids[s, : 2**nb].to(torch.float16)
        got = torch.tensor([_decode_code(c, nb, tabs[s]) for c in range(2**nb)], dtype=torch.float16)
        assert torch.equal(got, cent), f"segment {s} ({nb} bits): {got.tolist()} != {cent.tolist()}"


def test_cuda_tables_refuse_an_asymmetric_4bit_codebook():
    c = torch.linspace(-0.2, 0.25, 16)  # not symmetric about 0
    kt = KernelTables.build(256, 4.0, torch.ones(256), c)
    assert cuda_decode._tables_of(kt) is None


def test_cuda_partials_land_in_the_combine_kernels_position_order():
    d = 256
    dst = cuda_decode._dst_index(d, torch.device("cpu")).long()
    assert sorted(dst.tolist()) == list(range(d))
    # the combine holds rotated coordinate nat[k] at position k (per half, coord_perm inside)
    half = coord_perm(d // 2)
    nat = torch.cat([half, half + d // 2])
    assert torch.equal(nat[dst], torch.arange(d))


def test_cuda_backend_is_not_picked_without_a_gpu():
    kt = KernelTables.from_quantizer(TurboQuantMSE(256, 3.5, seed=0))
    codes = torch.zeros(1, 2, 8, kt.code_nbytes, dtype=torch.uint8)
    norms = torch.zeros(1, 2, 8, dtype=torch.float16)
    assert not cuda_decode.supports(256, 6, kt, kt, codes, codes, norms, norms)
