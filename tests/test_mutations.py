"""Mutation checks: break one property of the library in memory (monkeypatch), run the claim check
that guards it, and assert that the check fails (AssertionError = the claim's FAIL, not a WARN).

Each break is a bug a real change could introduce: the rotation left out, a codebook scaled or
replaced by a uniform grid together with its own distortion figure, recall counting one neighbour
too many, a needle scorer that finds everything, fractional-bit codes stored at the lower width, a
store that keeps a full-precision copy. Where it is cheap, the same check on the same inputs
passes without the break (the control), so the failure is the mutation's.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from tests import claim_checks as cc
from turboquant import codebook as codebook_mod
from turboquant import layout as layout_mod
from turboquant import quantizer as quantizer_mod
from turboquant.ann import bench as ann_bench
from turboquant.ann import metrics as ann_metrics
from turboquant.cache import PackedStore, TurboQuantCache, cache_nbytes, ideal_kv_nbytes
from turboquant.eval import needle
from turboquant.models import tiny_config
from turboquant.rotation import DenseRotation, HadamardRotation

pytestmark = pytest.mark.synthetic

D = 256


class Recorder:
    """Stand-in for the ``claim`` fixture: keeps what a check records; ``warn`` sets WARN."""

    def __init__(self) -> None:
        self.status, self.reasons, self.values = "PASS", [], {}

    def setting(self, **kw) -> None:
        self.values.update(kw)

    measured = threshold = setting

    def warn(self, reason: str) -> None:
        self.status = "WARN"
        self.reasons.append(reason)

    def note(self, reason: str) -> None:
        self.reasons.append(reason)


def fails(check, *args, **kwargs) -> str:
    """Run a claim check that must FAIL; return its message."""
    with pytest.raises(AssertionError) as info:
        check(Recorder(), *args, **kwargs)
    return str(info.value)


# ---- rotation left out ------------------------------------------------------------------------------
@pytest.fixture
def no_rotation(monkeypatch):
    """Π = I: both rotations return their input (a quantizer that forgets to rotate)."""
    for cls in (HadamardRotation, DenseRotation):
        monkeypatch.setattr(cls, "apply", lambda self, x: x)
        monkeypatch.setattr(cls, "invert", lambda self, y: y)


def test_missing_rotation_fails_c02(no_rotation):
    assert "one-hot max |y| 1.0000" in fails(cc.check_c02, d=64, n=1024)


def test_missing_rotation_fails_c03_on_non_isotropic_inputs(no_rotation):
    msg = fails(lambda claim: cc.check_c03_anisotropic(claim, cc.measure_c03_anisotropic(D, 1024, (2, 4)), D))
    assert all(kind in msg for kind in cc.ANISOTROPIC_KINDS), msg


def test_c03_non_isotropic_check_passes_with_the_rotation():
    """Control for the mutation above: same inputs, same reduced size."""
    cc.check_c03_anisotropic(Recorder(), cc.measure_c03_anisotropic(D, 1024, (2, 4)), D)


# ---- wrong codebook, with its own distortion figure moving along -------------------------------------
def _patch_codebook(monkeypatch, transform) -> None:
    """Quantizers get a codebook whose centroids are ``transform(lloyd_max)`` and whose
    ``distortion`` is that of the new centroids: the codebook and its own figure agree."""
    real = codebook_mod.lloyd_max_codebook

    def wrong(bits, d, law="beta", **kw):
        cb = real(bits, d, law, **kw)
        c = tuple(float(v) for v in transform(np.asarray(cb.centroids)))
        bounds = tuple((a + b) / 2 for a, b in itertools.pairwise(c))
        return codebook_mod.Codebook(bits, d, law, c, bounds, cc.quantizer_distortion(c, d), cb.iterations)

    monkeypatch.setattr(layout_mod, "lloyd_max_codebook", wrong)  # where layouts take codebooks


def _isotropic_c03(claim) -> None:
    x = cc.unit_vectors(4096, D, seed=0)
    measured = {b: cc.mse_distortion(x, b) for b in (1, 2, 3, 4)}
    own = {b: quantizer_mod.TurboQuantMSE(D, b).distortion for b in measured}
    for b, (m, _) in measured.items():  # the codebook's own figure follows the mutation
        assert abs(m / own[b] - 1) < 0.02, f"b={b}: measured {m:.5f} vs the codebook's own {own[b]:.5f}"
    cc.check_c03_isotropic(claim, measured, D, codebook_figures=own)


@pytest.mark.parametrize(
    "transform",
    [lambda c: 1.1 * c, lambda c: np.linspace(c[0], c[-1], len(c))],
    ids=["centroids_x1.1", "uniform_grid"],
)
def test_wrong_codebook_with_matching_figure_fails_c03(monkeypatch, transform):
    _patch_codebook(monkeypatch, transform)
    assert "independent Lloyd-Max" in fails(_isotropic_c03)


def test_c03_isotropic_check_passes_with_the_lloyd_max_codebook():
    rec = Recorder()
    _isotropic_c03(rec)
    assert rec.status in ("PASS", "WARN")


# ---- recall counting one neighbour too many -----------------------------------------------------------
def _recall_k_plus_1(found: torch.Tensor, truth: torch.Tensor, k: int) -> torch.Tensor:
    f, t = found[:, : k + 1], truth[:, :k]
    return (f.unsqueeze(2) == t.unsqueeze(1)).any(dim=2).sum(dim=1).double() / k


@pytest.fixture
def recall_k_plus_1(monkeypatch):
    # the per-query primitive: recall_at_k (its mean) and the ANN bench both read it
    for mod in (ann_metrics, ann_bench):
        monkeypatch.setattr(mod, "recall_at_k_per_query", _recall_k_plus_1)


def test_recall_with_k_plus_1_neighbours_fails_the_hand_case(recall_k_plus_1):
    with pytest.raises(AssertionError, match="expected 2/3"):
        cc.check_recall_on_hand_case(ann_metrics.recall_at_k, ann_metrics.recall_1_at_k, ann_metrics.exact_topk)


def test_recall_with_k_plus_1_neighbours_fails_c14_ann(recall_k_plus_1):
    pytest.importorskip("faiss", reason="C14 needs faiss-cpu")
    from turboquant.ann import synthetic_dataset

    ds = synthetic_dataset("gaussian", 2048, 200, D, seed=0)
    assert "differs from FAISS SQtqmse" in fails(cc.check_c14_ann, ds, (4,), 10, (0,))


# ---- needle scorer that finds everything --------------------------------------------------------------
def test_needle_scorer_that_always_finds_fails(monkeypatch):
    monkeypatch.setattr(needle, "score_all", lambda generated, targets: 1.0)
    case = needle.Case("niah", 1024, 0.5, 0, (1, 2, 3), ("1840686",), (1,))
    for score in (needle.score_all, lambda text, targets: case.score(text)):
        with pytest.raises(AssertionError, match="expected 0.0"):
            cc.check_needle_scorer(score)


# ---- the KV cache: bytes at fewer bits, a hidden full-precision copy ---------------------------------
HEAD_DIM, TOKENS = 64, 256


def _filled_cache(bits: float = 3.5) -> tuple[TurboQuantCache, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A TurboQuantCache of a tiny Llama shape holding TOKENS random tokens in each layer."""
    cfg = tiny_config("llama", head_dim=HEAD_DIM, num_layers=2, num_kv_heads=2, num_heads=4, hidden_size=64)
    cache = TurboQuantCache(cfg, key_bits=bits, value_bits=bits)
    g = torch.Generator().manual_seed(0)
    kv = [(torch.randn(1, 2, TOKENS, HEAD_DIM, generator=g), torch.randn(1, 2, TOKENS, HEAD_DIM, generator=g)) for _ in range(2)]
    for idx, (k, v) in enumerate(kv):
        cache.update(k, v, idx)
    return cache, kv


def _bytes_check(claim) -> None:
    cache, _ = _filled_cache()
    cc.check_kv_bytes(cache_nbytes(cache).total_pinned, ideal_kv_nbytes(cache, TOKENS))


def _distortion_check(claim) -> None:
    cache, kv = _filled_cache()
    errs = []
    for layer, ref in zip(cache.layers, kv):
        for x, xt in zip(ref, layer.dequantized()):
            errs.append(float((((x - xt) ** 2).sum(-1) / (x**2).sum(-1)).mean()))
    cc.check_c08_distortion(sum(errs) / len(errs), 3.5, HEAD_DIM)


def test_kv_bytes_and_distortion_checks_pass_on_the_real_cache():
    _bytes_check(Recorder())
    _distortion_check(Recorder())


def test_fractional_codes_stored_at_the_lower_width_fail_the_byte_check(monkeypatch):
    """3.5-bit label, 3-bit codes (the b+1 half forgotten): 13% under the ideal, caught both ways."""
    real_init = quantizer_mod.TurboQuantMSE.__init__

    def lower_width(self, d, bits, *args, **kwargs):
        real_init(self, d, bits, *args, **kwargs)
        whole = math.floor(self.bits)
        self.segments = [(0, d, whole, codebook_mod.lloyd_max_codebook(whole, d, self.law))]

    monkeypatch.setattr(quantizer_mod.TurboQuantMSE, "__init__", lower_width)
    msg = fails(_bytes_check)
    assert "B is -1" in msg and "% off the layout's ideal" in msg, msg


def test_hidden_full_precision_copy_fails_the_distortion_lower_bound(monkeypatch):
    """A store that keeps its input and returns it from ``dequantize``: zero distortion."""
    real_append = PackedStore.append

    def append(self, x):
        real_append(self, x)
        self._copy = x.clone() if getattr(self, "_copy", None) is None else torch.cat([self._copy, x], dim=-2)

    def dequantize(self, dtype, out=None):
        res = self._copy[:, :, : self.length].to(dtype)
        if out is None:
            return res
        out[:, :, : self.length] = res
        return out[:, :, : self.length]

    monkeypatch.setattr(PackedStore, "append", append)
    monkeypatch.setattr(PackedStore, "dequantize", dequantize)
    assert "below the lower bound" in fails(_distortion_check)
