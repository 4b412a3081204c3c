"""What the TurboQuant recipes (key layout, value layout) cost and do on a real prefill (the layout
benchmark, C08 over every layout); the recipes themselves are rows of ``turboquant.eval.recipes``,
the one table the quality runs read too.

Per recipe (``key_layout``, ``value_layout``: ``turboquant.layout`` names):

* measured bits a coordinate, per tensor: ``8 · (codes + norms + outlier indices) / (T · H · d)``
  from the bytes the cache holds (``cache_nbytes``'s categories, summed over compressed layers);
* ``distortion`` ``E||x - x̃||² / ||x||²`` and ``attn_ip_sqerr`` ``E<q, (x - x̃)/||x||>²`` over
  unit random queries ``q`` (the C08 proxies), per tensor, mean over layers;
* next-token KL(full || compressed) and top-1 agreement, teacher-forced over the tail positions.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from turboquant.cache import TurboQuantCache, TurboQuantLayer, turboquant_attention
from turboquant.eval.recipes import RECIPES as ALL_RECIPES
from turboquant.eval.recipes import Recipe, layout_options, layout_recipe
from turboquant.eval.throughput import Prefill

#: The TurboQuant recipes of :data:`turboquant.eval.recipes.RECIPES` (the rows that name key and value
#: layouts), the C08 / ``benchmarks/recipes_cpu.py`` table; one table of recipes serves every claim.
RECIPES: tuple[Recipe, ...] = tuple(r for r in ALL_RECIPES.values() if r.key_layout is not None)


def user_recipe(opts) -> tuple[Recipe, ...]:
    """The recipe of the ``--kv_layout`` / ``--key_layout`` / ``--value_layout`` options (each side
    falling back to ``--kv_layout``, then to ``paper-3.5``), or ``()`` when none is given or it is
    one of :data:`RECIPES` already."""
    layouts = layout_options(opts, "paper-3.5")
    if layouts is None:
        return ()
    name = layout_recipe(*layouts)
    recipe = ALL_RECIPES[name]
    if any((r.key_layout, r.value_layout) == (recipe.key_layout, recipe.value_layout) or r.name == name
           for r in RECIPES):
        return ()
    return (recipe,)


def make_cache(config, recipe: Recipe, **kw) -> TurboQuantCache:
    return TurboQuantCache(
        config, key_layout=recipe.key_layout, value_layout=recipe.value_layout, **kw
    )


def measured_bits(cache: TurboQuantCache) -> dict[str, float]:
    """Bits a coordinate each tensor holds in its stores: codes + norms + outlier indices."""
    out = {}
    for kind in ("key", "value"):
        held, coords = 0, 0
        for layer in cache.layers:
            if not isinstance(layer, TurboQuantLayer) or not layer.is_initialized:
                continue
            store = getattr(layer, f"{kind}_store")
            held += sum(store.used_nbytes().values())
            if store.outliers is not None:
                held += store.outliers.numel() * store.outliers.element_size()
            lead = store.codes.shape[:2] if store.codes is not None else store.qjl.shape[:2]
            coords += lead[0] * lead[1] * store.length * layer.head_dim
        out[kind] = 8 * held / coords if coords else float("nan")
    return out


def kv_errors(prefill: Prefill, cache: TurboQuantCache, queries: torch.Tensor) -> dict[str, float]:
    """Per tensor: mean over compressed layers of the unit-norm distortion and the attention
    inner-product squared error against unit ``queries`` [m, d]."""
    sums = {"distortion_k": [], "distortion_v": [], "ip_k": [], "ip_v": []}
    for idx, layer in enumerate(cache.layers):
        if not isinstance(layer, TurboQuantLayer):
            continue
        kt, vt = layer.dequantized()
        ref = prefill.cache.layers[idx]
        for tag, x, xt in (("k", ref.keys, kt), ("v", ref.values, vt)):
            x, xt = x.float().reshape(-1, x.shape[-1]), xt.float().reshape(-1, x.shape[-1])
            e = (x - xt) / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            sums[f"distortion_{tag}"].append(float((e * e).sum(-1).mean()))
            sums[f"ip_{tag}"].append(float(((e @ queries.T) ** 2).mean()))
    mean = {k: sum(v) / len(v) for k, v in sums.items()}
    return {
        "distortion_k": mean["distortion_k"],
        "distortion_v": mean["distortion_v"],
        "attn_ip_sqerr": (mean["ip_k"] + mean["ip_v"]) / 2,
        "attn_ip_sqerr_k": mean["ip_k"],
        "attn_ip_sqerr_v": mean["ip_v"],
    }


@torch.no_grad()
def tail_logits(model, cache, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Teacher-forced next-token logits of positions ``[start, T)``, one token a step: [T - start, V]."""
    return torch.cat(
        [
            model(input_ids=ids[:, t : t + 1], past_key_values=cache).logits[:, -1].float()
            for t in range(start, ids.shape[1])
        ]
    )


def next_token_agreement(ref: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    """Mean KL(ref || got) over positions and top-1 agreement, from logits [n, V]."""
    kl = F.kl_div(
        F.log_softmax(got, -1), F.log_softmax(ref, -1), log_target=True, reduction="none"
    ).sum(-1)
    return {
        "kl": float(kl.mean()),
        "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
    }


def reference_tail(model, prefill: Prefill, ids: torch.Tensor) -> torch.Tensor:
    """Full-precision teacher-forced logits after ``prefill`` (a deep copy of its exact cache)."""
    start = prefill.input_ids.shape[1]
    return tail_logits(model, copy.deepcopy(prefill.cache), ids, start)


def fill_exact_prefill(cache: TurboQuantCache, prefill: Prefill) -> TurboQuantCache:
    """The cache after the prompt, from the exact prefill (no second forward): attention layers
    take its K/V through ``update`` (what a prefill through the cache stores: the prompt attends
    exactly), linear-attention layers a copy of its conv/recurrent state."""
    for idx, layer in enumerate(prefill.cache.layers):
        if getattr(layer, "keys", None) is not None:
            cache.update(layer.keys, layer.values, idx)
        else:
            cache.layers[idx] = copy.deepcopy(layer)
    return cache


def evaluate(
    model,
    prefill: Prefill,
    ids: torch.Tensor,
    recipe: Recipe,
    ref_tail: torch.Tensor,
    queries: torch.Tensor,
    **cache_kw,
) -> dict:
    """One recipe on one prompt: bytes, proxies after the prefill, then the teacher-forced tail."""
    cache = fill_exact_prefill(make_cache(model.config, recipe, **cache_kw), prefill)
    bits = measured_bits(cache)
    row = {
        "key_bits_measured": bits["key"],
        "value_bits_measured": bits["value"],
        **kv_errors(prefill, cache, queries),
    }
    with turboquant_attention(model):
        got = tail_logits(model, cache, ids, prefill.input_ids.shape[1])
    return {**row, **next_token_agreement(ref_tail, got)}


def unit_queries(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


__all__ = [
    "RECIPES",
    "Recipe",
    "evaluate",
    "fill_exact_prefill",
    "kv_errors",
    "make_cache",
    "measured_bits",
    "next_token_agreement",
    "reference_tail",
    "tail_logits",
    "unit_queries",
]
