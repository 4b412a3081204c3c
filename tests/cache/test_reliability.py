"""Reliability of the cache and the quantizers (issue 17): a failed update changes nothing, bad
settings and malformed packed codes are refused up front, and the memory report counts every tensor
the cache keeps alive."""

from __future__ import annotations

import gc

import pytest
import torch

from turboquant.cache import TurboQuantCache, TurboQuantCacheConfig, cache_nbytes
from turboquant.models import tiny_config
from turboquant.quantizer import PackedMSE, PackedProd, TurboQuantMSE, TurboQuantProd

pytestmark = pytest.mark.synthetic

D = 64


def _cache(**kw) -> TurboQuantCache:
    cfg = tiny_config("llama", head_dim=D, num_layers=2, num_kv_heads=2, num_heads=4, hidden_size=64)
    return TurboQuantCache(cfg, **{"residual_length": 4, **kw})


def _kv(t: int, batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, t, D, generator=g), torch.randn(batch, 2, t, D, generator=g)


def _state(cache: TurboQuantCache, layer: int = 0) -> tuple:
    lay = cache.layers[layer]
    return (lay.key_store.length, lay.value_store.length, lay._r, cache.get_seq_length(layer),
            cache_nbytes(cache).as_dict())


# -- atomic updates ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["value_states", "key_states"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_failed_update_leaves_layer_unchanged(bad, value):
    """A non-finite value in K or V raises naming the tensor; K/V lengths, window and bytes are as before."""
    cache = _cache()
    cache.update(*_kv(8), 0)
    before = _state(cache)
    k, v = _kv(12, seed=1)
    (v if bad == "value_states" else k)[0, 1, 5, 3] = value
    with pytest.raises(ValueError, match=f"`{bad}`.*NaN/Inf"):
        cache.update(k, v, 0)
    assert _state(cache) == before
    # the layer still works and stays aligned
    cache.update(*_kv(12, seed=2), 0)
    lay = cache.layers[0]
    assert lay.key_store.length == lay.value_store.length == 20 and lay._r == 0


def test_failed_deferred_norm_check_keeps_keys_and_values_aligned():
    """A norm-range verdict that arrives late (the CUDA kernel path) crops both stores alike."""

    class _Landed:  # the verdict of a CUDA event that has completed
        def query(self) -> bool:
            return True

    cache = _cache()
    cache.update(*_kv(8), 0)
    cache.update(*_kv(6, seed=1), 0)  # stores 12 tokens, window 2
    lay = cache.layers[0]
    lay.value_store._pending_checks.append((_Landed(), torch.tensor(False), 8, 12))
    with pytest.raises(ValueError, match="keeps its first 8 keys and values"):
        lay.check_norms()
    assert lay.key_store.length == lay.value_store.length == 8 and lay._r == 0


def test_update_with_another_batch_size_is_refused_before_writing():
    cache = _cache()
    cache.update(*_kv(8), 0)
    before = _state(cache)
    with pytest.raises(ValueError, match="batch 2, but the layer holds a batch of 1"):
        cache.update(*_kv(1, batch=2), 0)
    assert _state(cache) == before


# -- settings -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,err,match", [
    ({"seed": 1.7}, TypeError, "`seed` must be an int, got 1.7"),
    ({"seed": "x"}, TypeError, "`seed` must be an int"),
    ({"seed": True}, TypeError, "`seed` must be an int"),
    ({"law": "foo"}, ValueError, r"`law` must be one of \('beta', 'gaussian'\)"),
    ({"protected_layers": (1.7,)}, TypeError, "`protected_layers` entries must be ints"),
    ({"protected_layers": (True,)}, TypeError, "`protected_layers` entries must be ints"),
    ({"protected_layers": None}, TypeError, "`protected_layers` must be an int or a tuple of ints"),
])
def test_bad_cache_settings_are_refused_at_construction(kw, err, match):
    with pytest.raises(err, match=match):
        TurboQuantCacheConfig(**kw)
    with pytest.raises(err, match=match):
        _cache(**kw)


def test_protected_layers_accepts_one_int():
    assert TurboQuantCacheConfig(protected_layers=1).protected_layers == (1,)
    assert _cache(protected_layers=-1).protected == (1,)


def test_seeds_that_differ_give_different_codes():
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(0))
    a, b = TurboQuantMSE(D, 3, seed=1).encode(x).codes, TurboQuantMSE(D, 3, seed=2).encode(x).codes
    assert not torch.equal(a, b)


# -- packed codes ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vectors() -> torch.Tensor:
    return torch.randn(4, D, generator=torch.Generator().manual_seed(0))


def test_decode_refuses_norms_of_the_wrong_shape(vectors):
    q = TurboQuantMSE(D, 3.5)
    p = q.encode(vectors)
    with pytest.raises(ValueError, match=r"`norms` covers vectors of shape \(4, 4\), but the codes cover \(4,\)"):
        q.decode(PackedMSE(p.codes, torch.ones(4, 4, dtype=torch.float16)))
    with pytest.raises(TypeError, match="`norms` must have dtype torch.float16"):
        q.decode(PackedMSE(p.codes, p.norms.float()))
    with pytest.raises(ValueError, match="`codes` has shape"):
        q.decode(PackedMSE(p.codes[:, :-1], p.norms))


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool])
def test_decode_refuses_integer_output_dtypes(vectors, dtype):
    q = TurboQuantMSE(D, 3)
    with pytest.raises(TypeError, match="`dtype` must be a floating torch.dtype"):
        q.decode(q.encode(vectors), dtype=dtype)
    prod = TurboQuantProd(D, 3)
    with pytest.raises(TypeError, match="`dtype` must be a floating torch.dtype"):
        prod.decode(prod.encode(vectors), dtype=dtype)


def test_prod_decode_refuses_missing_mse_part(vectors):
    prod = TurboQuantProd(D, 3)
    p = prod.encode(vectors)
    with pytest.raises(ValueError, match="`p.mse` is missing, but a 3-bit TurboQuantProd stores MSE codes"):
        prod.decode(PackedProd(None, p.qjl, p.rnorms))


def test_prod_error_names_the_bits_the_user_gave():
    with pytest.raises(ValueError, match="fractional `bits`=2.5 for TurboQuantProd"):
        TurboQuantProd(d=24, bits=2.5, rotation="dense")


def test_tiny_norms_are_refused_and_zero_vectors_round_trip(vectors):
    q = TurboQuantMSE(D, 3)
    with pytest.raises(ValueError, match="below the float16 norm storage range"):
        q.encode(vectors * 1e-7)  # norms ~6e-7: would be stored as float16 subnormals / zeros
    zeros = torch.zeros(2, D)
    assert torch.equal(q.decode(q.encode(zeros)), zeros)


# -- memory accounting ----------------------------------------------------------------------------------
def _reachable_storages(root) -> dict[int, int]:
    """Independent walk: every tensor storage reachable from ``root`` through Python references
    (gc.get_referents), excluding the model config and modules/classes."""
    seen, out, stack = set(), {}, [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (type, type(gc))) or type(obj).__name__.endswith("Config"):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            st = obj.untyped_storage()
            if st.data_ptr():
                out[st.data_ptr()] = st.nbytes()
            continue
        if callable(obj) and not hasattr(obj, "__dict__"):
            continue
        stack.extend(gc.get_referents(obj))
    return out


@pytest.mark.parametrize("rotation,mode", [("hadamard", "mse"), ("dense", "mse"), ("hadamard", "prod")])
def test_cache_nbytes_counts_every_tensor_the_cache_pins(rotation, mode):
    cache = _cache(rotation=rotation, key_mode=mode, value_mode=mode, key_bits=3, value_bits=3)
    for layer in range(2):
        cache.update(*_kv(30, seed=layer), layer)
        cache.update(*_kv(1, seed=9), layer)
    report = cache_nbytes(cache)
    walked = sum(_reachable_storages(cache).values())
    assert report.total_pinned + report.pinned.get("shared_tables", 0) == walked, report.pinned
