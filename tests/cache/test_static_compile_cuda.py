"""``torch.compile(mode="reduce-overhead")`` over StaticTurboQuantCache on CUDA gives eager's logits
(issue 14, the GPU half of ``test_static_compile.py``).

Under reduce-overhead the compiled model runs as cudagraph-tree segments; the cache update and the
attention are a graph break that runs eagerly between them, and there the static cache's bound
decode calls (:class:`~turboquant.kernels.DecodeAttentionCall`) capture and replay *their own*
CUDA graphs from the second step on. Nested graphs of two owners, memory pools of two owners: the
teacher-forced decode logits of the compiled model must equal the eager model's on an identical
cache, step for step, and both must keep the compressed history (the window flushes twice).
"""

from __future__ import annotations

import pytest
import torch

from turboquant.cache import turboquant_attention
from turboquant.decode_graph import decode_inputs
from turboquant.models import tiny_model
from turboquant.static_cache import StaticTurboQuantCache, StaticTurboQuantLayer

pytestmark = pytest.mark.gpu

PROMPT, STEPS, MAX_LEN, BATCH, WINDOW = 40, 40, 128, 2, 16  # the 16-token window flushes at 48 and 64
TOL = 1e-4  # float32 model: the same kernels, inductor's fusions round the projections differently


@pytest.fixture(scope="module")
def cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)")
    return torch.device("cuda")


@torch.no_grad()
def _decode(model, step_model, ids: torch.Tensor, bits: float, cuda: torch.device) -> torch.Tensor:
    cache = StaticTurboQuantCache(model.config, MAX_LEN, max_batch_size=BATCH, key_bits=bits, value_bits=bits,
                                  residual_length=WINDOW)
    out = []
    with turboquant_attention(model):
        model(input_ids=ids[:, :PROMPT], past_key_values=cache)
        for t in range(PROMPT, PROMPT + STEPS):
            pos = torch.full((BATCH, 1), t, dtype=torch.long, device=cuda)
            # clone: a cudagraph-tree output is overwritten by the next replay
            out.append(step_model(**decode_inputs(model, ids[:, t : t + 1], pos, cache)).logits[:, -1].clone())
    torch.cuda.synchronize()
    cache.check()
    assert int(cache.get_seq_length()) == PROMPT + STEPS
    return torch.stack(out, 1)


@pytest.mark.parametrize("head_dim", [64, 256])
@pytest.mark.parametrize("bits", [3.5, 2.5])
def test_reduce_overhead_compile_equals_eager_on_cuda(cuda, head_dim, bits):
    m = tiny_model("llama", seed=0, head_dim=head_dim, num_layers=2, num_kv_heads=2, num_heads=4,
                   hidden_size=64).to(cuda)
    ids = torch.randint(3, 128, (BATCH, PROMPT + STEPS), generator=torch.Generator().manual_seed(0)).to(cuda)
    ref = _decode(m, m, ids, bits, cuda)
    torch._dynamo.reset()
    try:
        got = _decode(m, torch.compile(m, mode="reduce-overhead"), ids, bits, cuda)
    finally:
        torch._dynamo.reset()
    diff = (got - ref).abs().amax(dim=(0, 2))  # per decode step
    worst = int(diff.argmax())
    assert diff.max().item() <= TOL, (
        f"head_dim {head_dim}, {bits} bits, batch {BATCH}, prompt {PROMPT}, seed 0: compiled (reduce-overhead) vs "
        f"eager max |Δlogit| = {diff.max().item():.3g} at decode step {worst} (allowed {TOL})")
    # power: the same steps with the compressed history dropped are far from the compiled ones
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(StaticTurboQuantLayer, "flushed_length",
                   lambda self, length=None: torch.zeros_like(self.cumulative_length))
        lost = _decode(m, m, ids, bits, cuda)
    assert (lost - got).abs().max().item() > 100 * TOL
