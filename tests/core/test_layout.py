"""The code layout: presets, bytes a vector, round trips, outlier selection, bad input."""

import pytest
import torch

from turboquant import TurboQuantMSE
from turboquant.layout import build_layout, channel_permutation, select_outliers
from turboquant.layout_quantizer import TurboQuantLayout

pytestmark = pytest.mark.synthetic
PRESETS = [
    "halves-3.5",
    "halves-2.5",
    "halves-1.5",
    "paper-3.5",
    "paper-2.5",
    (32, 4, 3),
    (16, 3, 2),
    1,
    2,
    3,
    4,
]
HEAD_DIMS = [64, 128, 256]


def _id(spec) -> str:
    return "-".join(map(str, spec)) if isinstance(spec, tuple) else str(spec)


def _with_outlier_channels(
    n: int, d: int, channels: list[int], scale: float = 10.0, seed: int = 0
) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    x[:, channels] *= scale
    return x


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("spec", PRESETS, ids=_id)
def test_packed_bytes_equal_the_layout_formula_and_round_trip_exactly(spec, d):
    if isinstance(spec, tuple) and spec[0] >= d:
        pytest.skip(f"n_out={spec[0]} needs d > {spec[0]}")
    q = TurboQuantLayout(spec, d, seed=3)
    lay = q.layout
    x = _with_outlier_channels(40, d, [1, d // 2 + 3])
    codes = q.quantize(x)
    packed = q.pack(codes)
    formula = sum(s.size * s.bits for s in lay.segments) // 8
    assert packed.codes.shape == (40, formula) and lay.code_nbytes == formula
    assert packed.norms.shape == (40, len(lay.groups)) and packed.norms.dtype == torch.float16
    idx_bytes = 0 if packed.outliers is None else packed.outliers.numel()
    assert (
        packed.nbytes()
        == 40 * lay.nbytes_per_vector + idx_bytes
        == 40 * (formula + 2 * len(lay.groups)) + idx_bytes
    )
    torch.testing.assert_close(q.dequantize(q.unpack(packed)), q.dequantize(codes), rtol=0, atol=0)


def test_paper_3_5_at_head_dim_128_holds_52_code_bytes_and_two_norms():
    lay = build_layout("paper-3.5", 128)
    assert [g.size for g in lay.groups] == [32, 96] and [g.bits for g in lay.groups] == [4, 3]
    assert lay.code_nbytes == 52 and lay.norm_nbytes == 4
    assert lay.bits_per_coordinate == 3.5, lay.describe()
    assert [g.rotation.kind for g in lay.groups] == ["hadamard", "dense"]
    assert [s.codebook.d for s in lay.segments] == [32, 96]
    p25 = build_layout("paper-2.5", 128)
    assert (
        p25.code_bits == 2.25 and p25.bits_per_coordinate == 2.5
    )  # the paper's arithmetic: 2.5 with norms


@pytest.mark.parametrize("bits", [1, 1.5, 2, 2.5, 3, 3.5, 4])
def test_halves_layout_is_the_turboquant_mse_format_bit_for_bit(bits):
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    a, b = TurboQuantMSE(128, bits, seed=5), TurboQuantLayout(bits, 128, seed=5)
    assert a.code_nbytes == b.layout.code_nbytes and a.nbytes_per_vector == b.nbytes_per_vector
    assert torch.equal(a.pack(a.quantize(x)).codes, b.pack(b.quantize(x)).codes)
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)


def test_segment_byte_offsets_tile_the_row():
    lay = build_layout("paper-3.5", 256)
    offset = 0
    for s in lay.segments:
        assert (
            s.byte_start == offset
            and s.plane_offset(s.bits - 1) == offset + (s.bits - 1) * s.size // 8
        )
        offset += s.nbytes
    assert offset == lay.code_nbytes == (64 * 4 + 192 * 3) // 8


def test_a_planted_10x_outlier_channel_is_selected():
    x = _with_outlier_channels(2 * 2 * 50, 64, [37]).reshape(2, 2, 50, 64)  # [B, H, T, D]
    x[:, 1, :, 5] *= 10
    sel = select_outliers(x, 16)
    assert sel.shape == (2, 16)
    assert 37 in sel[0].tolist() and 37 in sel[1].tolist() and 5 in sel[1].tolist()


def test_outlier_selection_is_deterministic_and_the_permutation_is_outliers_first():
    x = torch.randn(1, 4, 100, 128, generator=torch.Generator().manual_seed(9))
    a, b = select_outliers(x, 32), select_outliers(x.clone(), 32)
    assert torch.equal(a, b)
    perm = channel_permutation(a, 128)
    assert torch.equal(perm[:, :32], a) and torch.equal(
        perm.sort(-1).values, torch.arange(128).expand(4, 128)
    )
    q1, q2 = TurboQuantLayout("paper-2.5", 128, seed=2), TurboQuantLayout("paper-2.5", 128, seed=2)
    y = x[0, 0]
    torch.testing.assert_close(q1(y), q2(y), rtol=0, atol=0)


def test_outlier_recipe_puts_its_error_where_the_energy_is():
    """On vectors whose d/4 outlier channels carry 10x the scale, the paper recipe (outliers at 4
    bits) beats the data-oblivious halves split by >= 1.5x at 3.5 bits and matches its own
    prediction D_O ||x_O||² + D_R ||x_R||² within 5%. Swapping the two widths fails both."""
    d = 128
    out = list(range(0, d, 4))  # 32 planted channels = n_out
    x = _with_outlier_channels(4096, d, out, seed=4)
    rel = {}
    for spec in ("paper-3.5", "halves-3.5"):
        q = TurboQuantLayout(spec, d, seed=1)
        rel[spec] = float((((q(x) - x) ** 2).sum(-1) / (x**2).sum(-1)).mean())
    q = TurboQuantLayout("paper-3.5", d, seed=1)
    assert q.select(x).tolist() == out
    e_out, e_all = (x[:, out] ** 2).sum(-1), (x**2).sum(-1)
    go, gr = q.layout.groups
    predicted = float(((go.distortion * e_out + gr.distortion * (e_all - e_out)) / e_all).mean())
    assert rel["paper-3.5"] == pytest.approx(predicted, rel=0.05), (
        f"measured {rel['paper-3.5']:.5f} vs {predicted:.5f}"
    )
    assert rel["paper-3.5"] * 1.5 <= rel["halves-3.5"], (
        f"paper {rel['paper-3.5']:.5f} vs halves {rel['halves-3.5']:.5f}"
    )


@pytest.mark.parametrize(
    "spec, match",
    [
        ("paper-3", "valid layouts are"),
        ("halves-3.25", "valid layouts are"),
        ((24, 4, 3), "`n_out`=24"),
        ((128, 4, 3), "`n_out`=128"),
        ((0, 4, 3), "`n_out`=0"),
        ((32, 5, 3), "b_hi=5"),
        ("outliers-x-4-3", "outliers-<n_out>-<b_hi>-<b_lo>"),
    ],
)
def test_bad_layouts_are_named_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        build_layout(spec, 128)


def test_outlier_count_must_match_the_layout():
    q = TurboQuantLayout("paper-3.5", 64)
    with pytest.raises(ValueError, match="n_out=16"):
        q.quantize(torch.randn(3, 64), outliers=torch.arange(8))
