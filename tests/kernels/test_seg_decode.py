"""The word-decoder decode kernel for grouped layouts (:mod:`turboquant.kernels.segmented`,
issue 12 §3 speed): pieces read from the layout, and decode == the float32 torch reference
(``decode_attention_codespace_reference``) for paper-3.5, paper-2.5, outliers-N-HI-LO, mixed K/V
layouts (one grouped and one halves too), GQA 1..8, head_dim 128/256, lengths that are not a
multiple of the block, with and without a residual window, and device-side lengths.

Tolerances as ``test_layout_kernels.py`` (float16 tensor-core operands, float32 accumulation).
"""

from __future__ import annotations

import pytest
import torch
from test_layout_kernels import _assert_attention_close, _case, _kernel, _reference

from turboquant.layout import build_layout

# (d, key layout, value layout, H_q, H_kv, length, residual R, batch): interpreter-sized cases
CASES = [
    (256, "paper-3.5", "paper-3.5", 2, 2, 37, 0, 1),
    (256, "paper-2.5", "paper-2.5", 8, 1, 29, 3, 1),
    (128, "paper-3.5", "paper-2.5", 4, 2, 45, 5, 1),
    (128, "outliers-32-4-3", "halves-2.5", 3, 1, 70, 2, 2),
    (128, "halves-3.5", "outliers-96-3-2", 1, 1, 19, 0, 1),
    (256, "outliers-96-4-2", "int-3", 5, 1, 16, 7, 1),
]


def _ids(grid):
    return [f"d{c[0]}-{c[1]}-{c[2]}-{c[3]}x{c[4]}-L{c[5]}-R{c[6]}-B{c[7]}" for c in grid]


@pytest.mark.synthetic
@pytest.mark.parametrize(
    "spec,d,want",
    [
        ("paper-3.5", 256, [(0, 64, 4), (64, 128, 3), (192, 64, 3)]),
        ("paper-3.5", 128, [(0, 32, 4), (32, 64, 3), (96, 32, 3)]),
        ("paper-2.5", 256, [(0, 64, 3), (64, 128, 2), (192, 64, 2)]),
        ("halves-3.5", 256, [(0, 128, 4), (128, 128, 3)]),
        ("int-3", 256, [(0, 128, 3), (128, 128, 3)]),
        ("outliers-96-4-2", 256, [(0, 64, 4), (64, 32, 4), (96, 128, 2), (224, 32, 2)]),
    ],
)
def test_pieces_are_read_from_the_layout_segments(spec, d, want):
    """Each segment is cut into power-of-two pieces of >= 32 coordinates whose plane offset and
    stride are the segment's own bytes (no re-derivation from bits), with the group's norm slot."""
    from turboquant.kernels.segmented import layout_pieces

    layout = build_layout(spec, d, seed=1)
    pieces = layout_pieces(layout)
    assert [(p.start, p.size, p.bits) for p in pieces] == want
    for p in pieces:
        seg = layout.segments[p.book]
        group = next(g for g in layout.groups if seg in g.segments)
        assert seg.start <= p.start and p.start + p.size <= seg.stop and seg.bits == p.bits
        assert (
            p.base == seg.byte_start + (p.start - seg.start) // 8 and p.stride == seg.plane_nbytes
        )
        assert p.slot == group.norm_slot and p.base % 4 == 0 and p.stride % 4 == 0


@pytest.mark.synthetic
@pytest.mark.parametrize("spec", ["paper-3.5", "paper-2.5", "outliers-16-3-2"])
def test_layouts_without_whole_words_name_the_reason(spec):
    """d=64 outlier layouts (16-channel groups, 2-byte planes) are not whole 32-bit words: the
    reason is named and decode keeps the byte-column kernel for them."""
    from turboquant.kernels.segmented import layout_pieces

    why = layout_pieces(build_layout(spec, 64, seed=1))
    assert isinstance(why, str) and ("32-bit words" in why or "4-byte aligned" in why)


@pytest.mark.synthetic
@pytest.mark.parametrize("spec", ["paper-3.5", "outliers-96-4-2"])
def test_kernel_positions_are_a_permutation_following_the_pieces(spec):
    """``positions``: each piece's coordinates in the word decoder's order, a permutation of d."""
    from turboquant.kernels import CodeSpaceTables
    from turboquant.kernels._common import coord_perm
    from turboquant.kernels.segmented import SegmentTables

    t = SegmentTables.of(CodeSpaceTables.from_layout(build_layout(spec, 256, seed=1)))
    assert torch.equal(torch.sort(t.positions).values, torch.arange(256))
    assert torch.equal(t.positions[t.inverse], torch.arange(256))
    for p in t.pieces:
        assert torch.equal(t.positions[p.start : p.start + p.size], coord_perm(p.size) + p.start)


@pytest.mark.integration
@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_segmented_decode_matches_reference(kdev, case):
    from turboquant.kernels.codespace import LAST_KERNEL

    c = _case(kdev, *case)
    out = _kernel(c, case[5])
    assert LAST_KERNEL["decode"] == "segmented"
    _assert_attention_close(out, _reference(c, case[5]))


@pytest.mark.integration
def test_segmented_device_length_equals_int_length_on_one_grid(kdev):
    """Device lengths [B] (+ a device residual length) with a fixed ``max_length`` grid equal the
    int-length calls of one sequence on the same grid (same ``max_length`` and split count: the
    same reduction order), and the reference at the kernel tolerance."""
    c = _case(kdev, 128, "paper-3.5", "halves-3.5", 4, 2, 40, 4, 2)
    cap = c["k_codes"].shape[2]
    lengths, rl = [40, 13], [4, 1]
    got = _kernel(
        c,
        torch.tensor(lengths, dtype=torch.int32, device=kdev),
        max_length=cap,
        residual_length=torch.tensor(rl, dtype=torch.int32, device=kdev),
        num_splits=2,
    )
    for i, (n, r) in enumerate(zip(lengths, rl)):
        ci = {
            k: (v[i : i + 1] if torch.is_tensor(v) and k[2:] != "outliers" else v)
            for k, v in c.items()
        }
        ci["residual_k"], ci["residual_v"] = ci["residual_k"][:, :, :r], ci["residual_v"][:, :, :r]
        want = _kernel(ci, n, max_length=cap, num_splits=2)
        torch.testing.assert_close(got[i : i + 1], want, atol=1e-6, rtol=1e-6)
        _assert_attention_close(got[i : i + 1], _reference(ci, n))
