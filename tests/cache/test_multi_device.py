"""TurboQuantCache on a model spread over devices with accelerate's ``device_map`` (issue 16).

Every compressed store lives on its layer's device, ``cache_nbytes`` reports bytes per device, and
greedy decoding matches the single-device run. One GPU is enough to split a model between
``cpu`` and ``cuda:0`` (the cross-device bookkeeping); two GPUs compare against one GPU exactly.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from turboquant.cache import TurboQuantCache, TurboQuantLayer, cache_nbytes, turboquant_attention
from turboquant.models import tiny_model

pytestmark = pytest.mark.gpu

SHAPES = {
    "llama": {"head_dim": 64, "num_layers": 4, "num_kv_heads": 2, "num_heads": 4, "hidden_size": 64},
    "qwen3_5_text": {"head_dim": 64, "num_layers": 8, "num_kv_heads": 2, "num_heads": 4, "hidden_size": 64},
}
NEW_TOKENS = 24


def _split(model, first: str, second: str):
    """Dispatch the first half of the decoder layers to ``first``, the rest (and the head) to ``second``."""
    from accelerate import dispatch_model

    n = model.config.num_hidden_layers
    device_map = {"model.embed_tokens": first, "model.rotary_emb": first, "model.norm": second, "lm_head": second}
    device_map.update({f"model.layers.{i}": first if i < n // 2 else second for i in range(n)})
    # main_device=first: with cpu as the main device accelerate keeps cpu modules resident (not offloaded)
    return dispatch_model(model, device_map=device_map, main_device=first)


def _generate(model, cache, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), turboquant_attention(model):
        return model.generate(input_ids=ids, past_key_values=cache, max_new_tokens=NEW_TOKENS,
                              do_sample=False, min_new_tokens=NEW_TOKENS)


def _ids(device: str) -> torch.Tensor:
    return torch.randint(3, 128, (2, 48), generator=torch.Generator().manual_seed(0)).to(device)


def _layer_devices(model) -> dict[int, torch.device]:
    return {i: next(layer.parameters()).device for i, layer in enumerate(model.model.layers)}


@pytest.fixture(scope="module")
def one_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)")
    return "cuda:0"


@pytest.mark.parametrize("arch", list(SHAPES))
def test_stores_live_on_their_layers_device_cpu_and_gpu(one_gpu, arch):
    model = _split(tiny_model(arch, seed=0, **SHAPES[arch]), "cpu", one_gpu)
    ids = _ids("cpu")
    exact = _generate(model, DynamicCache(config=model.config), ids)
    passthrough = _generate(model, TurboQuantCache(model.config, key_bits=16, value_bits=16), ids)
    assert torch.equal(passthrough, exact), "passthrough must equal DynamicCache under the same device_map"

    cache = TurboQuantCache(model.config, key_bits=3.5, value_bits=3.5)
    out = _generate(model, cache, ids)
    assert out.shape == exact.shape
    devices = _layer_devices(model)
    compressed = [i for i, layer in enumerate(cache.layers) if isinstance(layer, TurboQuantLayer)]
    assert {devices[i].type for i in compressed} == {"cpu", "cuda"}, "the split must put compressed layers on both"
    for i in compressed:
        for store in (cache.layers[i].key_store, cache.layers[i].value_store):
            assert store.codes.device == devices[i] and store.norms.device == devices[i]
    report = cache_nbytes(cache)
    assert set(report.by_device) == {"cpu", "cuda:0"}
    assert sum(report.by_device.values()) == report.total_pinned
    on_gpu = sum(b.untyped_storage().nbytes() for i in compressed if devices[i].type == "cuda"
                 for s in (cache.layers[i].key_store, cache.layers[i].value_store) for b in (s.codes, s.norms))
    assert report.by_device["cuda:0"] >= on_gpu


@pytest.mark.parametrize("arch", list(SHAPES))
def test_two_gpu_device_map_equals_one_gpu(arch):
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA GPUs, {torch.cuda.device_count()} visible")
    ref_model = tiny_model(arch, seed=0, **SHAPES[arch]).to("cuda:0")
    split = _split(tiny_model(arch, seed=0, **SHAPES[arch]), "cuda:0", "cuda:1")
    ids = _ids("cuda:0")
    for bits in (16, 3.5):
        ref = _generate(ref_model, TurboQuantCache(ref_model.config, key_bits=bits, value_bits=bits), ids)
        cache = TurboQuantCache(split.config, key_bits=bits, value_bits=bits)
        got = _generate(split, cache, ids)
        assert torch.equal(got.cpu(), ref.cpu()), f"{arch} {bits} bits: 2-GPU tokens differ from 1 GPU"
        if bits != 16:
            assert set(cache_nbytes(cache).by_device) == {"cuda:0", "cuda:1"}
