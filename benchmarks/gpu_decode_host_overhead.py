"""Benchmark: host microseconds of one eager ``decode_attention`` call (target <= 30 us, issue 14).

Shape of one Qwen3.6-27B full-attention layer (24 query heads, 4 KV heads, head_dim 256, a
128-token bf16 residual window). For every (layout, key mode, length mode, batch, context):

* ``host_us_mean`` / ``host_us_median`` / ``host_us_p90``: wall time from entering the call to its
  return, ``perf_counter_ns`` around each of ``--calls`` (>= 200) calls after a warmup, issued back
  to back as a decode loop issues them, with a sync every ``--sync-every`` calls (outside the timed
  region) so the queue is drained now and then;
* ``host_us_mean_sync_each``: the same with a sync after every call (``--sync-each``; 0 skips it),
  each call enqueueing into an empty queue. It came out higher, not lower (H200, 2026-12-01 21:05:
  40-100 µs against 35-84 back to back, ``results/gpu_decode_host_overhead_sync_each.json``, whose
  columns are the other way round): a host that has just waited on the GPU runs the next call
  slower, and a full launch queue was not what made the figures track kernel time;
* ``kernel_ms``: CUDA-event time of one call (median of 50, eager, queue drained first);
* the same host time with the launch plan off (``PLAN_CACHE = False``: validation every call)
  and with the compiled-kernel relaunch off (``fast_launch.ENABLED = False``: ``kernel[grid]``),
  so the JSON shows where the microseconds went.

Length modes: ``int`` (a host int length, no workspace: a new output a call), ``device``
(an int32 device length + ``max_length`` + a :class:`DecodeWorkspace`: the static cache's call)
``bound`` (the same arguments bound once in a :class:`DecodeAttentionCall` with ``graph=False``,
called with the query alone: validation and plan lookup at its first call only) and ``graph`` (the
bound call replaying its own CUDA graph: a query copy and one graph launch a call).
Codes, norms and QJL bits are random bytes: host time does not depend on their values.

Usage (one H200, about 60-120 s, most of it first compiles; the JSON is rewritten after every row):
``python benchmarks/gpu_decode_host_overhead.py --out $OUT/gpu_decode_host_overhead.json``
On a machine without CUDA it exits with a message; ``--smoke`` then runs two tiny calls of each
mode under ``TRITON_INTERPRET=1`` and reports the wrapper's own host time (launches excluded).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time

TARGET_US = 30.0
LAYOUTS = {  # name -> (key bits, value bits, key mode); "paper-*": the paper's outlier layouts (code space)
    "halves-3.5": (3.5, 3.5, "mse"),
    "halves-2.5": (2.5, 2.5, "mse"),
    "K4/V3": (4, 3, "mse"),
    "prod-3.5": (3.5, 3.5, "prod"),
    "paper-3.5": (3.5, 3.5, "mse"),
    "paper-2.5": (2.5, 2.5, "mse"),
}
DEFAULT_LAYOUTS = "halves-3.5,halves-2.5,K4/V3,prod-3.5"


def _paper_store(torch, name, B, hkv, n, d, dev, seed):
    """Random codes and per-group norms of the outlier layout ``name`` (K and V), its code-space
    tables and each head's first ``n_out`` channels as outliers."""
    from turboquant.kernels import KernelTables
    from turboquant.layout import build_layout

    g = torch.Generator(device=dev).manual_seed(seed)
    out = {}
    for side, lseed in (("k", 5), ("v", 6)):
        lay = build_layout(name, d, seed=lseed)
        t = KernelTables.from_layout(lay, dev)
        out[side + "c"] = torch.randint(0, 256, (B, hkv, n, lay.code_nbytes), generator=g, device=dev,
                                        dtype=torch.uint8)
        out[side + "n"] = (torch.rand(B, hkv, n, lay.num_norms, generator=g, device=dev) + 0.5).to(torch.float16)
        out[side + "t"] = t
        out[side + "o"] = torch.arange(lay.n_out, device=dev).expand(hkv, lay.n_out).to(lay.index_dtype).contiguous()
    return {**out, "kj": None}


def _store(torch, name, B, hkv, n, d, dev, seed):
    """Random codes/norms of layout ``name`` at capacity ``n`` (and the QJL part of prod keys)."""
    from turboquant.kernels import KernelTables, KeyQJL
    from turboquant.quantizer import TurboQuantMSE, TurboQuantProd

    if name.startswith("paper-"):
        return _paper_store(torch, name, B, hkv, n, d, dev, seed)
    kb, vb, mode = LAYOUTS[name]
    g = torch.Generator(device=dev).manual_seed(seed)
    vq = TurboQuantMSE(d, vb, seed=12)
    kj = None
    if mode == "prod":
        pq = TurboQuantProd(d, kb, seed=11)
        kt = KernelTables.from_quantizer(pq.mse, dev)
        kj = KeyQJL(qjl=torch.randint(0, 256, (B, hkv, n, d // 8), generator=g, device=dev, dtype=torch.uint8),
                    rnorms=torch.rand(B, hkv, n, generator=g, device=dev).to(torch.float16),
                    S=pq.S.to(dev), scale=float(pq.qjl_scale))
    else:
        kt = KernelTables.from_quantizer(TurboQuantMSE(d, kb, seed=11), dev)
    vt = KernelTables.from_quantizer(vq, dev)

    def codes(t):
        return torch.randint(0, 256, (B, hkv, n, t.code_nbytes), generator=g, device=dev, dtype=torch.uint8)

    def norms():
        return (torch.rand(B, hkv, n, generator=g, device=dev) + 0.5).to(torch.float16)

    return {"kc": codes(kt), "kn": norms(), "vc": codes(vt), "vn": norms(), "kt": kt, "vt": vt, "kj": kj}


def _make_call(torch, s, q, rk, rv, n, mode, scaling):
    from turboquant.kernels import DecodeWorkspace, decode_attention

    if mode == "int":
        length, kw = n, {}
    else:
        length = torch.tensor([n], dtype=torch.int32, device=q.device)
        kw = {"max_length": n, "workspace": DecodeWorkspace()}
    if mode in ("bound", "graph"):  # the static cache's call, planned once: DecodeAttentionCall(...)(query)
        from turboquant.kernels import DecodeAttentionCall

        bound = DecodeAttentionCall(s["kc"], s["kn"], s["vc"], s["vn"], length, s["kt"], s["vt"], scaling, rk, rv,
                                    k_qjl=s["kj"], k_outliers=s.get("ko"), v_outliers=s.get("vo"),
                                    graph=mode == "graph" and q.is_cuda, **kw)
        return lambda: bound(q)

    def call():
        return decode_attention(q, s["kc"], s["kn"], s["vc"], s["vn"], length, s["kt"], s["vt"], scaling, rk, rv,
                                k_qjl=s["kj"], k_outliers=s.get("ko"), v_outliers=s.get("vo"), **kw)

    return call


def _host_us(torch, call, n_calls: int, sync_every: int) -> dict:
    """Per-call host wall time (us) of ``n_calls`` calls, the queue drained every ``sync_every``."""
    for _ in range(10):
        call()
    torch.cuda.synchronize()
    ts = []
    for i in range(n_calls):
        t0 = time.perf_counter_ns()
        call()
        ts.append((time.perf_counter_ns() - t0) / 1e3)
        if (i + 1) % sync_every == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    ts.sort()
    return {"mean": statistics.fmean(ts), "median": statistics.median(ts), "p90": ts[int(0.9 * len(ts))]}


def _kernel_ms(torch, call, reps: int = 50) -> float:
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        call()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def _smoke() -> None:
    """Tiny CPU calls under the interpreter: each mode once for real (planned == unplanned,
    bitwise), then the wrapper's own host time a call with the kernel launches replaced by no-ops
    (the interpreter's launch is no measure of a GPU launch). CPU numbers only: no target check."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from turboquant.kernels import fast_launch

    torch.set_num_threads(1)  # the CPU matmul of prod keys: no OpenMP spinning against other work
    da = sys.modules["turboquant.kernels.decode_attention"]
    dev = torch.device("cpu")
    d, hq, hkv, B, n = 64, 4, 2, 1, 40
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, hq, 1, d, generator=g)
    rk, rv = torch.randn(B, hkv, 5, d, generator=g), torch.randn(B, hkv, 5, d, generator=g)
    orig = fast_launch.LaunchCache.launch
    for name in DEFAULT_LAYOUTS.split(","):  # the outlier layouts launch through kernel[grid] (no no-op here)
        s = _store(torch, name, B, hkv, n, d, dev, 0)
        for mode in ("int", "device", "bound"):
            call = _make_call(torch, s, q, rk, rv, n, mode, 1 / math.sqrt(d))
            outs, row = [], {"layout": name, "length": mode}
            for plan in (False, True):
                da.PLAN_CACHE = plan
                da.clear_plans()
                outs.append(call().clone())
                fast_launch.LaunchCache.launch = lambda self, *a, **k: None  # wrapper time only
                call()
                t0 = time.perf_counter_ns()
                for _ in range(200):
                    call()
                row[f"wrapper_us_plan_{'on' if plan else 'off'}"] = (time.perf_counter_ns() - t0) / 200 / 1e3
                fast_launch.LaunchCache.launch = orig
            row["planned_equals_unplanned"] = bool(torch.equal(outs[0], outs[1]))
            print(json.dumps(row), flush=True)
    da.PLAN_CACHE = True
    print("smoke: CPU wrapper time without launches (this machine's Python speed); GPU numbers need CUDA")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--contexts", default="8192,32768")
    ap.add_argument("--layouts", default=DEFAULT_LAYOUTS, help=f"comma separated, of {', '.join(LAYOUTS)}")
    ap.add_argument("--modes", default="int,device,bound,graph")
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--sync-every", type=int, default=100, help="calls between syncs (2-3 launches a call)")
    ap.add_argument("--sync-each", type=int, default=1, choices=[0, 1],
                    help="also time the calls with a sync after every one (host_us_mean_sync_each; 0: skip)")
    ap.add_argument("--hq", type=int, default=24)
    ap.add_argument("--hkv", type=int, default=4)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--residual", type=int, default=128)
    ap.add_argument("--no-ablation", action="store_true", help="skip the plan-off / fast-launch-off timings")
    ap.add_argument("--smoke", action="store_true", help="without CUDA: tiny interpreter calls (wrapper time)")
    ap.add_argument("--breakdown", action="store_true",
                    help="also split each case's host time: the wrapper alone (launches made no-ops), the "
                         "recorded launches alone, a bare torch.empty of the output (host_us_breakdown)")
    ap.add_argument("--profile", default=None, metavar="PATH",
                    help="also cProfile --calls eager calls of the first case and write the top functions to PATH")
    args = ap.parse_args()
    if args.calls < 200:
        ap.error("--calls must be >= 200")

    import torch

    if not torch.cuda.is_available():
        if args.smoke:
            _smoke()
            return
        sys.exit("gpu_decode_host_overhead.py needs a CUDA GPU (host time of compiled launches); "
                 "run with --smoke on CPU for a wrapper-only check under TRITON_INTERPRET=1")
    import triton

    from turboquant.kernels import fast_launch

    da = sys.modules["turboquant.kernels.decode_attention"]
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    hq, hkv, d, R = args.hq, args.hkv, args.d, args.residual
    meta = {
        "device": props.name, "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "shape": {"hq": hq, "hkv": hkv, "d": d, "residual": R}, "calls": args.calls, "sync_every": args.sync_every,
        "seed": 0, "target_us": TARGET_US,
        "timing": "host: perf_counter_ns around each eager call, queue drained every sync_every calls "
                  "(outside the timed region); "
                  "kernel: CUDA events around one call, median of 50",
    }
    print(json.dumps(meta), flush=True)
    rows = []
    gen = torch.Generator(device=dev).manual_seed(0)
    for B in [int(x) for x in args.batches.split(",")]:
        for N in [int(x) for x in args.contexts.split(",")]:
            q = torch.randn(B, hq, 1, d, device=dev, dtype=torch.bfloat16, generator=gen)
            rk = torch.randn(B, hkv, R, d, device=dev, dtype=torch.bfloat16, generator=gen)
            rv = torch.randn(B, hkv, R, d, device=dev, dtype=torch.bfloat16, generator=gen)
            for name in args.layouts.split(","):
                s = _store(torch, name, B, hkv, N, d, dev, 1)
                for mode in args.modes.split(","):
                    t0 = time.time()
                    call = _make_call(torch, s, q, rk, rv, N, mode, 1 / math.sqrt(d))
                    h = _host_us(torch, call, args.calls, args.sync_every)
                    fast0 = fast_launch.STATS["fast"]
                    call()
                    row = {"layout": name, "key_mode": LAYOUTS[name][2], "length": mode, "batch": B, "context": N,
                           "host_us_mean": h["mean"], "host_us_median": h["median"], "host_us_p90": h["p90"],
                           "fast_launches_a_call": fast_launch.STATS["fast"] - fast0,
                           "kernel_ms": _kernel_ms(torch, call), "target_us": TARGET_US,
                           "meets_target": h["mean"] <= TARGET_US}
                    if args.sync_each:
                        row["host_us_mean_sync_each"] = _host_us(torch, call, args.calls, 1)["mean"]
                    if args.breakdown:
                        row["host_us_breakdown"] = _breakdown(torch, call, q, args.calls, args.sync_every)
                    if args.profile and not rows:
                        _profile(torch, call, args.calls, args.sync_every, args.profile, row)
                    if not args.no_ablation:
                        fast_launch.ENABLED = False
                        row["host_us_mean_no_fast_launch"] = _host_us(torch, call, args.calls, args.sync_every)["mean"]
                        da.PLAN_CACHE = False
                        row["host_us_mean_no_plan"] = _host_us(torch, call, args.calls, args.sync_every)["mean"]
                        da.PLAN_CACHE, fast_launch.ENABLED = True, True
                    row["setup_s"] = time.time() - t0
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                    _write(args.out, meta, rows)  # after every row: a timeout keeps what was measured
                s = None
                torch.cuda.empty_cache()
    print("\n| batch | context | layout | length | host us (mean) | p90 | sync each call | no fast launch | no plan "
          "| kernel ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['context']} | {r['layout']} | {r['length']} | {r['host_us_mean']:.1f} | "
              f"{r['host_us_p90']:.1f} | {r.get('host_us_mean_sync_each', float('nan')):.1f} | "
              f"{r.get('host_us_mean_no_fast_launch', float('nan')):.1f} | "
              f"{r.get('host_us_mean_no_plan', float('nan')):.1f} | {r['kernel_ms']:.4f} |")
    if args.breakdown:
        print("\n| batch | context | layout | length | host us | wrapper alone | launches alone (n) | torch.empty |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            b = r["host_us_breakdown"]
            print(f"| {r['batch']} | {r['context']} | {r['layout']} | {r['length']} | {r['host_us_mean']:.1f} | "
                  f"{b['wrapper']:.1f} | {b['launches']:.1f} ({b['n_launches']}) | {b['empty_out']:.1f} |")
    met = sum(r["meets_target"] for r in rows)
    print(f"{met}/{len(rows)} cases at <= {TARGET_US} us host time a call")
    print(f"why launches took kernel[grid]: {fast_launch.WHY_SLOW}")
    _write(args.out, meta, rows)


def _breakdown(torch, call, q, n_calls: int, sync_every: int) -> dict:
    """Where one case's host time goes, each part timed like ``_host_us`` (means, us):
    ``wrapper``: the call with every kernel launch a no-op (validation, plan lookup, buffers,
    argument tuples); ``launches``: the launches one call made, replayed alone with their recorded
    arguments (Triton's launcher / ``cuLaunchKernel`` through ctypes); ``empty_out``: one
    ``torch.empty`` of the output's shape (what an int-length call without workspace allocates)."""
    from turboquant.kernels import cuda_decode, fast_launch

    rec = []
    orig_launch, orig_cuda = fast_launch.LaunchCache.launch, cuda_decode.PartialLaunch.__call__

    def rec_launch(self, *a, **k):
        rec.append((orig_launch, self, a, k))
        return orig_launch(self, *a, **k)

    def rec_cuda(self, *a, **k):
        rec.append((orig_cuda, self, a, k))
        return orig_cuda(self, *a, **k)

    fast_launch.LaunchCache.launch, cuda_decode.PartialLaunch.__call__ = rec_launch, rec_cuda
    try:
        call()
        torch.cuda.synchronize()
    finally:
        fast_launch.LaunchCache.launch, cuda_decode.PartialLaunch.__call__ = orig_launch, orig_cuda
    # replay keeps the recorded tensors' addresses alive only while this function runs
    launches = _host_us(torch, lambda: [f(s, *a, **k) for f, s, a, k in rec], n_calls, sync_every)["mean"]
    fast_launch.LaunchCache.launch = lambda self, *a, **k: None
    cuda_decode.PartialLaunch.__call__ = lambda self, *a, **k: None
    try:
        wrapper = _host_us(torch, call, n_calls, sync_every)["mean"]
    finally:
        fast_launch.LaunchCache.launch, cuda_decode.PartialLaunch.__call__ = orig_launch, orig_cuda
    shape = (q.shape[0], 1, q.shape[1], q.shape[3])
    empty = _host_us(torch, lambda: torch.empty(shape, dtype=q.dtype, device=q.device), n_calls, sync_every)["mean"]
    return {"wrapper": wrapper, "launches": launches, "n_launches": len(rec), "empty_out": empty}


def _profile(torch, call, n_calls: int, sync_every: int, path: str, row: dict) -> None:
    """Where the host microseconds of one case go: cProfile over ``n_calls`` eager calls (the
    profiler's own cost inflates every entry; the ranking is the point), top 40 by own time."""
    import cProfile
    import io
    import pstats

    from triton import knobs

    prof = cProfile.Profile()
    torch.cuda.synchronize()
    prof.enable()
    for i in range(n_calls):
        call()
        if (i + 1) % sync_every == 0:
            torch.cuda.synchronize()
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(40)
    hooks = {n: repr(getattr(getattr(knobs.runtime, n, None), "calls", getattr(knobs.runtime, n, None)))
             for n in ("launch_enter_hook", "launch_exit_hook")}
    with open(path, "w") as f:
        f.write(f"case: {json.dumps({k: row[k] for k in ('layout', 'length', 'batch', 'context')})}\n")
        f.write(f"triton launch hooks: {hooks}\n")
        f.write(buf.getvalue())
    print(f"profile of {n_calls} calls -> {path}; launch hooks {hooks}", flush=True)


def _write(path: str | None, meta: dict, rows: list) -> None:
    if path:
        from turboquant.kernels import fast_launch

        meta = {**meta, "fast_launch_why_slow": dict(fast_launch.WHY_SLOW)}  # why calls took kernel[grid]
        with open(path, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    t_start = time.time()
    main()
    print(f"total {time.time() - t_start:.1f} s", file=sys.stderr)
