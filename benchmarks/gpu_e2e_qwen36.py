"""End to end: a random-init model of the exact Qwen3.6-27B text shape, DynamicCache (bf16) vs
TurboQuantCache (3.5 / 2.5 bits, the "turboquant" attention -> fused decode kernel on CUDA).

Random weights decode at the same speed as real ones (same shapes, same kernels; the token ids
differ), so tokens/s, memory and capacity carry over; quality does not (see C09/C10 for that).
The model is built in seconds: constructed on the meta device with bf16 as default dtype,
``to_empty(device="cuda")``, ``normal_(0, 0.02)`` on every parameter, rotary buffers rebuilt.

A run is a list of *cases* (``--case FILL:BATCHxCONTEXT:CACHES``, repeatable; default: one case
from ``--fill/--batch/--context/--bits``). Per cache of a case:

* ``real`` fill: a real prefill of ``CONTEXT`` random tokens (the 48 Gated DeltaNet layers need
  one), one shot or in ``--prefill-chunk`` chunks (``logits_to_keep=1``; TurboQuantCache chunks
  after the first attend with sdpa over the history the Triton ``dequantize`` kernel decodes, the
  compressed decode attention takes one query token only). ``--prefill-repeats`` rounds over the case's caches, interleaved.
* ``synthetic`` fill: a real prefill of ``--prompt-tokens`` tokens (initialises the DeltaNet
  states and every cache layer), then every full-attention layer is extended to ``CONTEXT``
  tokens with random bf16 K/V: DynamicCache gets the longer K/V tensors; TurboQuantCache appends
  them in chunks through ``TurboQuantLayer.append`` (the cache's own compression path, so the
  packed bytes are real). Decode then runs at position ``CONTEXT``. Random cache contents decode
  at the same speed as real ones (same shapes, same kernels).

then ``--warmup`` unmeasured decode tokens and ``--repeats`` x ``--new-tokens`` measured ones
(greedy, one forward a token; median tokens/s). With ``--budget-s`` the script times two decode
steps after the warmup and lowers the number of new tokens (to a multiple of 8) so that every
remaining cache fits in the budget; each row records the tokens it used.

Caches: ``bf16`` (DynamicCache), ``tq<bits>`` (TurboQuantCache, K and V at ``bits``, Triton
``quantize_pack`` appends and ``dequantize`` on CUDA), ``tq<bits>-torch`` (same, pure-torch
appends and dequantize), ``tq<bits>-synccheck`` (kernel appends with the old blocking float16
norm-range check: one host sync an append, to measure what the deferred check saves); a
``/prefill`` suffix skips the decode. ``--count-syncs`` counts the host-device synchronisations
torch reports during each prefill (by source line); ``--profile-prefill`` profiles one more
prefill a cache (slow to post-process at 32k: minutes). Rows: prefill time and peak memory, decode tokens/s and peak
memory, the KV bytes held (16 full-attention layers), bytes a token, and the capacity in tokens
that the free memory holds. ``--append-bench`` (CUDA) also times quantize+pack alone at the
32k-prefill shape, kernel vs torch, counts the codes on which they differ, and times the
dequantize of one 32k store (what each prefill chunk pays a store), kernel vs torch.

Usage (``--tiny`` runs a 4-layer toy of the same layout on CPU to check the script)::

    python benchmarks/gpu_e2e_qwen36.py --case real:1x32768:bf16,tq3.5,tq2.5 --prefill-chunk 4096 --out X.json
    python benchmarks/gpu_e2e_qwen36.py --case synthetic:1x131072:bf16,tq3.5,tq2.5 --case synthetic:6x131072:bf16,tq3.5 --budget-s 500
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import re
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

CONFIG = Path(__file__).resolve().parents[1] / "data" / "configs" / "qwen3.6-27b.json"
FILLS = ("real", "synthetic")
_CACHE_RE = re.compile(r"^(bf16|tq(\d+(?:\.\d+)?)(-torch|-synccheck)?)(/prefill)?$")


def build_model(tiny: bool, device: torch.device):
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = {k: v for k, v in json.loads(CONFIG.read_text()).items() if not k.startswith("_") and k != "architectures"}
    if tiny:
        raw.update(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
                   num_key_value_heads=2, head_dim=64, linear_num_key_heads=2, linear_num_value_heads=4,
                   linear_key_head_dim=32, linear_value_head_dim=32, vocab_size=1024)
    model_type = raw.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **raw)
    cfg._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(prev)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
        for m in model.modules():  # rotary buffers were left uninitialised by to_empty
            if hasattr(m, "inv_freq"):
                # a fresh module of the same class computes them (transformers >= 5.2x no longer
                # keeps a `rope_init_fn` attribute to call)
                fresh = type(m)(m.config)  # on the CPU (a few floats), moved below
                for name, buf in fresh.named_buffers(recurse=False):
                    setattr(m, name, buf.to(device))
                m.attention_scaling = fresh.attention_scaling
    bad = [n for n, b in model.named_buffers() if b.is_floating_point() and not torch.isfinite(b).all()]
    bad += [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:  # uninitialised memory would give NaN logits, or worse, finite garbage
        raise RuntimeError(f"random-init model has non-finite tensors after initialisation: {bad[:5]}")
    model.eval()
    return model, cfg


def _compat_layer_kwargs(cfg) -> None:
    """transformers 5.17 returns the per-layer cache kwargs of ``get_layer_types_and_kwargs`` in
    another form than 5.24 (which ``turboquant.cache`` was written against): normalise it to one
    dict a layer for this script (reported to the cache owner)."""
    import inspect

    from transformers import cache_utils

    import turboquant.cache.model_cache as tc

    orig = cache_utils.get_layer_types_and_kwargs
    _, kw = orig(cfg)
    if isinstance(kw, (list, tuple)) and all(isinstance(k, dict) for k in kw):
        return

    def shim(config):
        types, k = orig(config)
        n = len(types)
        if isinstance(k, dict) and all(isinstance(v, (list, tuple)) and len(v) == n for v in k.values()):
            per = [{name: v[i] for name, v in k.items() if v[i] is not None} for i in range(n)]
        elif isinstance(k, dict):
            per = [dict(k) if x == "linear_attention" else {} for x in types]
        else:
            per = [{} for _ in types]
        params = inspect.signature(cache_utils.LinearAttentionLayer.__init__).parameters
        per = [{a: b for a, b in d.items() if a in params} if x == "linear_attention" else d for d, x in zip(per, types)]
        return types, per

    tc.get_layer_types_and_kwargs = shim


# ------------------------------------------------------------------------------------------------
# cases
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CacheSpec:
    name: str  # bf16 | tq3.5 | tq3.5-torch | tq3.5-synccheck
    bits: float | None  # None: DynamicCache
    append_backend: str  # auto | torch (TurboQuantCache only)
    decode: bool
    sync_norm_check: bool = False  # -synccheck: kernel appends check norms with a blocking host sync


@dataclass(frozen=True)
class Case:
    fill: str
    batch: int
    context: int
    caches: tuple[CacheSpec, ...]

    @property
    def label(self) -> str:
        return f"{self.fill}:{self.batch}x{self.context}"


def parse_cache(text: str) -> CacheSpec:
    m = _CACHE_RE.match(text.strip())
    if not m:
        raise ValueError(f"cache {text!r} not understood: use bf16, tq<bits>, tq<bits>-torch or tq<bits>-synccheck, "
                         "optionally + '/prefill'")
    from turboquant.quantizer import SUPPORTED_BITS

    bits = None if m.group(1) == "bf16" else float(m.group(2))
    if bits is not None and bits not in SUPPORTED_BITS:
        raise ValueError(f"cache {text!r}: bits must be one of {SUPPORTED_BITS}, got {bits}")
    return CacheSpec(m.group(1), bits, "torch" if m.group(3) == "-torch" else "auto", m.group(4) is None,
                     m.group(3) == "-synccheck")


def parse_case(text: str) -> Case:
    parts = text.split(":")
    if len(parts) != 3:
        raise ValueError(f"--case {text!r}: expected FILL:BATCHxCONTEXT:CACHES, e.g. synthetic:6x131072:bf16,tq3.5")
    fill, size, caches = parts
    if fill not in FILLS:
        raise ValueError(f"--case {text!r}: FILL must be one of {FILLS}, got {fill!r}")
    m = re.fullmatch(r"(\d+)x(\d+)", size)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 2:
        raise ValueError(f"--case {text!r}: BATCHxCONTEXT must be two integers like 6x131072 (batch >= 1, context >= 2), got {size!r}")
    specs = tuple(parse_cache(c) for c in caches.split(",") if c.strip())
    if not specs:
        raise ValueError(f"--case {text!r}: no caches listed (bf16, tq<bits>, tq<bits>-torch)")
    return Case(fill, int(m.group(1)), int(m.group(2)), specs)


# ------------------------------------------------------------------------------------------------
# measuring
# ------------------------------------------------------------------------------------------------
def kv_bytes(cache) -> int:
    """Bytes of the full-attention K/V held by ``cache`` (codes + norms + residual, or bf16 K/V)."""
    from turboquant.cache import cache_nbytes

    return int(cache_nbytes(cache).kv_pinned())


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _gib(n: float) -> float:
    return n / 2**30


def make_cache(spec: CacheSpec, cfg, args):
    from transformers import DynamicCache

    from turboquant.cache import TurboQuantCache

    if spec.bits is None:
        return DynamicCache(config=cfg)
    return TurboQuantCache(cfg, key_bits=spec.bits, value_bits=spec.bits, residual_length=args.residual,
                           append_backend=spec.append_backend, reserve_tokens=args.reserve_tokens)


@torch.no_grad()
def prefill(model, cache, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Real prefill of ``ids`` (one shot, or ``chunk`` tokens at a time); the last logits."""
    n = ids.shape[1]
    step = n if chunk <= 0 else chunk
    out = None
    for s in range(0, n, step):
        out = model(input_ids=ids[:, s : s + step], past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    return out


@torch.no_grad()
def extend_synthetic(cache, cfg, batch: int, target: int, gen: torch.Generator, max_chunk_bytes: int) -> None:
    """Extend every full-attention layer of ``cache`` to ``target`` tokens with random bf16 K/V
    (N(0, 1); the DeltaNet layers keep their real state)."""
    from turboquant.cache import TurboQuantLayer

    types = cfg.layer_types
    for idx, layer in enumerate(cache.layers):
        if types[idx] != "full_attention":
            continue
        if isinstance(layer, TurboQuantLayer):
            have = layer.get_seq_length()
            b, h, d = batch, layer.num_heads, layer.head_dim
            per_token = b * h * d * 2
            step = max(128, (max_chunk_bytes // per_token) // 128 * 128)
            while have < target:
                t = min(step, target - have)
                k = torch.randn(b, h, t, d, generator=gen, device=layer.device, dtype=layer.dtype)
                v = torch.randn(b, h, t, d, generator=gen, device=layer.device, dtype=layer.dtype)
                layer.append(k, v)
                del k, v
                have += t
        else:  # DynamicLayer: one longer tensor, the real prompt's K/V first
            old_k, old_v = layer.keys, layer.values
            b, h, p, d = old_k.shape
            if p >= target:
                continue
            for name, old in (("keys", old_k), ("values", old_v)):
                new = torch.empty(b, h, target, d, dtype=old.dtype, device=old.device)
                new[:, :, :p] = old
                new[:, :, p:].normal_(0.0, 1.0, generator=gen)
                setattr(layer, name, new)
            del old_k, old_v
    got = cache.get_seq_length()
    if got != target:
        raise RuntimeError(f"synthetic fill reached {got} tokens, expected {target}")


class RowError(RuntimeError):
    """A cache of a case could not be measured as intended (recorded in its row; the run goes on)."""


class Budget:
    """Shares the remaining ``--budget-s`` among the decode runs still to come."""

    def __init__(self, seconds: float | None, decode_runs: int) -> None:
        self.deadline = None if not seconds else time.perf_counter() + seconds
        self.left = decode_runs

    def tokens(self, wanted: int, repeats: int, per_token_s: float, spent_in_run: float) -> int:
        if self.deadline is None:
            return wanted
        share = (self.deadline - time.perf_counter()) / max(self.left, 1) - spent_in_run
        n = int(share / max(repeats * per_token_s, 1e-9)) // 8 * 8
        return max(8, min(wanted, n))

    def done(self) -> None:
        self.left -= 1


@contextlib.contextmanager
def _fill_mode(spec: CacheSpec, args, row: dict):
    """During a real prefill: the blocking norm check for ``-synccheck`` caches, and with
    ``--count-syncs`` the host-device synchronisations torch reports (``set_sync_debug_mode``),
    counted by source line into ``row`` (counting slows the prefill: use it in a separate run)."""
    from turboquant.cache import PackedStore

    saved = PackedStore.defer_norm_check
    PackedStore.defer_norm_check = not spec.sync_norm_check
    caught = None
    try:
        if args.count_syncs and torch.cuda.is_available():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    yield
                finally:
                    torch.cuda.set_sync_debug_mode("default")
        else:
            yield
    finally:
        PackedStore.defer_norm_check = saved
        if caught is not None:
            where: dict = {}
            for w in caught:
                if "synchroniz" in str(w.message):
                    key = f"{Path(w.filename).name}:{w.lineno}"
                    where[key] = where.get(key, 0) + 1
            row["host_syncs_fill"] = sum(where.values())
            row["host_syncs_fill_by_line"] = dict(sorted(where.items(), key=lambda kv: -kv[1])[:12])


@torch.no_grad()
def run_cache(model, cfg, case: Case, spec: CacheSpec, ids: torch.Tensor, args, counters: dict, budget: Budget,
              do_decode: bool, gen_seed: int) -> dict:
    from turboquant.cache import TurboQuantLayer, turboquant_attention
    from turboquant.eval.throughput import decode

    dev = ids.device
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    row: dict = {"case": case.label, "cache": spec.name, "batch": case.batch, "context": case.context, "fill": case.fill}
    cache = make_cache(spec, cfg, args)
    chunk = args.prefill_chunk
    _sync(dev)
    t0 = time.perf_counter()
    if case.fill == "real":
        with _fill_mode(spec, args, row):
            logits = prefill(model, cache, ids, chunk)  # sdpa: TurboQuant chunks attend over the dequantized history
            _sync(dev)
        row["prefill_s"] = time.perf_counter() - t0
        row["prefill_chunk"] = chunk if 0 < chunk < ids.shape[1] else ids.shape[1]
        if args.profile_prefill and do_decode and not spec.decode:  # last round: one more prefill, profiled, fresh cache
            def _profiled() -> float:
                c = make_cache(spec, cfg, args)
                t = time.perf_counter()
                prefill(model, c, ids, chunk)
                _sync(dev)
                return time.perf_counter() - t
            try:
                row["prefill_profile"] = profile_call(_profiled, 1, "prefill", dev, top_n=25)
            except Exception as e:  # noqa: BLE001 - a profiler failure must not cost the measured row
                row["prefill_profile_error"] = repr(e)[:300]
    else:
        logits = prefill(model, cache, ids[:, : args.prompt_tokens], chunk)
        _sync(dev)
        row["prompt_prefill_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        gen = torch.Generator(device=dev).manual_seed(gen_seed)
        extend_synthetic(cache, cfg, case.batch, case.context, gen, args.fill_chunk_mib * 2**20)
        _sync(dev)
        row["synthetic_fill_s"] = time.perf_counter() - t1
        row["prompt_tokens"] = args.prompt_tokens
    row["length_after_fill"] = int(cache.get_seq_length())
    row["kv_bytes"] = kv_bytes(cache)
    tq_layers = [l for l in cache.layers if isinstance(l, TurboQuantLayer)]
    if tq_layers:  # appends that went through the Triton quantize_pack kernel (0 on the torch path)
        row["kernel_appends_fill"] = sum(l.key_store.kernel_appends + l.value_store.kernel_appends for l in tq_layers)
        row["kernel_dequantizes_fill"] = sum(l.key_store.kernel_dequantizes + l.value_store.kernel_dequantizes for l in tq_layers)
    if dev.type == "cuda":
        row["peak_fill_GiB"] = _gib(torch.cuda.max_memory_allocated())
        row["peak_fill_above_base_GiB"] = _gib(torch.cuda.max_memory_allocated() - base)
    first = logits.argmax(-1)
    del logits
    if do_decode and spec.decode:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ctx = (lambda: turboquant_attention(model)) if spec.bits is not None else contextlib.nullcontext
        counters["fused"] = counters["masked"] = counters["calls"] = 0
        with ctx():
            t0 = time.perf_counter()
            decode(model, cache, first, args.warmup)
            row["warmup_s"] = time.perf_counter() - t0
            if spec.bits is not None and dev.type == "cuda" and counters["fused"] == 0:
                raise RowError(f"{case.label} {spec.name}: the fused decode kernel never ran during warmup "
                                   f"({counters['calls']} compressed attention calls, {counters['masked']} with a mask)")
            probe = decode(model, cache, first, 2)
            per_token = probe.seconds / 2
            n_tok = budget.tokens(args.new_tokens, args.repeats, per_token, 0.0)
            row["probe_s_per_token"] = per_token
            times = []
            for _ in range(args.repeats):
                _sync(dev)
                times.append(decode(model, cache, first, n_tok).seconds)
            if args.profile_steps:
                try:
                    row["profile"] = profile_decode(model, cache, first, args.profile_steps, dev)
                except Exception as e:  # noqa: BLE001 - a profiler failure must not cost the measured row
                    row["profile_error"] = repr(e)[:300]
        budget.done()
        row.update(new_tokens=n_tok, tokens_scaled_down=n_tok < args.new_tokens, decode_runs_s=times,
                   decode_tokens_per_s=n_tok / statistics.median(times), final_length=int(cache.get_seq_length()))
        if spec.bits is not None:
            row.update(fused_kernel_calls=counters["fused"], compressed_attention_calls=counters["calls"],
                       masked_attention_calls=counters["masked"])
        if dev.type == "cuda":
            row["peak_decode_GiB"] = _gib(torch.cuda.max_memory_allocated())
            row["peak_decode_above_base_GiB"] = _gib(torch.cuda.max_memory_allocated() - base)
    row["kv_bytes_end"] = kv_bytes(cache)
    row["kv_bytes_per_token"] = row["kv_bytes"] / max(row["length_after_fill"] * case.batch, 1)
    if tq_layers:
        row["kernel_appends"] = sum(l.key_store.kernel_appends + l.value_store.kernel_appends for l in tq_layers)
    del cache, tq_layers
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return row


def profile_decode(model, cache, first: torch.Tensor, steps: int, dev: torch.device) -> dict:
    """``steps`` decode steps under torch.profiler: wall time a step (profiler overhead included),
    the GPU's busy time a step (sum of the device-side events: kernels, copies) and the top ones."""
    from turboquant.eval.throughput import decode

    return profile_call(lambda: decode(model, cache, first, steps).seconds, steps, "step", dev)


def profile_call(fn, steps: int, unit: str, dev: torch.device, top_n: int = 15) -> dict:
    """``fn()`` (returns its wall seconds) under torch.profiler, reported per ``unit`` (``steps`` of
    them): wall ms, GPU busy ms (device-side events: kernels, copies) and the top GPU ops."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    _sync(dev)
    with profile(activities=acts) as prof:
        wall = fn()
        _sync(dev)
    # device-side events only (kernels, copies): CPU ops' self device time would count them twice
    events = [e for e in prof.key_averages() if getattr(e, "device_type", DeviceType.CPU) != DeviceType.CPU]

    def dev_us(e) -> float:
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)) or 0.0)

    top = sorted(events, key=dev_us, reverse=True)[:top_n]
    return {
        f"{unit}s": steps,
        f"wall_ms_per_{unit}": 1e3 * wall / steps,
        f"gpu_busy_ms_per_{unit}": sum(dev_us(e) for e in events) / 1e3 / steps,
        "top_gpu_ops": [{"op": e.key[:80], f"ms_per_{unit}": dev_us(e) / 1e3 / steps, f"calls_per_{unit}": e.count / steps}
                        for e in top],
    }


def append_bench(dev: torch.device, tokens: int, layers: int, heads: int, d: int, bits_list, reps: int = 5) -> list[dict]:
    """Quantize+pack of one prefill's K and V (``layers`` x 2 stores of [1, heads, tokens, d] bf16),
    the Triton kernel into preallocated store buffers vs the pure-torch encode + copy; CUDA-event
    medians. Also counts the bytes / codes on which the two paths differ."""
    from turboquant.cache import PackedStore, TensorCodec
    from turboquant.quantizer import PackedMSE

    out = []
    gen = torch.Generator(device=dev).manual_seed(5)
    x = torch.randn(1, tokens, heads, d, generator=gen, device=dev, dtype=torch.bfloat16).transpose(1, 2)  # model layout
    for bits in bits_list:
        codec = TensorCodec(d, bits, "mse", "hadamard", 11, 0, "beta", dev)
        res = {"bits": bits, "tokens": tokens, "heads": heads, "head_dim": d, "stores": 2 * layers}
        stores = {}
        for backend in ("auto", "torch"):
            times = []
            for _ in range(reps):
                st = PackedStore(codec, 256, backend)
                st.append(x[:, :, :128])  # allocate like a cache that already holds a block
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                a.record()
                st.append(x[:, :, 128:])
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            assert (st.kernel_appends > 0) == (backend == "auto"), "kernel path not taken as expected"
            stores[backend] = st
            res[f"{'triton' if backend == 'auto' else 'torch'}_ms_per_store"] = statistics.median(times)
        for backend, label in (("auto", "triton"), ("torch", "torch")):
            st = stores[backend]
            times = []
            for _ in range(reps):  # what a chunked prefill pays per chunk: the dequantized history for sdpa
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                a.record()
                st.dequantize(torch.bfloat16)
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            res[f"{label}_dequantize_ms_per_store"] = statistics.median(times)
        assert stores["auto"].kernel_dequantizes > 0 and stores["torch"].kernel_dequantizes == 0
        ref = stores["torch"].dequantize(torch.float32)
        res["dequantize_rel_frobenius_diff"] = float((stores["auto"].dequantize(torch.float32) - ref).norm() / ref.norm())
        del ref
        res["triton_ms_per_prefill"] = res["triton_ms_per_store"] * 2 * layers
        res["torch_ms_per_prefill"] = res["torch_ms_per_store"] * 2 * layers
        k, t = stores["auto"], stores["torch"]
        n = t.length
        res["bytes"] = t.codes[:, :, :n].numel()
        res["bytes_differ"] = int((k.codes[:, :, :n] != t.codes[:, :, :n]).sum())
        res["norms_differ"] = int((k.norms[:, :, :n] != t.norms[:, :, :n]).sum())
        res["norms_max_rel_diff"] = float(((k.norms[:, :, :n].float() - t.norms[:, :, :n].float()).abs()
                                           / t.norms[:, :, :n].float().clamp_min(1e-30)).max())
        q = codec.quantizer
        ki = q.unpack(PackedMSE(codes=k.codes[:, :, :n], norms=k.norms[:, :, :n])).idx
        ti = q.unpack(PackedMSE(codes=t.codes[:, :, :n], norms=t.norms[:, :, :n])).idx
        res["codes"] = ti.numel()
        res["codes_differ"] = int((ki != ti).sum())
        out.append(res)
        print(json.dumps(res), flush=True)
    return out


def finish_rows(rows: list[dict], weights: int, dev: torch.device) -> None:
    """Ratios against the bf16 row of the same case (same run, same GPU), capacity."""
    free = None
    if dev.type == "cuda":
        free = torch.cuda.get_device_properties(dev).total_memory - weights - 2 * 2**30  # 2 GiB for activations
    rows = [r for r in rows if "error" not in r]
    base = {r["case"]: r for r in rows if r["cache"] == "bf16"}
    for r in rows:
        b = base.get(r["case"])
        if b is not None:
            if "decode_tokens_per_s" in r and "decode_tokens_per_s" in b:
                r["decode_ratio_vs_bf16"] = r["decode_tokens_per_s"] / b["decode_tokens_per_s"]
            if "prefill_s" in r and "prefill_s" in b:
                r["prefill_overhead_vs_bf16"] = r["prefill_s"] / b["prefill_s"] - 1
            r["kv_ratio_vs_bf16"] = b["kv_bytes"] / max(r["kv_bytes"], 1)
        if free:
            r["capacity_tokens"] = int(free // r["kv_bytes_per_token"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", action="append", default=[], help="FILL:BATCHxCONTEXT:CACHES (repeatable), e.g. synthetic:6x131072:bf16,tq3.5")
    ap.add_argument("--fill", default="real", help=f"default case: one of {FILLS}")
    ap.add_argument("--context", type=int, default=32768, help="default case: context tokens")
    ap.add_argument("--batch", type=int, default=1, help="default case: batch")
    ap.add_argument("--bits", default="3.5,2.5", help="default case: TurboQuant bit widths")
    ap.add_argument("--prefill-chunk", type=int, default=0, help="prefill in chunks of this many tokens (0: one shot)")
    ap.add_argument("--prefill-repeats", type=int, default=1, help="real fill: rounds of prefills over the caches (the last one decodes)")
    ap.add_argument("--prompt-tokens", type=int, default=512, help="synthetic fill: real prompt tokens before the random K/V")
    ap.add_argument("--fill-chunk-mib", type=int, default=2048, help="synthetic fill: bf16 K (or V) MiB appended at a time")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=0.0, help="lower --new-tokens so that all decode runs fit in this many seconds")
    ap.add_argument("--residual", type=int, default=128)
    ap.add_argument("--reserve-tokens", type=int, default=0,
                    help="TurboQuantCache(reserve_tokens=...): allocate the code buffers for this many tokens at once "
                         "(no growth copies during a large fill)")
    ap.add_argument("--append-bench", action="store_true", help="CUDA: time quantize+pack alone, kernel vs torch")
    ap.add_argument("--profile-steps", type=int, default=0, help="after the measured decode, profile this many steps")
    ap.add_argument("--count-syncs", action="store_true",
                    help="real fill: count host-device synchronisations during each prefill (slows it)")
    ap.add_argument("--profile-prefill", action="store_true",
                    help="real fill, '/prefill' caches: after each measured prefill, profile one more (fresh cache)")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    for name in ("new_tokens", "warmup", "repeats", "prompt_tokens", "fill_chunk_mib", "prefill_repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.reserve_tokens < 0:
        raise SystemExit(f"--reserve-tokens must be >= 0, got {args.reserve_tokens}")
    if args.prefill_chunk < 0:
        raise SystemExit(f"--prefill-chunk must be >= 0 (0: one shot), got {args.prefill_chunk}")
    try:
        cases = [parse_case(c) for c in args.case] or [parse_case(
            f"{args.fill}:{args.batch}x{args.context}:" + ",".join(["bf16"] + [f"tq{b}" for b in args.bits.split(",") if b]))]
    except ValueError as e:
        raise SystemExit(str(e)) from None
    for c in cases:
        if c.fill == "synthetic" and c.context <= args.prompt_tokens:
            raise SystemExit(f"case {c.label}: a synthetic fill needs CONTEXT > --prompt-tokens ({args.prompt_tokens})")
        if c.fill == "synthetic" and not all(s.decode for s in c.caches):
            raise SystemExit(f"case {c.label}: '/prefill' caches belong to real-fill cases (a synthetic fill measures decode)")

    import transformers

    import turboquant.attention as ta
    import turboquant.kernels as tk

    dev = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    t0 = time.perf_counter()
    model, cfg = build_model(args.tiny, dev)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "total_memory_GiB": _gib(torch.cuda.get_device_properties(dev).total_memory) if dev.type == "cuda" else None,
        "torch": torch.__version__, "transformers": transformers.__version__, "triton": triton_version,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "params": n_params, "weights_GiB": _gib(weights), "build_s": build_s,
        "cases": [c.label + ":" + ",".join(s.name + ("" if s.decode else "/prefill") for s in c.caches) for c in cases],
        "new_tokens": args.new_tokens, "warmup_tokens": args.warmup, "repeats": args.repeats, "residual": args.residual,
        "reserve_tokens": args.reserve_tokens,
        "prefill_chunk": args.prefill_chunk, "prefill_repeats": args.prefill_repeats, "prompt_tokens": args.prompt_tokens,
        "budget_s": args.budget_s, "tiny": args.tiny,
        "note": "random-init weights of the exact Qwen3.6-27B text shape: same speed and memory as real weights; "
                "synthetic fills: random bf16 K/V, same shapes and kernels as real ones",
    }
    print(json.dumps(meta), flush=True)
    result = {"meta": meta, "append_bench": [], "rows": [], "prefill_rounds": []}

    def save() -> None:
        if args.out:
            finish_rows(result["rows"], weights, dev)
            Path(args.out).write_text(json.dumps(result, indent=1))

    _compat_layer_kwargs(cfg)
    counters = {"fused": 0, "calls": 0, "masked": 0}
    orig_cuda, orig_ca = tk.compressed_attention_cuda, ta.compressed_attention

    def counting_cuda(*a, **k):
        out = orig_cuda(*a, **k)
        counters["fused"] += out is not None
        return out

    def counting_ca(query, layer, scaling, attention_mask):
        counters["calls"] += 1
        counters["masked"] += attention_mask is not None
        return orig_ca(query, layer, scaling, attention_mask)

    tk.compressed_attention_cuda = counting_cuda
    ta.compressed_attention = counting_ca

    if args.append_bench and dev.type == "cuda":
        shape = cfg.get_text_config()
        n_full = sum(t == "full_attention" for t in shape.layer_types)
        result["append_bench"] = append_bench(dev, 32768, n_full, shape.num_key_value_heads, shape.head_dim,
                                              sorted({s.bits for c in cases for s in c.caches if s.bits}, reverse=True) or [3.5, 2.5])
        save()

    decode_runs = sum(1 for c in cases for s in c.caches if s.decode)
    budget = Budget(args.budget_s, decode_runs)
    from transformers import DynamicCache

    for ci, case in enumerate(cases):
        gen = torch.Generator(device=dev).manual_seed(1)
        n_ids = case.context if case.fill == "real" else args.prompt_tokens
        ids = torch.randint(0, cfg.vocab_size, (case.batch, n_ids), device=dev, generator=gen)
        with torch.no_grad():  # warm up kernels / allocator at this batch so the first measured prefill is not penalised
            model(input_ids=ids[:, :512], past_key_values=DynamicCache(config=cfg), use_cache=True, logits_to_keep=1)
        rounds = args.prefill_repeats if case.fill == "real" else 1
        prefill_times: dict[str, list[float]] = {}
        for r in range(rounds):
            last = r == rounds - 1
            for spec in case.caches:
                error = None
                try:
                    row = run_cache(model, cfg, case, spec, ids, args, counters, budget, last, gen_seed=100 + ci)
                except torch.cuda.OutOfMemoryError as e:  # record and go on: the other rows still count
                    error = f"CUDA out of memory: {str(e)[:300]}"
                except RowError as e:
                    error = str(e)
                if error is not None:
                    row = {"case": case.label, "cache": spec.name, "batch": case.batch, "context": case.context,
                           "fill": case.fill, "error": error}
                    gc.collect()
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                    if last and spec.decode:
                        budget.done()
                if "prefill_s" in row:
                    prefill_times.setdefault(spec.name, []).append(row["prefill_s"])
                    result["prefill_rounds"].append({"case": case.label, "round": r, "cache": spec.name,
                                                     "prefill_s": row["prefill_s"], "peak_fill_GiB": row.get("peak_fill_GiB")})
                    save()
                if last:
                    if spec.name in prefill_times:
                        row["prefill_runs_s"] = prefill_times[spec.name]
                        row["prefill_s"] = statistics.median(prefill_times[spec.name])
                    result["rows"].append(row)
                    save()
                print(json.dumps(row), flush=True)
    finish_rows(result["rows"], weights, dev)
    save()
    print("\n| case | cache | prefill s | peak fill GiB | decode tok/s (tokens) | vs bf16 | KV MiB | KV ratio | B/token | peak decode GiB | capacity tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        if "error" in r:
            print(f"| {r['case']} | {r['cache']} | {r['error'][:60]} |")
            continue
        tps = f"{r['decode_tokens_per_s']:.2f} ({r['new_tokens']})" if "decode_tokens_per_s" in r else "-"
        ratio = f"{r['decode_ratio_vs_bf16']:.3f}x" if "decode_ratio_vs_bf16" in r else "-"
        pre = f"{r['prefill_s']:.2f}" if "prefill_s" in r else "-"
        print(f"| {r['case']} | {r['cache']} | {pre} | {r.get('peak_fill_GiB', float('nan')):.2f} | {tps} | {ratio} | "
              f"{r['kv_bytes'] / 2**20:.1f} | {r.get('kv_ratio_vs_bf16', float('nan')):.2f}x | {r['kv_bytes_per_token']:.0f} | "
              f"{r.get('peak_decode_GiB', float('nan')):.2f} | {r.get('capacity_tokens', '-')} |")


if __name__ == "__main__":
    main()
