"""Benchmark: decode attention per code layout (issue 12 §3, issue 15) + host overhead (issue 14 §2).

Shape of one Qwen3.6-27B full-attention layer (24 query heads, 4 KV heads, head_dim 256, one new
token, a 128-token bf16 residual window). For every (batch, context) one bf16 SDPA baseline and,
for every layout spec, :func:`turboquant.kernels.decode_attention` over codes packed by the
kernels' ``quantize_pack`` (outlier layouts: per-head outlier channels selected from the keys /
values themselves, as the cache does at its first update):

* ``halves-3.5``, ``halves-2.5``: one Hadamard group, the halves kernel (Triton, or the CUDA
  kernel where ``backend="auto"`` picks it);
* ``paper-3.5``, ``paper-2.5``: d/4 outlier channels at b+1 bits + the rest at b (paper §4.3),
  ``outliers-32-4-3``: 32 outliers at 4 bits + the rest at 3 (four word pieces a row): the
  word-decoder kernel for grouped layouts (:mod:`turboquant.kernels.segmented`);
* ``K4/V3``: keys ``int-4``, values ``int-3``; ``prod-3.5``: TurboQuant-prod keys (MSE 2.5 + QJL)
  with ``halves-3.5`` values (Triton only).

Columns: graph ms (CUDA graph over rotating buffer sets > L2), eager ms (``do_bench`` median, L2
flushed, host work included) of a plain ``decode_attention`` call and of a bound
``DecodeAttentionCall`` (the static cache's eager path: it replays its own graph), bytes that must be read, effective TB/s, the error against fp32 SDPA
over the dequantized cache, the SDPA bf16 baseline of the same run, and ``ratio_vs_halves``: graph
ms over that of the halves layout nearest in measured bits a coordinate (K and V averaged) at the
same batch and context (issue 12's target: <= 1.15 for the outlier layouts). ``--host-overhead`` adds
rows timing the host side of one eager call (enqueue time of 200 back-to-back calls, no sync, so
GPU time does not count), with an int length and with a device length + ``DecodeWorkspace``.

Usage (one H200, about 4-5 minutes):
``python benchmarks/gpu_decode_attention_layouts.py --host-overhead --out $OUT/gpu_decode_attention_layouts.json``;
the outlier layouts against halves only (about 2 minutes, most of it kernel compilation):
``python benchmarks/gpu_decode_attention_layouts.py --contexts 32768,131072
--layouts halves-3.5,halves-2.5,paper-3.5,paper-2.5 --out $OUT/gpu_decode_attention_layouts.json``
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import sys
import time

import torch
import torch.nn.functional as F

LAYOUTS = {  # name -> (key spec, value spec, key mode)
    "halves-3.5": ("halves-3.5", "halves-3.5", "mse"),
    "halves-2.5": ("halves-2.5", "halves-2.5", "mse"),
    "paper-3.5": ("paper-3.5", "paper-3.5", "mse"),
    "paper-2.5": ("paper-2.5", "paper-2.5", "mse"),
    "outliers-32-4-3": ("outliers-32-4-3", "outliers-32-4-3", "mse"),
    "K4/V3": ("int-4", "int-3", "mse"),
    "prod-3.5": ("halves-3.5", "halves-3.5", "prod"),
}
ENCODE_CHUNK = (
    16384  # tokens a quantize_pack call (bounded float32 temporaries for outlier layouts)
)


def _encode(tables, x: torch.Tensor, outliers):
    """Codes + norms of ``x`` [B, H, N, d] by the kernels, ``ENCODE_CHUNK`` tokens at a time."""
    from turboquant.kernels import CodeSpaceTables, quantize_pack

    B, H, N, _ = x.shape
    grouped = isinstance(tables, CodeSpaceTables) and tables.grouped
    codes = torch.empty(B, H, N, tables.code_nbytes, dtype=torch.uint8, device=x.device)
    norms = torch.empty(
        B, H, N, *((tables.num_norms,) if grouped else ()), dtype=torch.float16, device=x.device
    )
    for s in range(0, N, ENCODE_CHUNK):
        quantize_pack(
            x[:, :, s : s + ENCODE_CHUNK],
            tables,
            out_codes=codes[:, :, s : s + ENCODE_CHUNK],
            out_norms=norms[:, :, s : s + ENCODE_CHUNK],
            outliers=outliers,
        )
    return codes, norms


def _layout_set(name, x_k, x_v, dev, d):
    """Everything one decode_attention call of layout ``name`` needs, for keys/values ``x_k``/``x_v``."""
    from turboquant.kernels import KernelTables
    from turboquant.kernels.codespace import CodeSpaceTables
    from turboquant.layout import build_layout, select_outliers
    from turboquant.quantizer import TurboQuantProd

    kspec, vspec, mode = LAYOUTS[name]
    kl, vl = build_layout(kspec, d, seed=11), build_layout(vspec, d, seed=12)
    kt, vt = KernelTables.from_layout(kl, dev), KernelTables.from_layout(vl, dev)
    ko = select_outliers(x_k, kl.n_out) if kl.is_grouped else None
    vo = select_outliers(x_v, vl.n_out) if vl.is_grouped else None
    kj = None
    if mode == "prod":
        from gpu_decode_attention import (
            _encode_prod,  # the prod-key encoder of the halves benchmark
        )

        kq = TurboQuantProd(d, float(kspec.split("-")[1]), seed=11)
        kt = KernelTables.from_quantizer(kq.mse, dev)
        kc, kn, kj = _encode_prod(kq, x_k, dev)
    else:
        kc, kn = _encode(kt, x_k, ko)
    vc, vn = _encode(vt, x_v, vo)

    def per_token(t, codes):
        return codes.shape[-1] + 2 * (
            t.num_norms if isinstance(t, CodeSpaceTables) and t.grouped else 1
        )

    kbytes = per_token(kt, kc) + (d // 8 + 2 if kj is not None else 0)
    return {
        "kc": kc,
        "kn": kn,
        "vc": vc,
        "vn": vn,
        "kt": kt,
        "vt": vt,
        "ko": ko,
        "vo": vo,
        "kj": kj,
        "bytes_per_token_head": kbytes + per_token(vt, vc),
        "kl": kl,
        "vl": vl,
    }


def _call(s, q, N, scaling, rk, rv, **kw):
    from turboquant.kernels import decode_attention

    return lambda: decode_attention(
        q,
        s["kc"],
        s["kn"],
        s["vc"],
        s["vn"],
        N,
        s["kt"],
        s["vt"],
        scaling,
        rk,
        rv,
        k_qjl=s["kj"],
        k_outliers=s["ko"],
        v_outliers=s["vo"],
        **kw,
    )


def _bound_call(s, q, N, scaling, rk, rv):
    """``call(q)`` of a :class:`~turboquant.kernels.DecodeAttentionCall` bound to set ``s`` (the
    static cache's eager path: planned at the first call, its own CUDA graph replayed from the
    third), called twice here so the timed calls are replays."""
    from turboquant.kernels import DecodeAttentionCall

    call = DecodeAttentionCall(s["kc"], s["kn"], s["vc"], s["vn"], N, s["kt"], s["vt"], scaling, rk, rv,
                               k_qjl=s["kj"], k_outliers=s["ko"], v_outliers=s["vo"])
    call(q)
    call(q)
    return lambda: call(q)


def _kernel_ran(s) -> str:
    """Which decode kernel the last call of set ``s`` ran: ``halves`` / ``halves+cuda`` (the halves
    kernels, the CUDA one for the compressed splits), ``segmented`` / ``segmented+cuda`` (outlier
    layouts: the word decoder in Triton, or the CUDA kernel) or ``byte-columns``."""
    from turboquant.kernels import KernelTables
    from turboquant.kernels.codespace import LAST_KERNEL
    from turboquant.kernels.decode_attention import LAST_LAUNCH

    if isinstance(s["kt"], KernelTables) and isinstance(s["vt"], KernelTables):
        return "halves+cuda" if LAST_LAUNCH.get("cuda") else "halves"
    return LAST_KERNEL.get("decode", "?")


def _sdpa_calls(q, kv, scaling):
    """``i -> call`` of bf16 SDPA over buffer set ``i`` (the baseline)."""
    return lambda i: (
        lambda: F.scaled_dot_product_attention(
            q[i], kv[i][0], kv[i][1], scale=scaling, enable_gqa=True
        )
    )


def _tq_calls(sets, q, N, scaling, rk, rv):
    """``i -> call`` of decode_attention over packed set ``i`` (queries cycled)."""
    return lambda i: _call(sets[i], q[i % len(q)], N, scaling, rk, rv)


def _error(out, s, q, N, scaling, rk, rv) -> tuple[float, float]:
    """(max abs, relative Frobenius) error against fp32 SDPA over the dequantized cache."""
    from turboquant.kernels import KeyQJL, dequantize

    k = dequantize(s["kc"], s["kn"], N, s["kt"], torch.float32, outliers=s["ko"])
    if isinstance(s["kj"], KeyQJL):
        k = k + s["kj"].dequantize(N)
    v = dequantize(s["vc"], s["vn"], N, s["vt"], torch.float32, outliers=s["vo"])
    k, v = torch.cat([k, rk.float()], 2), torch.cat([v, rv.float()], 2)
    ref = F.scaled_dot_product_attention(q.float(), k, v, scale=scaling, enable_gqa=True).transpose(
        1, 2
    )
    diff = out.float() - ref
    return float(diff.abs().max()), float(diff.norm() / ref.norm())


def _host_us(fn, n: int = 200) -> float:
    """Host microseconds a call: enqueue ``n`` calls back to back (no sync; fewer launches than the
    launch queue holds, so the GPU never blocks the host), then wait."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--contexts", default="8192,32768,131072")
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--hq", type=int, default=24)
    ap.add_argument("--hkv", type=int, default=4)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--residual", type=int, default=128)
    ap.add_argument("--l2-bytes", type=float, default=200e6, help="graph working set to exceed L2")
    ap.add_argument(
        "--host-overhead", action="store_true", help="also time the host side of one eager call"
    )
    ap.add_argument("--segmented-cuda-min", type=int, default=None,
                    help="packed token-heads from which backend='auto' runs outlier layouts in the CUDA "
                         "kernel (default: segmented.AUTO_CUDA_MIN_TOKEN_HEADS)")
    args = ap.parse_args()
    from turboquant.kernels import segmented

    if args.segmented_cuda_min is not None:
        segmented.AUTO_CUDA_MIN_TOKEN_HEADS = args.segmented_cuda_min

    import triton
    import triton.testing

    from turboquant.kernels import DecodeWorkspace
    from turboquant.kernels.timing import graph_time_ms

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    hq, hkv, d, R = args.hq, args.hkv, args.d, args.residual
    scaling = 1.0 / math.sqrt(d)
    layouts = args.layouts.split(",")
    meta = {
        "device": props.name,
        "sms": props.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "shape": {"hq": hq, "hkv": hkv, "d": d, "residual": R},
        "seed": 0,
        "layouts": {
            n: {"key": LAYOUTS[n][0], "value": LAYOUTS[n][1], "key_mode": LAYOUTS[n][2]}
            for n in layouts
        },
        "timing": "median; graph = CUDA graph over rotating buffer sets (> L2), eager = do_bench (L2 flushed) of a "
                  "plain decode_attention call, bound eager = do_bench of a DecodeAttentionCall replaying its graph",
        "segmented_cuda_min_token_heads": segmented.AUTO_CUDA_MIN_TOKEN_HEADS,
    }
    print(json.dumps(meta), flush=True)
    rows, host_rows = [], []
    gen = torch.Generator(device=dev).manual_seed(0)
    for B in [int(x) for x in args.batches.split(",")]:
        for N in [int(x) for x in args.contexts.split(",")]:
            kv_bytes = B * hkv * (N + R) * d * 2 * 2
            n_sets = max(1, min(32, math.ceil(args.l2_bytes / kv_bytes)))
            q = [
                torch.randn(B, hq, 1, d, device=dev, dtype=torch.bfloat16, generator=gen)
                for _ in range(n_sets)
            ]
            kv = [
                (
                    torch.randn(B, hkv, N + R, d, device=dev, dtype=torch.bfloat16, generator=gen),
                    torch.randn(B, hkv, N + R, d, device=dev, dtype=torch.bfloat16, generator=gen),
                )
                for _ in range(n_sets)
            ]
            t_sdpa_g = graph_time_ms(_sdpa_calls(q, kv, scaling), n_sets)
            t_sdpa_e = triton.testing.do_bench(
                _sdpa_calls(q, kv, scaling)(0), warmup=25, rep=100, return_mode="median"
            )
            k0, v0 = kv[0]
            kv.clear()
            torch.cuda.empty_cache()
            rk, rv = k0[:, :, N:].contiguous(), v0[:, :, N:].contiguous()
            for name in layouts:
                t0 = time.time()
                first = _layout_set(name, k0[:, :, :N], v0[:, :, :N], dev, d)
                packed = B * hkv * N * first["bytes_per_token_head"]
                n_tq = max(1, min(32, math.ceil(args.l2_bytes / packed)))
                sets = [first] + [
                    _layout_set(
                        name, torch.randn_like(k0[:, :, :N]), torch.randn_like(v0[:, :, :N]), dev, d
                    )
                    for _ in range(n_tq - 1)
                ]
                out = _call(first, q[0], N, scaling, rk, rv)()
                kernel = _kernel_ran(first)
                err = (
                    _error(out, first, q[0], N, scaling, rk, rv)
                    if B * N <= 262144
                    else (None, None)
                )
                t_g = graph_time_ms(_tq_calls(sets, q, N, scaling, rk, rv), n_tq)
                t_e = triton.testing.do_bench(
                    _call(first, q[0], N, scaling, rk, rv), warmup=25, rep=100, return_mode="median"
                )
                bound = _bound_call(first, q[0], N, scaling, rk, rv)
                bound_err = (bound() - out).abs().max().item()  # the same kernels: equal to the plain call's output
                t_b = triton.testing.do_bench(bound, warmup=25, rep=100, return_mode="median")
                tq_bytes = packed + 2 * B * hkv * R * d * 2
                row = {
                    "layout": name,
                    "key_layout": first["kl"].name,
                    "value_layout": first["vl"].name,
                    "key_mode": LAYOUTS[name][2],
                    "kernel": kernel,
                    "batch": B,
                    "context": N,
                    "bits_per_coord_k": first["kl"].bits_per_coordinate,
                    "bits_per_coord_v": first["vl"].bits_per_coordinate,
                    "sdpa_graph_ms": t_sdpa_g,
                    "sdpa_eager_ms": t_sdpa_e,
                    "tq_graph_ms": t_g,
                    "tq_eager_ms": t_e,
                    "speedup_graph": t_sdpa_g / t_g,
                    "speedup_eager": t_sdpa_e / t_e,
                    "tq_bound_eager_ms": t_b,
                    "speedup_bound_eager": t_sdpa_e / t_b,
                    "bound_vs_plain_max_abs_diff": bound_err,
                    "sdpa_bytes": kv_bytes,
                    "tq_bytes": tq_bytes,
                    "sdpa_TBps_graph": kv_bytes / t_sdpa_g / 1e9,
                    "tq_TBps_graph": tq_bytes / t_g / 1e9,
                    "max_abs_err_vs_dequant": err[0],
                    "rel_err_vs_dequant": err[1],
                    "setup_s": time.time() - t0,
                }
                print(json.dumps(row), flush=True)
                rows.append(row)
                if (
                    args.host_overhead
                    and B == 1
                    and N == min(int(x) for x in args.contexts.split(","))
                ):
                    ws = DecodeWorkspace()
                    ln = torch.tensor([N], dtype=torch.int32, device=dev)
                    kw = {"max_length": N, "workspace": ws}
                    h = {
                        "layout": name,
                        "batch": B,
                        "context": N,
                        "host_us_int_length": _host_us(_call(first, q[0], N, scaling, rk, rv)),
                        "host_us_device_length_workspace": _host_us(
                            _call(first, q[0], ln, scaling, rk, rv, **kw)
                        ),
                        "target_us": 30.0,
                    }
                    print(json.dumps(h), flush=True)
                    host_rows.append(h)
                sets.clear()
                first = None
                torch.cuda.empty_cache()
            q.clear()
            torch.cuda.empty_cache()
    add_ratio_vs_halves(rows)
    _report(args, meta, rows, host_rows)


def add_ratio_vs_halves(rows: list[dict]) -> None:
    """Set ``halves_ref`` and ``ratio_vs_halves`` = tq_graph_ms / that of the halves row nearest in
    mean measured bits (K, V) at the same (batch, context); None where no halves row was timed."""
    def bits(r):
        return (r["bits_per_coord_k"] + r["bits_per_coord_v"]) / 2

    for r in rows:
        halves = [h for h in rows if h["layout"].startswith("halves-") and h["key_mode"] == "mse"
                  and (h["batch"], h["context"]) == (r["batch"], r["context"])]
        ref = min(halves, key=lambda h: abs(bits(h) - bits(r)), default=None)
        r["halves_ref"] = None if ref is None else ref["layout"]
        r["ratio_vs_halves"] = None if ref is None else r["tq_graph_ms"] / ref["tq_graph_ms"]


def _report(args, meta, rows, host_rows) -> None:
    print(
        "\n| batch | context | layout | kernel | SDPA ms (graph) | TQ ms (graph) | speedup | vs halves | TQ TB/s "
        "| TQ ms (eager) | eager speedup (plain / bound call) | rel err |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rel = f"{r['rel_err_vs_dequant']:.1e}" if r["rel_err_vs_dequant"] is not None else "-"
        vs = f"{r['ratio_vs_halves']:.2f}x ({r['halves_ref']})" if r["ratio_vs_halves"] is not None else "-"
        print(
            f"| {r['batch']} | {r['context']} | {r['layout']} | {r.get('kernel', '?')} | {r['sdpa_graph_ms']:.4f} | {r['tq_graph_ms']:.4f} | "
            f"{r['speedup_graph']:.2f}x | {vs} | {r['tq_TBps_graph']:.2f} | {r['tq_eager_ms']:.4f} | "
            f"{r['speedup_eager']:.2f}x / {r['speedup_bound_eager']:.2f}x | {rel} |"
        )
    for h in host_rows:
        print(
            f"host {h['layout']}: {h['host_us_int_length']:.1f} us (int length), "
            f"{h['host_us_device_length_workspace']:.1f} us (device length + workspace); target <= 30 us"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows, "host_overhead": host_rows}, f, indent=1)


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"total {time.time() - t0:.1f} s", file=sys.stderr)
