"""Benchmark: decode attention over packed TurboQuant codes vs torch SDPA on bf16 K/V.

Shape of one Qwen3.6-27B full-attention layer: 24 query heads, 4 KV heads, head_dim 256, one new
token. For each (batch, context, bits): median latency of

* ``sdpa_bf16``: ``F.scaled_dot_product_attention(q, K, V, enable_gqa=True)`` on bf16 K/V (the
  backend torch picks), and
* ``tq``: :func:`turboquant.kernels.decode_attention` over codes packed by ``quantize_pack``
  (plus a 128-token bf16 residual window unless ``--residual 0``); ``--key-modes mse,prod`` also
  times TurboQuant-prod keys (MSE at b-1 bits + 1-bit QJL, encoded by the torch quantizer; Triton
  only: the CUDA backend has no QJL path and is skipped for them) in the same run,

timed two ways in the same run: ``graph`` (a CUDA graph replaying the call over enough distinct
buffer sets that the working set exceeds L2; launch gaps removed) and ``eager``
(``triton.testing.do_bench`` median, L2 flushed between calls; includes Python/launch overhead).
Effective bandwidth = bytes that must be read (K/V codes + norms, or bf16 K/V) / latency.

Usage: ``python benchmarks/gpu_decode_attention.py --out results/gpu_decode_attention.json``
(prod keys: ``--key-modes mse,prod --backends triton``)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--contexts", default="1024,2048,4096,8192,16384,32768,65536,131072")
    ap.add_argument("--bits", default="3.5,2.5")
    ap.add_argument("--hq", type=int, default=24)
    ap.add_argument("--hkv", type=int, default=4)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--residual", type=int, default=128)
    ap.add_argument("--l2-bytes", type=float, default=200e6, help="graph working set to exceed L2")
    ap.add_argument("--no-eager", action="store_true")
    ap.add_argument("--backends", default="triton,cuda", help="decode_attention backends to time, comma separated")
    ap.add_argument("--key-modes", default="mse",
                    help="key modes to time, comma separated: mse, prod (MSE at bits-1 + QJL; Triton backend only)")
    ap.add_argument("--configs", default="auto",
                    help="kernel configs, comma separated ('auto' = defaults): Triton block_n:num_warps:num_stages:"
                         "programs_per_sm; CUDA programs_per_sm:stages:min_blocks:chains:qf_smem:warps "
                         "(cuda_decode.CudaConfig.parse, 0 = by load)")
    args = ap.parse_args()

    import triton
    import triton.testing

    from turboquant.kernels import KernelTables, quantize_pack
    from turboquant.kernels.timing import graph_time_ms
    from turboquant.quantizer import TurboQuantMSE, TurboQuantProd

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    hq, hkv, d, R = args.hq, args.hkv, args.d, args.residual
    scaling = 1.0 / math.sqrt(d)
    rows = []
    meta = {
        "device": props.name,
        "sms": props.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "shape": {"hq": hq, "hkv": hkv, "d": d, "residual": R},
        "timing": "median; graph = CUDA graph over rotating buffer sets (> L2), eager = do_bench (L2 flushed)",
    }
    print(json.dumps(meta), flush=True)
    gen = torch.Generator(device=dev).manual_seed(0)
    for B in [int(x) for x in args.batches.split(",")]:
        for N in [int(x) for x in args.contexts.split(",")]:
            kv_bytes = B * hkv * N * d * 2 * 2  # bf16 K + V
            n_sets = max(1, min(32, math.ceil(args.l2_bytes / kv_bytes)))
            # --- SDPA baseline on bf16 K/V (context N + R tokens, same total as ours) ---
            q = [torch.randn(B, hq, 1, d, device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(n_sets)]
            kv = [
                (torch.randn(B, hkv, N + R, d, device=dev, dtype=torch.bfloat16, generator=gen),
                 torch.randn(B, hkv, N + R, d, device=dev, dtype=torch.bfloat16, generator=gen))
                for _ in range(n_sets)
            ]

            def sdpa_call(i, q=q, kv=kv):
                return lambda: F.scaled_dot_product_attention(q[i], kv[i][0], kv[i][1], scale=scaling, enable_gqa=True)

            t_sdpa_g = graph_time_ms(sdpa_call, n_sets)
            t_sdpa_e = None if args.no_eager else triton.testing.do_bench(sdpa_call(0), warmup=25, rep=100, return_mode="median")
            # keep one bf16 set to build the packed stores from the same keys/values
            k0, v0 = kv[0][0], kv[0][1]
            kv.clear()  # frees the bf16 sets (sdpa_call's default still names the list)
            torch.cuda.empty_cache()
            for bits, key_mode in [(float(x), m) for x in args.bits.split(",") for m in args.key_modes.split(",")]:
                kq = TurboQuantProd(d, bits, seed=11) if key_mode == "prod" else TurboQuantMSE(d, bits, seed=11)
                vq = TurboQuantMSE(d, bits, seed=12)
                kt = KernelTables.from_quantizer(kq.mse if key_mode == "prod" else kq, dev)
                vt = KernelTables.from_quantizer(vq, dev)
                k_bytes = kt.code_nbytes + 2 + (d // 8 + 2 if key_mode == "prod" else 0)  # + QJL plane + ||r||
                packed_bytes = B * hkv * N * (k_bytes + vt.code_nbytes + 2)
                n_sets_tq = max(1, min(32, math.ceil(args.l2_bytes / packed_bytes)))
                stores = []
                for i in range(n_sets_tq):
                    kx = k0[:, :, :N] if i == 0 else torch.randn_like(k0[:, :, :N])
                    kc, kn, kj = _encode_prod(kq, kx, dev) if key_mode == "prod" else (*quantize_pack(kx, kt), None)
                    vc, vn = quantize_pack(v0[:, :, :N] if i == 0 else torch.randn_like(v0[:, :, :N]), vt)
                    rk = k0[:, :, N:].contiguous() if R else None
                    rv = v0[:, :, N:].contiguous() if R else None
                    stores.append((q[i % n_sets], kc, kn, vc, vn, rk, rv, kj))

                for cfg, backend in [(c, be) for be in args.backends.split(",") for c in args.configs.split(",")]:
                    if key_mode == "prod" and backend == "cuda":
                        print(json.dumps({"skip": "prod keys have no CUDA-kernel path", "bits": bits}), flush=True)
                        continue
                    if cfg == "auto":
                        kw = {"backend": backend}
                    elif backend == "cuda":  # programs_per_sm:stages:min_blocks:chains:qf_smem:warps
                        from turboquant.kernels.cuda_decode import CudaConfig

                        kw = {"backend": backend, "cuda_config": CudaConfig.parse(cfg)}
                    else:
                        bn, nw, ns, pps = (int(x) for x in cfg.split(":"))
                        kw = {"block_n": bn, "num_warps": nw, "num_stages": ns, "programs_per_sm": pps, "backend": backend}
                    row = _bench_tq(args, meta, B, N, R, bits, cfg, kw, stores, q, kq, vq, kt, vt, k0, v0,
                                    scaling, n_sets_tq, kv_bytes, packed_bytes, t_sdpa_g, t_sdpa_e, hkv, d)
                    rows.append({"key_mode": key_mode, **row})
                del stores
                torch.cuda.empty_cache()
            del q
            torch.cuda.empty_cache()
    try:
        from turboquant.kernels import cuda_decode

        meta["cuda_kernels"] = cuda_decode.kernel_info()
        print(json.dumps(meta["cuda_kernels"]), flush=True)
    except Exception as exc:  # noqa: BLE001 - informational only
        meta["cuda_kernels"] = repr(exc)
    _report(args, meta, rows)


def _bench_tq(args, meta, B, N, R, bits, cfg, kw, stores, q, kq, vq, kt, vt, k0, v0, scaling, n_sets_tq,
              kv_bytes, packed_bytes, t_sdpa_g, t_sdpa_e, hkv, d):
    import triton.testing

    from turboquant.kernels import decode_attention

    def tq_call(i):
        qq, kc, kn, vc, vn, rk, rv, kj = stores[i]
        return lambda: decode_attention(qq, kc, kn, vc, vn, N, kt, vt, scaling, rk, rv, k_qjl=kj, **kw)


    # correctness spot check against SDPA on the dequantized cache
    out = tq_call(0)()
    rel = float("nan")
    if B * N <= 65536:
        rel = _spot_check(out, q[0], kq, vq, stores[0], k0, v0, N, scaling)
    tag = cfg + ("-prodkeys" if stores[0][7] is not None else "")
    if "regs_" + tag not in meta:
        from turboquant.kernels.decode_attention import LAST_LAUNCH

        h = LAST_LAUNCH.get("partial")
        meta["regs_" + tag] = {"partial_n_regs": getattr(h, "n_regs", None), "partial_n_spills": getattr(h, "n_spills", None)}
        print(json.dumps({tag: meta["regs_" + tag]}), flush=True)
    from turboquant.kernels.timing import graph_time_ms

    t_tq_g = graph_time_ms(tq_call, n_sets_tq)
    t_tq_e = None if args.no_eager else triton.testing.do_bench(tq_call(0), warmup=25, rep=100, return_mode="median")
    row = {
        "batch": B, "context": N, "bits": bits, "config": cfg, "backend": kw.get("backend", "auto"),
        "sdpa_graph_ms": t_sdpa_g, "tq_graph_ms": t_tq_g, "speedup_graph": t_sdpa_g / t_tq_g,
        "sdpa_eager_ms": t_sdpa_e, "tq_eager_ms": t_tq_e,
        "speedup_eager": (t_sdpa_e / t_tq_e) if t_tq_e else None,
        "sdpa_bytes": kv_bytes, "tq_bytes": packed_bytes + (2 * B * hkv * R * d * 2),
        "sdpa_TBps_graph": kv_bytes / t_sdpa_g / 1e9,
        "tq_TBps_graph": (packed_bytes + 2 * B * hkv * R * d * 2) / t_tq_g / 1e9,
        "rel_err_vs_dequant_sdpa": rel,
    }
    print(json.dumps(row), flush=True)
    return row


def _report(args, meta, rows) -> None:
    print("\n| batch | context | bits | keys | backend | config | SDPA bf16 ms (graph) | TQ ms (graph) | speedup | TQ TB/s | SDPA ms (eager) | TQ ms (eager) | speedup eager | rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        e1 = f"{r['sdpa_eager_ms']:.4f}" if r["sdpa_eager_ms"] else "-"
        e2 = f"{r['tq_eager_ms']:.4f}" if r["tq_eager_ms"] else "-"
        e3 = f"{r['speedup_eager']:.2f}x" if r["speedup_eager"] else "-"
        print(f"| {r['batch']} | {r['context']} | {r['bits']} | {r['key_mode']} | {r['backend']} | {r['config']} | {r['sdpa_graph_ms']:.4f} | {r['tq_graph_ms']:.4f} | "
              f"{r['speedup_graph']:.2f}x | {r['tq_TBps_graph']:.2f} | {e1} | {e2} | {e3} | {r['rel_err_vs_dequant_sdpa']:.1e} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


def _encode_prod(kq, x: torch.Tensor, dev: torch.device, chunk: int = 16384):
    """TurboQuant-prod keys of ``x`` [B, H, N, d] with the torch quantizer, ``chunk`` tokens at a time
    (bounded transient memory): MSE codes, norms and the :class:`KeyQJL` the kernel reads."""
    from turboquant.kernels.decode_attention import KeyQJL

    parts = [kq.encode(x[:, :, s : s + chunk]) for s in range(0, x.shape[2], chunk)]
    kc = torch.cat([p.mse.codes for p in parts], 2)
    kn = torch.cat([p.mse.norms for p in parts], 2)
    kj = KeyQJL(qjl=torch.cat([p.qjl for p in parts], 2), rnorms=torch.cat([p.rnorms for p in parts], 2),
                S=kq.S.to(dev), scale=kq.qjl_scale)
    return kc, kn, kj


def _spot_check(out, q, kq, vq, store, k0, v0, N, scaling) -> float:
    """Relative error of the kernel vs fp32 SDPA over the dequantized cache (core decode path)."""
    from turboquant.quantizer import PackedMSE, PackedProd

    _, kc, kn, vc, vn, _, _, kj = store
    if kj is None:
        kd = kq.decode(PackedMSE(codes=kc, norms=kn))
    else:
        kd = kq.decode(PackedProd(mse=PackedMSE(codes=kc, norms=kn), qjl=kj.qjl, rnorms=kj.rnorms))
    kdq = torch.cat([kd, k0[:, :, N:].float()], 2)
    vdq = torch.cat([vq.decode(PackedMSE(codes=vc, norms=vn)), v0[:, :, N:].float()], 2)
    ref = F.scaled_dot_product_attention(q.float(), kdq, vdq, scale=scaling, enable_gqa=True).transpose(1, 2)
    return float((out.float() - ref).norm() / ref.norm())


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"total {time.time() - t0:.1f} s", file=sys.stderr)
