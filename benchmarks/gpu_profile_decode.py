"""Per-kernel GPU time of decode_attention (torch.profiler), to see where a decode step goes.

Usage: ``python benchmarks/gpu_profile_decode.py [--shapes 1x8192,1x32768,8x32768]``
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="1x8192,1x32768,8x32768")
    ap.add_argument("--bits", type=float, default=3.5)
    ap.add_argument("--config", default="64:4:1:2")
    ap.add_argument("--backend", default="triton", help="decode_attention backend (triton | cuda | auto)")
    ap.add_argument("--no-profiler", action="store_true", help="just run the calls (for ncu)")
    args = ap.parse_args()
    from turboquant.kernels import KernelTables, decode_attention, quantize_pack
    from turboquant.quantizer import TurboQuantMSE

    dev = torch.device("cuda")
    bn, nw, ns, pps = (int(x) for x in args.config.split(":"))
    for shape in args.shapes.split(","):
        B, N = (int(x) for x in shape.split("x"))
        kq, vq = TurboQuantMSE(256, args.bits, seed=1), TurboQuantMSE(256, args.bits, seed=2)
        kt, vt = KernelTables.from_quantizer(kq, dev), KernelTables.from_quantizer(vq, dev)
        kc, kn = quantize_pack(torch.randn(B, 4, N, 256, device=dev), kt)
        vc, vn = quantize_pack(torch.randn(B, 4, N, 256, device=dev), vt)
        q = torch.randn(B, 24, 1, 256, device=dev, dtype=torch.bfloat16)
        rk = torch.randn(B, 4, 128, 256, device=dev, dtype=torch.bfloat16)
        rv = torch.randn(B, 4, 128, 256, device=dev, dtype=torch.bfloat16)

        def f(q=q, kc=kc, kn=kn, vc=vc, vn=vn, N=N, kt=kt, vt=vt, rk=rk, rv=rv):
            if args.backend != "triton":
                return decode_attention(q, kc, kn, vc, vn, N, kt, vt, 1 / math.sqrt(256), rk, rv, backend=args.backend)
            return decode_attention(q, kc, kn, vc, vn, N, kt, vt, 1 / math.sqrt(256), rk, rv,
                                    block_n=bn, num_warps=nw, num_stages=ns, programs_per_sm=pps)

        for _ in range(5):
            f()
        torch.cuda.synchronize()
        if args.no_profiler:
            continue
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                f()
            torch.cuda.synchronize()
        tot = defaultdict(float)
        cnt = defaultdict(int)
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                tot[e.name] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
                cnt[e.name] += 1
        print(f"--- B={B} N={N} bits={args.bits} config={args.config}")
        for name, t in sorted(tot.items(), key=lambda x: -x[1]):
            print(f"  {t / max(cnt[name], 1):9.1f} us  x{cnt[name] // 20}  {name[:80]}")


if __name__ == "__main__":
    main()
