"""Bit packing: exact byte counts and lossless round trips for 1..4 bits (and up to 8)."""

import pytest
import torch

from turboquant.packing import pack_bits, packed_nbytes, unpack_bits

pytestmark = pytest.mark.synthetic


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("shape", [(8,), (3, 64), (2, 5, 256)], ids=str)
def test_pack_unpack_round_trip_with_exact_bytes(bits, shape):
    codes = torch.randint(0, 2**bits, shape, generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*shape[:-1], shape[-1] * bits // 8)
    assert packed.shape[-1] == packed_nbytes(shape[-1], bits)
    assert torch.equal(unpack_bits(packed, bits, shape[-1]), codes)


def test_bit_plane_layout_is_the_documented_one():
    # codes 0..7 at 3 bits: plane j, byte 0 holds bit j of codes 0..7 in bits 0..7
    codes = torch.arange(8, dtype=torch.uint8)
    packed = pack_bits(codes, 3)
    expect = [sum(((c >> j) & 1) << i for i, c in enumerate(range(8))) for j in range(3)]
    assert packed.tolist() == expect


def test_pack_rejects_codes_that_do_not_fit():
    with pytest.raises(ValueError, match="must fit in `bits`"):
        pack_bits(torch.tensor([4, 0, 0, 0, 0, 0, 0, 0], dtype=torch.uint8), 2)


def test_pack_rejects_rows_that_are_not_whole_bytes():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_bits(torch.zeros(12, dtype=torch.uint8), 3)


@pytest.mark.parametrize("bits", [0, 9])
def test_pack_rejects_bits_out_of_range(bits):
    with pytest.raises(ValueError, match=r"`bits` must be an int in 1\.\.8"):
        pack_bits(torch.zeros(8, dtype=torch.uint8), bits)


def test_pack_rejects_float_codes():
    with pytest.raises(TypeError, match="integer tensor"):
        pack_bits(torch.zeros(8), 2)
