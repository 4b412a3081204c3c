"""torch.compile gives the eager logits with the static cache too, and never silently drops the
compressed history (issue 14, extending ``test_compile.py``'s checks to StaticTurboQuantCache).

The cache -> attention hand-off runs outside the graph (``run_eagerly``: a graph break around
``update`` and the attention), so compiled decode steps must equal eager ones to float32 fusion
rounding; ``fullgraph=True`` must refuse with the named reason; losing the hand-off must not go
unnoticed (the static placeholders do not fit the static mask: the attention raises).
"""

from __future__ import annotations

import pytest
import torch

from turboquant import attention
from turboquant.cache import TurboQuantCache, turboquant_attention
from turboquant.models import tiny_model
from turboquant.static_cache import StaticTurboQuantCache, StaticTurboQuantLayer

HEAVY = pytest.mark.integration  # inductor's C++ codegen and the hybrid model: 10-20 s each

SHAPES = {
    "llama": {"head_dim": 64, "num_layers": 2, "num_kv_heads": 2, "num_heads": 4, "hidden_size": 64},
    "qwen3_5_text": {"head_dim": 64, "num_layers": 4, "num_kv_heads": 2, "num_heads": 4, "hidden_size": 64},
}
PREFILL, STEPS, MAX_LEN = 24, 12, 48  # 24 + 12 tokens: the 16-token window flushes at 32
TOL = 1e-5
CACHE = {"key_bits": 3.5, "value_bits": 3.5, "residual_length": 16}
CACHES = {
    "dynamic": lambda cfg: TurboQuantCache(cfg, **CACHE),
    "static": lambda cfg: StaticTurboQuantCache(cfg, MAX_LEN, max_batch_size=2, **CACHE),
}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny-model decode runs fastest on one thread (as the synthetic tier's conftest fixture)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models():
    return {arch: tiny_model(arch, seed=0, **shape) for arch, shape in SHAPES.items()}


@torch.no_grad()
def _decode_logits(model, step_model, cache) -> torch.Tensor:
    """Eager prefill, then STEPS teacher-forced decode steps through ``step_model``."""
    ids = torch.randint(3, 128, (2, PREFILL + STEPS), generator=torch.Generator().manual_seed(0))
    out = []
    with turboquant_attention(model):
        model(input_ids=ids[:, :PREFILL], past_key_values=cache)
        for t in range(PREFILL, PREFILL + STEPS):
            out.append(step_model(input_ids=ids[:, t : t + 1], past_key_values=cache).logits[:, -1])
    return torch.stack(out, 1)


@pytest.mark.parametrize("arch,cache,backend", [
    # the dynamic cache on llama (eager, inductor) and qwen3_5_text (eager): test_compile.py
    pytest.param("llama", "static", "eager", marks=HEAVY),
    pytest.param("llama", "static", "inductor", marks=HEAVY),
    pytest.param("qwen3_5_text", "static", "eager", marks=HEAVY),
    # inductor over the hybrid's DeltaNet torch fallback: ~1 min each on 2 cores, outside CI
    pytest.param("qwen3_5_text", "static", "inductor", marks=[HEAVY, pytest.mark.slow]),
    pytest.param("qwen3_5_text", "dynamic", "inductor", marks=[HEAVY, pytest.mark.slow]),
])
def test_compiled_decode_equals_eager(models, arch, cache, backend):
    m = models[arch]
    ref = _decode_logits(m, m, CACHES[cache](m.config))
    torch._dynamo.reset()
    got = _decode_logits(m, torch.compile(m, backend=backend), CACHES[cache](m.config))
    torch._dynamo.reset()
    diff = (got - ref).abs().max().item()
    assert diff <= TOL, f"{arch}/{cache}/{backend}: compiled vs eager max |Δlogit| = {diff:.3g} (allowed {TOL})"
    # power: the same steps with the compressed history dropped (ring only) are far from both
    if cache == "static":
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(StaticTurboQuantLayer, "flushed_length",
                       lambda self, length=None: torch.zeros((), dtype=torch.long))
            lost = _decode_logits(m, m, CACHES[cache](m.config))
        assert (lost - got).abs().max().item() > 100 * TOL


@pytest.mark.synthetic
def test_static_fullgraph_compile_refuses_with_named_error(models):
    m = models["llama"]
    torch._dynamo.reset()
    with pytest.raises(Exception, match="TurboQuantCache hands its compressed layer"):
        _decode_logits(m, torch.compile(m, backend="eager", fullgraph=True), CACHES["static"](m.config))
    torch._dynamo.reset()


@pytest.mark.synthetic
def test_lost_static_handoff_raises_instead_of_attending_the_window(models, monkeypatch):
    """Were the hand-off lost (as under tracing before issue 17's fix), sdpa would get the ring
    placeholders [B, H, R, D] against the static mask over max_cache_len positions: an error, not
    a silently wrong result."""
    m = models["llama"]
    monkeypatch.setattr(attention, "take_handoff", lambda module, key: None)
    with pytest.raises(RuntimeError):
        _decode_logits(m, m, CACHES["static"](m.config))
