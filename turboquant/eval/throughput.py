"""Decode throughput of a causal LM with different KV caches (C11).

Protocol (the seed's): after one shared prefill, each cache decodes ``new_tokens`` greedy tokens,
``warmup`` unmeasured runs then ``repeats`` measured ones; decode tokens/s = new_tokens / summed
wall time of that cache's decode forwards (prefill excluded). The caches run *in lockstep* (decode
step t of cache A, B, C, then step t + 1, ...) so that load from other processes on a shared
machine hits every cache alike; the reported figure is the median over repeats.

Every cache starts from the same prefill: the exact prefill keys/values (captured once in a
``DynamicCache``) are fed through ``cache.update`` layer by layer, which is exactly what the
model's own prefill does (prefill attention is exact for every cache here), then the model's
first next-token is decoded.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import Cache, DynamicCache


@dataclass
class Prefill:
    """One prompt's prefill: ids, the exact ``DynamicCache`` after it, and the next-token logits."""

    input_ids: torch.Tensor
    cache: DynamicCache
    logits: torch.Tensor
    seconds: float


@torch.no_grad()
def run_prefill(model: Any, input_ids: torch.Tensor) -> Prefill:
    cache = DynamicCache(config=model.config)
    start = time.perf_counter()
    out = model(input_ids=input_ids, past_key_values=cache, use_cache=True)
    return Prefill(input_ids, cache, out.logits[:, -1].float(), time.perf_counter() - start)


def fill_from_prefill(cache: Cache, prefill: Prefill) -> Cache:
    """Feed the exact prefill keys/values of every attention layer into ``cache`` (in place)."""
    for idx, layer in enumerate(prefill.cache.layers):
        if getattr(layer, "keys", None) is None:
            raise ValueError(f"prefill layer {idx} holds no keys (linear-attention models need a real prefill)")
        cache.update(layer.keys, layer.values, idx)
    return cache


@dataclass
class DecodeRun:
    seconds: float
    tokens: list[int]
    profile: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def decode(model: Any, cache: Cache, first_token: torch.Tensor, new_tokens: int) -> DecodeRun:
    """Greedy-decode ``new_tokens`` tokens one forward at a time; wall time of the loop."""
    tok = first_token.reshape(-1, 1)
    out_tokens = []
    start = time.perf_counter()
    for _ in range(new_tokens):
        logits = model(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1]
        tok = logits.argmax(-1, keepdim=True)
        out_tokens.append(int(tok[0, 0]))
    return DecodeRun(time.perf_counter() - start, out_tokens)


@dataclass
class ThroughputResult:
    tokens_per_s: dict[str, float]
    runs_s: dict[str, list[float]]
    ratio_vs: dict[str, float]
    baseline: str
    new_tokens: int
    warmup: int
    repeats: int
    prompt_tokens: int
    tokens: dict[str, list[int]]

    def as_dict(self) -> dict:
        return {
            "tokens_per_s": self.tokens_per_s,
            "ratio_vs_baseline": self.ratio_vs,
            "baseline": self.baseline,
            "runs_s": self.runs_s,
            "new_tokens": self.new_tokens,
            "warmup": self.warmup,
            "repeats": self.repeats,
            "prompt_tokens": self.prompt_tokens,
        }


def decode_throughput(
    model: Any,
    prefill: Prefill,
    caches: dict[str, Callable[[], Cache]],
    context: Callable[[], AbstractContextManager] | None = None,
    baseline: str = "dynamic",
    new_tokens: int = 128,
    warmup: int = 1,
    repeats: int = 3,
) -> ThroughputResult:
    """Median decode tokens/s of every cache factory in ``caches`` (interleaved runs).

    ``context`` (optional) wraps every run, e.g. ``turboquant_attention(model)``: under it a cache
    without compressed layers (``DynamicCache``) runs plain ``sdpa`` (one extra Python call a layer).
    """
    if baseline not in caches:
        raise ValueError(f"`baseline` {baseline!r} must be one of the caches {sorted(caches)}")
    if new_tokens < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"need new_tokens >= 1, repeats >= 1, warmup >= 0; got {new_tokens}, {repeats}, {warmup}")
    first = prefill.logits.argmax(-1)
    runs: dict[str, list[float]] = defaultdict(list)
    toks: dict[str, list[int]] = {}
    for rep in range(warmup + repeats):
        with (context or contextlib.nullcontext)():
            secs, out = _lockstep(model, prefill, caches, first, new_tokens)
        if rep >= warmup:
            for name in caches:
                runs[name].append(secs[name])
                toks[name] = out[name]
    tps = {k: new_tokens / statistics.median(v) for k, v in runs.items()}
    ratio = {k: v / tps[baseline] for k, v in tps.items()}
    return ThroughputResult(tps, dict(runs), ratio, baseline, new_tokens, warmup, repeats, int(prefill.input_ids.shape[1]), toks)


@torch.no_grad()
def _lockstep(model, prefill, caches, first, new_tokens) -> tuple[dict[str, float], dict[str, list[int]]]:
    """One run of every cache, interleaved step by step (step t of cache A, B, C, then t + 1, ...):
    background load hits every cache alike. Returns the summed wall time of each cache's steps."""
    state = {name: fill_from_prefill(factory(), prefill) for name, factory in caches.items()}
    tok = {name: first.reshape(-1, 1) for name in caches}
    secs = dict.fromkeys(caches, 0.0)
    out: dict[str, list[int]] = {name: [] for name in caches}
    for _ in range(new_tokens):
        for name in caches:
            start = time.perf_counter()
            logits = model(input_ids=tok[name], past_key_values=state[name], use_cache=True).logits[:, -1]
            tok[name] = logits.argmax(-1, keepdim=True)
            secs[name] += time.perf_counter() - start
            out[name].append(int(tok[name][0, 0]))
    return secs, out


@torch.no_grad()
def profile_decode(
    model: Any,
    prefill: Prefill,
    factory: Callable[[], Cache],
    context: Callable[[], AbstractContextManager] | None = None,
    steps: int = 8,
    top: int = 8,
) -> dict[str, Any]:
    """Where decode time goes: self CPU time per op (top ``top``) and the share spent inside the
    compressed attention (``turboquant::attention`` region), over ``steps`` decode steps."""
    from torch.profiler import ProfilerActivity, profile

    cache = fill_from_prefill(factory(), prefill)
    ctx = context or contextlib.nullcontext
    tok = prefill.logits.argmax(-1).reshape(-1, 1)
    with ctx():
        model(input_ids=tok, past_key_values=cache, use_cache=True)  # warm
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                logits = model(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1]
                tok = logits.argmax(-1, keepdim=True)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    ops = sorted(
        ((e.key, e.self_cpu_time_total) for e in events if not e.key.startswith("turboquant::")),
        key=lambda kv: -kv[1],
    )
    regions = {e.key: e.cpu_time_total / total for e in events if e.key.startswith("turboquant::")}
    return {
        "steps": steps,
        "ms_per_step": total / 1000 / steps,
        "top_ops_share": {k: round(v / total, 4) for k, v in ops[:top]},
        "regions_share": {k: round(v, 4) for k, v in regions.items()},
    }


def clone_prefill(prefill: Prefill) -> Prefill:
    """A deep copy (the cache object is mutated by decoding)."""
    return Prefill(prefill.input_ids, copy.deepcopy(prefill.cache), prefill.logits, prefill.seconds)


__all__ = [
    "Prefill",
    "ThroughputResult",
    "clone_prefill",
    "decode",
    "decode_throughput",
    "fill_from_prefill",
    "profile_decode",
    "run_prefill",
]
