"""Property tests (hypothesis): packing is lossless for any codes; quantizers are scale-equivariant."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from turboquant import TurboQuantMSE, pack_bits, unpack_bits

pytestmark = pytest.mark.synthetic


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 4), groups=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_pack_unpack_is_lossless_for_any_codes(bits, rows, groups, seed):
    n = 8 * groups
    codes = torch.randint(0, 2**bits, (rows, n), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    assert torch.equal(unpack_bits(pack_bits(codes, bits), bits, n), codes)


@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from([1, 2, 2.5, 3, 3.5, 4]), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_mse_codes_are_scale_invariant_and_reconstruction_scales(bits, scale, seed):
    q = TurboQuantMSE(64, bits)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()
    a, b = q.quantize(x), q.quantize(x * scale)
    # the direction's codes do not depend on the norm (up to float32 ties at a boundary)
    assert (a.idx != b.idx).float().mean() < 0.01
    torch.testing.assert_close(b.norms, (x * scale).norm(dim=-1).half().float())
