"""Quantize + pack throughput on CPU: TurboQuantMSE (Hadamard vs dense rotation) vs a torch.round int4 floor.

Setting (issue 3 target): d=128, 4 bits, 1M vectors, processed in chunks of 65536; float32 input.
Each method ends with real packed uint8 codes. Reported as vectors/s and as ratios to the int4 floor
measured in the same run. Usage: ``python benchmarks/quantize_throughput.py [--n 1000000] [--out results/...]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from turboquant import TurboQuantMSE, pack_bits


def int4_round_floor(x: torch.Tensor) -> torch.Tensor:
    """Plain per-vector absmax int4: ``round(x / s) + 8`` clamped to 0..15, packed; no rotation."""
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 7
    codes = (torch.round(x / scale) + 8).clamp(0, 15).to(torch.uint8)
    return pack_bits(codes, 4)


def time_it(fn, chunks: list[torch.Tensor], repeats: int) -> float:
    fn(chunks[0])  # warmup
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for c in chunks:
            fn(c)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=65536)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default="results/quantize_throughput.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    chunks = [torch.randn(min(args.chunk, args.n - i), args.d, generator=gen) for i in range(0, args.n, args.chunk)]
    methods = {
        "int4_round_floor": int4_round_floor,
        "turboquant_mse_hadamard": TurboQuantMSE(args.d, args.bits, rotation="hadamard").encode,
        "turboquant_mse_dense": TurboQuantMSE(args.d, args.bits, rotation="dense").encode,
    }
    seconds = {name: time_it(fn, chunks, args.repeats) for name, fn in methods.items()}
    floor = seconds["int4_round_floor"]
    result = {
        "benchmark": "quantize+pack throughput (CPU)",
        "date": time.strftime("%Y-%m-%d"),
        "device": f"cpu {platform.processor() or platform.machine()}, {args.threads} threads",
        "torch": torch.__version__,
        "setting": {"n": args.n, "d": args.d, "bits": args.bits, "chunk": args.chunk, "repeats": args.repeats, "seed": 0},
        "seconds": seconds,
        "vectors_per_second": {k: args.n / v for k, v in seconds.items()},
        "time_ratio_vs_int4_floor": {k: v / floor for k, v in seconds.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
