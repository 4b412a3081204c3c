"""StaticTurboQuantCache (issue 14): fixed-shape storage that gives the dynamic cache's numbers.

Every buffer is allocated once at ``max_cache_len``; lengths live on the device; the attention
reads codes for ``p < floor(L / R) R`` and the full-precision ring for the rest, which is what the
dynamic ``TurboQuantCache`` holds after its block flushes. So greedy generation must give the same
tokens (and logits within float32 summation-order noise) as the dynamic cache, across flushes.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import StaticCache

from turboquant.cache import TurboQuantCache, TurboQuantCacheConfig, turboquant_attention
from turboquant.models import tiny_model
from turboquant.static_cache import StaticTurboQuantCache, StaticTurboQuantLayer

pytestmark = pytest.mark.synthetic

SHAPES = {
    "llama": {"head_dim": 64, "num_layers": 2, "num_kv_heads": 2, "num_heads": 4, "hidden_size": 64},
    "qwen3_5_text": {"head_dim": 64, "num_layers": 4, "num_kv_heads": 2, "num_heads": 4, "hidden_size": 64},
}
RECIPES = {"halves-3.5": {"key_bits": 3.5, "value_bits": 3.5},
           "paper-3.5": {"key_layout": "paper-3.5", "value_layout": "paper-3.5"}}
BATCH, PROMPT, NEW, WINDOW, MAX_LEN = 2, 20, 28, 16, 64  # 20 + 28 tokens: the window flushes at 32
LOGIT_TOL = 1e-5  # float32; the static softmax sums over masked slots too (summation order only)


@pytest.fixture(scope="module")
def models():
    return {arch: tiny_model(arch, seed=0, **shape) for arch, shape in SHAPES.items()}


def _prompt() -> torch.Tensor:
    return torch.randint(3, 128, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))


def _settings(recipe: str) -> TurboQuantCacheConfig:
    return TurboQuantCacheConfig(residual_length=WINDOW, **RECIPES[recipe])


def _generate(model, cache, fused: bool = True):
    ids = _prompt()
    ctx = turboquant_attention(model) if fused else contextlib.nullcontext()
    with ctx:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=NEW,
                             do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits)


def _static(model, recipe: str, **kw) -> StaticTurboQuantCache:
    return StaticTurboQuantCache(model.config, MAX_LEN, max_batch_size=BATCH, settings=_settings(recipe), **kw)


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("arch", list(SHAPES))
def test_static_cache_generates_the_dynamic_caches_tokens(models, arch, recipe):
    m = models[arch]
    ref_ids, ref_logits = _generate(m, TurboQuantCache(m.config, _settings(recipe)))
    cache = _static(m, recipe)
    ids, logits = _generate(m, cache)
    assert int(cache.get_seq_length()) == PROMPT + NEW - 1 > 2 * WINDOW
    assert torch.equal(ids, ref_ids), f"{arch}/{recipe}: static and dynamic greedy tokens differ"
    diff = (logits - ref_logits).abs().max().item()
    assert diff <= LOGIT_TOL, f"{arch}/{recipe}: max |Δlogit| static vs dynamic = {diff:.3g} (allowed {LOGIT_TOL})"


def test_static_cache_under_sdpa_returns_the_dequantized_history(models):
    """Any other attention gets dequantized codes + window at their positions: same tokens."""
    m = models["llama"]
    ref_ids, ref_logits = _generate(m, TurboQuantCache(m.config, _settings("halves-3.5")), fused=False)
    ids, logits = _generate(m, _static(m, "halves-3.5"), fused=False)
    assert torch.equal(ids, ref_ids)
    assert (logits - ref_logits).abs().max().item() <= LOGIT_TOL


def test_compressed_history_matters(models, monkeypatch):
    """The equality above has power: dropping the codes (attending to the ring only) moves the logits."""
    m = models["llama"]
    _, ref = _generate(m, _static(m, "halves-3.5"))
    monkeypatch.setattr(StaticTurboQuantLayer, "flushed_length", lambda self, length=None: torch.zeros((), dtype=torch.long))
    _, lost = _generate(m, _static(m, "halves-3.5"))
    assert (lost - ref).abs().max().item() > 100 * LOGIT_TOL


def _buffers(cache) -> dict[str, torch.Tensor]:
    out = {}
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, StaticTurboQuantLayer) and layer.is_initialized:
            for kind, st in (("k", layer.key_store), ("v", layer.value_store)):
                for f, t in st._buffers().items():
                    out[f"{i}.{kind}.{f}"] = t
                if st.outliers is not None:
                    out[f"{i}.{kind}.outliers"] = st.outliers
            for f in ("_rk", "_rv", "_ring_pos", "cumulative_length"):
                out[f"{i}.{f}"] = getattr(layer, f)
    return out


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_buffers_are_allocated_once_at_max_cache_len(models, recipe):
    m = models["qwen3_5_text"]
    cache = _static(m, recipe)
    ids = _prompt()
    with turboquant_attention(m), torch.no_grad():
        m(input_ids=ids, past_key_values=cache)
        before = {k: t.data_ptr() for k, t in _buffers(cache).items()}
        for t in range(2 * WINDOW):  # two window flushes
            m(input_ids=ids[:, t % PROMPT : t % PROMPT + 1], past_key_values=cache)
    after = {k: t.data_ptr() for k, t in _buffers(cache).items()}
    assert before and after == before, "a static buffer was reallocated"
    for layer in cache.layers:
        if isinstance(layer, StaticTurboQuantLayer):
            assert layer.key_store.codes.shape[2] == MAX_LEN + 1  # + the trash slot
            assert layer.residual_keys().shape[2] == WINDOW
    assert int(cache.get_seq_length()) == PROMPT + 2 * WINDOW


def test_static_conventions(models):
    m = models["qwen3_5_text"]
    cache = _static(m, "halves-3.5")
    full = [i for i, t in enumerate(m.config.layer_types) if t == "full_attention"]
    assert cache.is_compileable
    assert all(type(cache.layers[i]) is StaticTurboQuantLayer for i in full)
    assert all(type(layer).__name__ == "LinearAttentionLayer" for i, layer in enumerate(cache.layers) if i not in full)
    assert cache.get_mask_sizes(1, full[0]) == (MAX_LEN, 0)
    assert cache.get_max_cache_shape() == MAX_LEN == cache.get_max_length()
    with torch.no_grad():
        m(input_ids=_prompt(), past_key_values=cache)
    length = cache.get_seq_length()
    assert isinstance(length, torch.Tensor) and int(length) == PROMPT  # on the device, not a host int


def test_reset_zeroes_lengths_keeps_addresses_and_reproduces(models):
    m = models["llama"]
    cache = _static(m, "paper-3.5")
    first = _generate(m, cache)
    ptrs = {k: t.data_ptr() for k, t in _buffers(cache).items()}
    cache.reset()
    assert int(cache.get_seq_length()) == 0
    assert {k: t.data_ptr() for k, t in _buffers(cache).items()} == ptrs
    again = _generate(m, cache)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_passthrough_static_cache_equals_transformers_static_cache(models):
    m = models["llama"]
    ids = _prompt()
    ours = StaticTurboQuantCache(m.config, MAX_LEN, key_bits=16, value_bits=16)
    theirs = StaticCache(config=m.config, max_cache_len=MAX_LEN)
    with torch.no_grad():
        a = m(input_ids=ids, past_key_values=ours).logits
        b = m(input_ids=ids, past_key_values=theirs).logits
    assert torch.equal(a, b)


# -- bad input: named errors before anything is written ---------------------------------------------
def _state(cache) -> dict[str, torch.Tensor]:
    return {k: t.clone() for k, t in _buffers(cache).items()}


def _linear_states(cache) -> dict[str, torch.Tensor]:
    """Copies of the tensors transformers' own (linear-attention) layers hold, by layer and name."""
    out = {}
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, StaticTurboQuantLayer):
            continue
        for name, value in vars(layer).items():
            values = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
            for j, t in enumerate(values):
                if isinstance(t, torch.Tensor) and t.numel():
                    out[f"{i}.{name}.{j}"] = t.clone()
    return out


def _assert_unchanged(cache, before: dict[str, torch.Tensor]) -> None:
    after = _buffers(cache)
    assert after.keys() == before.keys()
    for k, t in before.items():
        assert torch.equal(after[k], t), f"{k} changed by a refused update"


@pytest.mark.parametrize("arch", list(SHAPES))
def test_prompt_past_max_cache_len_is_refused_before_writing(models, arch):
    m = models[arch]
    cache = StaticTurboQuantCache(m.config, PROMPT - 1, max_batch_size=BATCH, settings=_settings("halves-3.5"))
    with torch.no_grad(), pytest.raises(ValueError, match=r"exceed max_cache_len=19"):
        m(input_ids=_prompt(), past_key_values=cache)
    assert not any(layer.is_initialized for layer in cache.layers if isinstance(layer, StaticTurboQuantLayer))
    assert not _linear_states(cache), "a hybrid's linear-attention layers updated before the refusal"
    # after a prompt: a chunk that would pass the end is refused too, lengths and bytes unchanged
    cache = _static(m, "halves-3.5")
    with torch.no_grad():
        m(input_ids=_prompt(), past_key_values=cache)
        before, linear = _state(cache), _linear_states(cache)
        with pytest.raises(ValueError, match="max_cache_len=64"):
            m(input_ids=torch.randint(3, 128, (BATCH, MAX_LEN - PROMPT + 1)), past_key_values=cache)
    _assert_unchanged(cache, before)
    after = _linear_states(cache)
    assert after.keys() == linear.keys() and all(torch.equal(after[k], t) for k, t in linear.items())
    assert bool(linear) == (arch == "qwen3_5_text")  # the hybrid's states exist and were checked


def test_wrong_batch_size_is_refused_before_writing(models):
    m = models["llama"]
    cache = _static(m, "halves-3.5")
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"batch 1.*max_batch_size=2"):
            m(input_ids=_prompt()[:1], past_key_values=cache)
        assert not cache.layers[0].is_initialized
        m(input_ids=_prompt(), past_key_values=cache)
        before = _state(cache)
        with pytest.raises(ValueError, match=r"batch 3.*max_batch_size=2"):
            m(input_ids=torch.randint(3, 128, (3, 1)), past_key_values=cache)
    _assert_unchanged(cache, before)


@pytest.mark.parametrize("kw,match", [({"max_cache_len": 0}, "max_cache_len"),
                                      ({"max_cache_len": 8, "max_batch_size": 0}, "max_batch_size"),
                                      ({"max_cache_len": 8.0}, "max_cache_len")])
def test_bad_sizes_are_named(models, kw, match):
    with pytest.raises(ValueError, match=match):
        StaticTurboQuantCache(models["llama"].config, **kw)


@pytest.mark.integration
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_device_length_kernel_path_equals_torch_path(models, recipe):
    """The CUDA path's call (``decode_attention`` with device lengths F and L - F, ``max_length``,
    a workspace) under ``TRITON_INTERPRET=1`` on CPU gives the torch path's output; calls it
    cannot serve are named."""
    from turboquant.kernels import kernels_available

    if not kernels_available(torch.device("cpu")):
        pytest.skip("needs Triton with TRITON_INTERPRET=1 (the root conftest sets it without CUDA)")
    m = models["llama"]
    cache = _static(m, recipe)
    ids = _prompt()
    with turboquant_attention(m), torch.no_grad():
        m(input_ids=torch.cat([ids, ids], 1)[:, :2 * WINDOW + 3], past_key_values=cache)  # F = 32, window 3
        m(input_ids=ids[:, :1], past_key_values=cache)
    layer = cache.layers[0]
    q = torch.randn(BATCH, 4, 1, 64, generator=torch.Generator().manual_seed(1))
    assert layer.kernel_unsupported(q, None) is None
    got, ref = layer._attend_kernel(q, 0.125, None), layer._attend_torch(q, 0.125, None)
    assert (got - ref).abs().max().item() <= 1e-4 * ref.abs().max().item() + 1e-4
    assert "query tokens" in layer.kernel_unsupported(torch.zeros(BATCH, 4, 2, 64), None)
    assert "unpadded_decode" in layer.kernel_unsupported(q, torch.ones(BATCH, 1, 1, MAX_LEN, dtype=torch.bool))


@pytest.mark.integration
def test_bound_kernel_call_follows_the_lengths_step_after_step(models):
    """The layer binds its kernel call once (stores, ring and two int32 length buffers that never
    move) and refreshes the lengths on the device every step: after decode steps that cross a
    window flush (F 32 -> 48) the one bound call still gives the torch path's output."""
    from turboquant.kernels import kernels_available

    if not kernels_available(torch.device("cpu")):
        pytest.skip("needs Triton with TRITON_INTERPRET=1 (the root conftest sets it without CUDA)")
    m = models["llama"]
    cache = _static(m, "halves-3.5")
    ids = _prompt()
    layer = cache.layers[0]
    q = torch.randn(BATCH, 4, 1, 64, generator=torch.Generator().manual_seed(1))
    with turboquant_attention(m), torch.no_grad():
        m(input_ids=torch.cat([ids, ids], 1)[:, :2 * WINDOW + 3], past_key_values=cache)  # L = 35, F = 32
        flushed = []
        for step in range(WINDOW - 2):  # L 36 .. 49: the window flushes at 48
            m(input_ids=ids[:, step:step + 1], past_key_values=cache)
            if step in (0, WINDOW - 3):
                got, ref = layer._attend_kernel(q, 0.125, None), layer._attend_torch(q, 0.125, None)
                assert (got - ref).abs().max().item() <= 1e-4 * ref.abs().max().item() + 1e-4, f"step {step}"
                flushed.append(int(layer.flushed_length()))
    assert flushed == [32, 48]
    assert len(layer.key_store._kernel["calls"]) == 1, "one bound call for one query shape"
