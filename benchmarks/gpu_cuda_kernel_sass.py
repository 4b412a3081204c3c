"""Dump the SASS of the CUDA decode kernel (turboquant.kernels.cuda_decode) and an opcode histogram
of its main loop, to see where the instructions go (needs a CUDA machine with cuobjdump).

Usage: ``python benchmarks/gpu_cuda_kernel_sass.py --bits 3.5 --out-dir DIR``
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=float, default=3.5)
    ap.add_argument("--few", action="store_true", help="the few-KV-heads variant (16-warp CTAs, one an SM)")
    ap.add_argument("--out-dir", default=".")
    args = ap.parse_args()
    from torch.cuda._utils import _nvrtc_compile

    from turboquant.kernels import KernelTables, cuda_decode
    from turboquant.quantizer import TurboQuantMSE

    t = KernelTables.from_quantizer(TurboQuantMSE(256, args.bits, seed=1), "cuda")
    cfg = cuda_decode.DEFAULT_CONFIG
    shape = cfg.launch_shape(args.few)
    src = cuda_decode.kernel_source(6, t, t, 2, cfg.stages, shape["min_blocks"], cfg.chains, cfg.qf_smem,
                                    shape["warps"])
    cubin, _ = _nvrtc_compile(src, "tq_decode_partial", None, None, ["-std=c++17"])
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tq_decode.cubin").write_bytes(cubin)
    sass = subprocess.run(["cuobjdump", "-sass", str(out / "tq_decode.cubin")], capture_output=True, text=True,
                          check=False).stdout
    (out / f"tq_decode_{args.bits}.sass").write_text(sass)
    ops = [m.group(1) for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)]
    hist = collections.Counter(o.split(".")[0] for o in ops)
    print(f"total SASS instructions {len(ops)}")
    for op, n in hist.most_common(40):
        print(f"{op:12s} {n}")
    lo, hi, body = main_loop(sass)
    loop = collections.Counter(o.split(".")[0] for o in body)
    print(f"main loop [{lo:#x}, {hi:#x}]: {len(body)} instructions (static; the last tile's bounded copy included)")
    print("  " + ", ".join(f"{op}:{n}" for op, n in loop.most_common(30)))


def main_loop(sass: str) -> tuple[int, int, list[str]]:
    """The widest backward branch's span (the tile loop) and the opcodes inside it."""
    ins = []
    for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", sass):
        ins.append((int(m.group(1), 16), m.group(2), m.group(3)))
    spans = []
    for addr, op, rest in ins:
        t = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if t and int(t.group(1), 16) < addr:
            spans.append((addr - int(t.group(1), 16), int(t.group(1), 16), addr))
    if not spans:
        return 0, 0, []
    _, lo, hi = max(spans)
    return lo, hi, [op for addr, op, _ in ins if lo <= addr <= hi]


if __name__ == "__main__":
    main()
