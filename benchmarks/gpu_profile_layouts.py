"""Per-kernel GPU time of one decode_attention call per code layout (torch.profiler): where the
outlier layouts' extra time over the halves layout goes (issue 12's 1.15x target).

Usage: ``python benchmarks/gpu_profile_layouts.py --shapes 1x32768,8x32768 --layouts halves-3.5,paper-3.5``
(the Qwen3.6 full-attention shape of ``gpu_decode_attention_layouts.py``: 24 / 4 heads, d=256,
a 128-token bf16 residual window).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1x32768,8x32768")
    ap.add_argument("--layouts", default="halves-3.5,paper-3.5")
    ap.add_argument("--calls", type=int, default=20)
    args = ap.parse_args()
    from gpu_decode_attention_layouts import _call, _layout_set
    from torch.profiler import ProfilerActivity, profile

    dev = torch.device("cuda")
    d, hq, hkv, R = 256, 24, 4, 128
    gen = torch.Generator(device=dev).manual_seed(0)
    for shape in args.shapes.split(","):
        B, N = (int(x) for x in shape.split("x"))
        k = torch.randn(B, hkv, N, d, device=dev, dtype=torch.bfloat16, generator=gen)
        v = torch.randn(B, hkv, N, d, device=dev, dtype=torch.bfloat16, generator=gen)
        q = torch.randn(B, hq, 1, d, device=dev, dtype=torch.bfloat16, generator=gen)
        rk = torch.randn(B, hkv, R, d, device=dev, dtype=torch.bfloat16, generator=gen)
        rv = torch.randn(B, hkv, R, d, device=dev, dtype=torch.bfloat16, generator=gen)
        for name in args.layouts.split(","):
            s = _layout_set(name, k, v, dev, d)
            fn = _call(s, q, N, 1 / math.sqrt(d), rk, rv)
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(args.calls):
                    fn()
                torch.cuda.synchronize()
            per = defaultdict(float)
            for e in prof.events():
                if e.device_type == torch.autograd.DeviceType.CUDA:
                    per[e.name[:70]] += e.device_time / args.calls
            tot = sum(per.values())
            print(f"\n{B}x{N} {name}: {tot:.1f} us GPU a call")
            for kname, us in sorted(per.items(), key=lambda kv: -kv[1]):
                print(f"  {us:8.1f} us  {kname}")


if __name__ == "__main__":
    main()
