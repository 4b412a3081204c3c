"""A decode step over StaticTurboQuantCache captured in a CUDA graph replays like eager (issue 14).

Capture records the step once; each replay appends one token at the device-side length and
attends over the codes + ring with no host work, so 32 replays must give the logits that 32
eager steps give on an identical cache, step for step.
"""

from __future__ import annotations

import pytest
import torch

from turboquant.cache import turboquant_attention
from turboquant.decode_graph import GraphedDecodeStep, decode_inputs
from turboquant.models import tiny_model
from turboquant.static_cache import StaticTurboQuantCache

pytestmark = pytest.mark.gpu

PROMPT, WARMUP, REPLAYS, MAX_LEN, BATCH = 40, 2, 32, 128, 2
TOL = 1e-4  # float32 model; graph replay runs the eager step's kernels


@pytest.fixture(scope="module")
def cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)")
    return torch.device("cuda")


@pytest.mark.parametrize("bits", [3.5, 2.5])
def test_graph_replay_equals_eager_step_by_step(cuda, bits):
    m = tiny_model("llama", seed=0, head_dim=64, num_layers=2, num_kv_heads=2, num_heads=4, hidden_size=64).to(cuda)
    ids = torch.randint(3, 128, (BATCH, PROMPT + WARMUP + REPLAYS), generator=torch.Generator().manual_seed(0)).to(cuda)

    def cache():
        return StaticTurboQuantCache(m.config, MAX_LEN, max_batch_size=BATCH, key_bits=bits, value_bits=bits,
                                     residual_length=16)

    def pos(t: int) -> torch.Tensor:
        return torch.full((BATCH, 1), t, dtype=torch.long, device=cuda)

    eager, graphed = cache(), cache()
    with turboquant_attention(m), torch.no_grad():
        m(input_ids=ids[:, :PROMPT], past_key_values=eager)
        ref = [m(**decode_inputs(m, ids[:, t : t + 1], pos(t), eager)).logits[:, -1]
               for t in range(PROMPT, PROMPT + WARMUP + REPLAYS)]
        m(input_ids=ids[:, :PROMPT], past_key_values=graphed)
        step = GraphedDecodeStep(m, graphed, BATCH, cuda)
        got = [step.warmup(ids[:, t : t + 1], pos(t)) for t in range(PROMPT, PROMPT + WARMUP)]
        step.capture()
        got += [step.replay(ids[:, t : t + 1], pos(t)).clone() for t in range(PROMPT + WARMUP, PROMPT + WARMUP + REPLAYS)]
    torch.cuda.synchronize()
    graphed.check()  # no write past max_cache_len, every norm in float16's range
    assert int(graphed.get_seq_length()) == int(eager.get_seq_length()) == PROMPT + WARMUP + REPLAYS
    for i, (a, b) in enumerate(zip(got, ref)):
        diff = (a - b).abs().max().item()
        assert diff <= TOL, f"{bits} bits, decode step {i}: graph vs eager max |Δlogit| = {diff:.3g} (allowed {TOL})"
