"""The decode-attention calls to profile with Nsight Compute: one layout, batch and context.

Builds the packed stores of ``--layout`` exactly as ``gpu_decode_attention_layouts.py`` does (the
Qwen3.6-27B full-attention shape: 24 query heads, 4 KV heads, head_dim 256, a 128-token bf16
residual window), runs ``--calls`` eager ``decode_attention`` calls and exits; the partial kernel
is the one to profile (``tq_decode_partial`` for the CUDA halves kernel, ``_seg_partial_kernel``
for the outlier layouts' word decoder, ``_decode_partial_kernel`` for the Triton halves kernel)::

    ncu --kernel-name regex:'tq_decode_partial|_seg_partial_kernel|_decode_partial_kernel' \\
        --launch-skip 2 --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        --section ComputeWorkloadAnalysis --section WarpStateStats --section Occupancy \\
        --section LaunchStats python benchmarks/gpu_ncu_decode.py --layout paper-3.5 --batch 8 --context 32768

(``benchmarks/h200_session.sh ncu`` runs it for the halves and the paper layout.)
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    import torch
    from gpu_decode_attention_layouts import LAYOUTS, _call, _layout_set

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layout", default="halves-3.5", choices=sorted(LAYOUTS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--backend", default="auto", choices=["auto", "triton", "cuda"])
    ap.add_argument("--calls", type=int, default=5)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_ncu_decode.py needs a CUDA GPU")
    dev, d, hq, hkv, R = torch.device("cuda"), 256, 24, 4, 128
    g = torch.Generator(device=dev).manual_seed(0)
    B, N = args.batch, args.context
    xk = torch.randn(B, hkv, N, d, device=dev, generator=g, dtype=torch.bfloat16)
    xv = torch.randn(B, hkv, N, d, device=dev, generator=g, dtype=torch.bfloat16)
    s = _layout_set(args.layout, xk, xv, dev, d)
    del xk, xv
    q = torch.randn(B, hq, 1, d, device=dev, generator=g, dtype=torch.bfloat16)
    rk = torch.randn(B, hkv, R, d, device=dev, generator=g, dtype=torch.bfloat16)
    rv = torch.randn(B, hkv, R, d, device=dev, generator=g, dtype=torch.bfloat16)
    call = _call(s, q, N, 1 / math.sqrt(d), rk, rv, backend=args.backend)
    for _ in range(args.calls):
        call()
    torch.cuda.synchronize()
    print(f"{args.calls} calls of {args.layout} at {B}x{N} ({args.backend}) done")


if __name__ == "__main__":
    main()
