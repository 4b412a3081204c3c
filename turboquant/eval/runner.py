"""Run prompts through a model under several KV-cache settings with real ``generate``.

A *setting* is a name: ``"full"`` (transformers' ``DynamicCache``, full precision) or a bit
width (``"3.5"``, ``"2.5"``: ``TurboQuantCache``). A *cache factory* maps a setting to a fresh,
empty cache object; :func:`default_cache_factory` builds the real ones, tests may pass their own.

Shared prefill. Every setting stores the prompt in its own cache, but the prompt's forward pass
does not depend on how the cache stores it (a quantized cache quantizes what it is given; the
prefill attention itself runs on the exact keys and values). So the whole prompt is
run once into a full-precision ``DynamicCache`` and gives the first answer token; for each setting a
fresh cache receives those keys and values through the Cache API (``cache.update(k, v, layer_idx)``,
exactly the call the model makes during prefill, so the cache compresses and windows them as it
would), and ``model.generate`` decodes the rest of the answer against that cache. This is the same
computation as a from-scratch ``generate`` with the cache, minus (settings - 1) prefills.
Models whose cache holds non-KV state (hybrid linear-attention layers) fall back to one full run per
setting; ``share_prefill=False`` forces that path too.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

CacheFactory = Callable[[str], Any]
FULL = "full"


def setting_bits(setting: str) -> float | None:
    """``"full"`` -> None, ``"3.5"`` -> 3.5; anything else raises listing the valid forms."""
    if setting == FULL:
        return None
    try:
        return float(setting)
    except ValueError:
        raise ValueError(f"unknown cache setting {setting!r}; use 'full' or a bit width such as '3.5'") from None


def cache_argument(model: Any) -> str:
    """Name of the cache argument of ``model.forward``: ``cache`` (transformers >= 5.24) or
    ``past_key_values`` (earlier releases)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def default_cache_factory(model: Any, **cache_kwargs: Any) -> CacheFactory:
    """``"full"`` -> ``DynamicCache``; a bit width -> ``turboquant.cache.TurboQuantCache``."""
    from transformers import DynamicCache

    def factory(setting: str) -> Any:
        bits = setting_bits(setting)
        if bits is None:
            return DynamicCache()
        from turboquant.cache import TurboQuantCache  # imported lazily: the cache is optional here

        return make_turboquant_cache(TurboQuantCache, model, bits, **cache_kwargs)

    return factory


def make_turboquant_cache(cls: Any, model: Any, bits: float, **kwargs: Any) -> Any:
    """``TurboQuantCache(model.config, key_bits=bits, value_bits=bits, **kwargs)``."""
    return cls(model.config, key_bits=bits, value_bits=bits, **kwargs)


def attention_context(model: Any, cache: Any) -> Any:
    """The model's compressed-attention context for a ``TurboQuantCache`` (decode scores the packed
    codes directly), a no-op context for any other cache."""
    if hasattr(cache, "compressed_layers"):
        from turboquant.cache import turboquant_attention

        return turboquant_attention(model)
    return contextlib.nullcontext(model)


def _kv_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """(keys, values) per layer of a filled ``DynamicCache``; None when a layer holds other state."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return None
    out = []
    for layer in layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
            return None
        if type(layer).__name__ != "DynamicLayer":
            return None
        out.append((keys, values))
    return out


def can_share_prefill(model: Any) -> bool:
    """True when every layer of the model's ``DynamicCache`` is a plain KV layer (no linear-attention
    or sliding-window state), so a prefilled cache can be handed to another cache type."""
    from transformers import DynamicCache

    layers = DynamicCache(config=model.config).layers
    return bool(layers) and all(type(layer).__name__ == "DynamicLayer" for layer in layers)


def transplant(prefilled: list[tuple[torch.Tensor, torch.Tensor]], cache: Any) -> Any:
    """Feed prefilled keys/values into an empty cache through ``cache.update`` (the prefill call)."""
    for layer_idx, (keys, values) in enumerate(prefilled):
        cache.update(keys.clone(), values.clone(), layer_idx)
    return cache


@dataclass
class Generation:
    """What one setting produced for one prompt."""

    setting: str
    text: str
    new_tokens: int
    seconds: float  # decode (and, without a shared prefill, prefill) wall time


@dataclass
class PromptRun:
    """All settings' generations for one prompt, and the shared prefill time."""

    n_tokens: int
    prefill_seconds: float
    shared_prefill: bool
    generations: dict[str, Generation] = field(default_factory=dict)


def _eos_ids(model: Any, tokenizer: Any, eos_token_id: int | list[int] | None) -> set[int]:
    eos = eos_token_id if eos_token_id is not None else getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}


@torch.inference_mode()
def generate_settings(
    model: Any,
    tokenizer: Any,
    input_ids: Sequence[int],
    settings: Sequence[str],
    cache_factory: CacheFactory,
    max_new_tokens: int,
    share_prefill: bool = True,
    eos_token_id: int | list[int] | None = None,
) -> PromptRun:
    """Greedy-decode ``max_new_tokens`` (stopping at EOS) after ``input_ids`` under each setting.

    Shared prefill (see the module docstring): the whole prompt runs once at full precision, which
    gives the first answer token (a cache that stores compressed K/V still prefills on the exact
    ones, so that token is the same for every setting); each setting's cache then receives the
    prompt's K/V through ``cache.update`` and ``generate`` decodes the rest from the first token on.
    This is the same computation as a from-scratch ``generate`` with that cache."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if len(input_ids) < 1:
        raise ValueError("a prompt needs at least 1 token")
    device = next(model.parameters()).device
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=device)
    cache_kw = cache_argument(model)
    eos = _eos_ids(model, tokenizer, eos_token_id)
    prefilled = None
    first = None
    prefill_s = 0.0
    if share_prefill and can_share_prefill(model):
        from transformers import DynamicCache

        t0 = time.perf_counter()
        base = DynamicCache(config=model.config)
        logits = model(input_ids=ids, **{cache_kw: base}, use_cache=True, logits_to_keep=1).logits
        first = logits[:, -1].argmax(-1, keepdim=True)
        prefill_s = time.perf_counter() - t0
        prefilled = _kv_layers(base)
        del base, logits
    run = PromptRun(n_tokens=ids.shape[1], prefill_seconds=prefill_s, shared_prefill=prefilled is not None)
    gen_kwargs: dict[str, Any] = {"do_sample": False, "num_beams": 1, "eos_token_id": sorted(eos) or None}
    gen_kwargs["pad_token_id"] = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for setting in settings:
        cache = cache_factory(setting)
        t0 = time.perf_counter()
        if prefilled is not None:
            transplant(prefilled, cache)
            start = torch.cat([ids, first], dim=1)
            remaining = max_new_tokens - 1
            if remaining == 0 or int(first) in eos:
                out = start
            else:
                with attention_context(model, cache):
                    out = model.generate(
                        input_ids=start, attention_mask=torch.ones_like(start), **{cache_kw: cache},
                        max_new_tokens=remaining, **gen_kwargs,
                    )
        else:
            with attention_context(model, cache):
                out = model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), **{cache_kw: cache},
                    max_new_tokens=max_new_tokens, **gen_kwargs,
                )
        new = out[0, ids.shape[1]:]
        run.generations[setting] = Generation(
            setting=setting,
            text=tokenizer.decode(new, skip_special_tokens=True),
            new_tokens=int(new.numel()),
            seconds=time.perf_counter() - t0,
        )
        del cache
    return run


def run_cases(
    model: Any,
    tokenizer: Any,
    cases: Sequence[Any],
    settings: Sequence[str],
    cache_factory: CacheFactory,
    max_new_tokens: int,
    share_prefill: bool = True,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """Run every case (``turboquant.eval.needle.Case``) under every setting; one record per
    (case, setting) with the answer, its score and timings."""
    records: list[dict] = []
    for i, case in enumerate(cases):
        run = generate_settings(
            model, tokenizer, case.input_ids, settings, cache_factory, max_new_tokens, share_prefill
        )
        for setting, gen in run.generations.items():
            records.append(
                {
                    "task": case.task,
                    "length": case.context_tokens,
                    "depth": case.depth,
                    "trial": case.trial,
                    "n_tokens": case.n_tokens,
                    "setting": setting,
                    "targets": list(case.targets),
                    "output": gen.text,
                    "score": case.score(gen.text),
                    "prefill_s": round(run.prefill_seconds, 3),
                    "decode_s": round(gen.seconds, 3),
                }
            )
        if log is not None:
            parts = " ".join(f"{s}={r['score']:.2f}" for s, r in zip(settings, records[-len(settings):]))
            log(f"[{i + 1}/{len(cases)}] {case.task} len={case.context_tokens} depth={case.depth} "
                f"trial={case.trial} prefill={run.prefill_seconds:.1f}s {parts}")
    return records


def accuracy(records: Sequence[dict], setting: str) -> float:
    """Mean score of one setting's records."""
    vals = [r["score"] for r in records if r["setting"] == setting]
    if not vals:
        raise ValueError(f"no records for setting {setting!r}; have {sorted({r['setting'] for r in records})}")
    return sum(vals) / len(vals)


def cell_accuracy(records: Sequence[dict], setting: str) -> dict[str, dict[str, float]]:
    """Accuracy per grid cell: ``{length: {depth: mean score}}`` (string keys, JSON-ready)."""
    cells: dict[tuple[int, float], list[float]] = {}
    for r in records:
        if r["setting"] == setting:
            cells.setdefault((r["length"], r["depth"]), []).append(r["score"])
    out: dict[str, dict[str, float]] = {}
    for (length, depth), vals in sorted(cells.items()):
        out.setdefault(str(length), {})[f"{depth:g}"] = sum(vals) / len(vals)
    return out


def needle_settings(required_bits: str | float, report_bits: Sequence[str] = ("2.5",)) -> list[str]:
    """``["full", required, *reported]`` without duplicates (``required_bits`` like ``"3.5"``)."""
    required = f"{setting_bits(str(required_bits)):g}"
    return list(dict.fromkeys([FULL, required, *(f"{setting_bits(str(b)):g}" for b in report_bits)]))


def run_task_grid(
    model: Any,
    tokenizer: Any,
    task: str,
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int,
    settings: Sequence[str],
    cache_factory: CacheFactory | None = None,
    seed: int = 0,
    share_prefill: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict:
    """A registered task (``niah_single``, ...) over lengths x depths x trials under each setting.

    Returns ``{"accuracy": {setting: mean}, "cells": {setting: {length: {depth: acc}}},
    "records": [...], "seconds": wall time, "n_trials": trials per setting}``. Lengths beyond the
    model's context and depths outside [0, 1] raise before any generation."""
    from turboquant.eval.needle import check_context_tokens, check_depth, model_max_positions
    from turboquant.eval.ruler import get_task

    spec = get_task(task)
    limit = model_max_positions(model)
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    for n in lengths:
        check_context_tokens(n, None if limit is None else limit - spec.max_new_tokens)
    for d in depths:
        check_depth(d)
    factory = cache_factory or default_cache_factory(model)
    t0 = time.perf_counter()
    cases = [
        spec.make(tokenizer, n, d, t, seed=seed, max_positions=limit)
        for n in lengths
        for d in depths
        for t in range(trials)
    ]
    records = run_cases(model, tokenizer, cases, settings, factory, spec.max_new_tokens, share_prefill, log)
    return {
        "task": task,
        "accuracy": {s: accuracy(records, s) for s in settings},
        "cells": {s: cell_accuracy(records, s) for s in settings},
        "records": records,
        "seconds": time.perf_counter() - t0,
        "n_trials": len(cases),
    }
