"""Error of the decode kernels against the float32 reference, per backend, on the GPU test cases.

For the cases of ``tests/kernels/test_layout_kernels.py`` (query x 2, a value channel planted at 10x
the others, float32 window): per sequence and backend ("cuda", "triton"), the largest absolute
error and its channel, the relative Frobenius error, and how many elements exceed the tests'
elementwise ``2e-3 + 1e-2·|ref|``. Run on a GPU from the repository root:

    python benchmarks/gpu_error_by_backend.py
"""

from __future__ import annotations

import sys

import torch

sys.path[:0] = ["tests/kernels", "."]
import test_layout_kernels as T

CASES = [  # key layout, value layout, tokens, residual, batch, lengths a sequence
    ("paper-3.5", "paper-2.5", 3001, 64, 2, [1000, 2999]),
    ("paper-3.5", "paper-3.5", 8191, 128, 2, [8191, 8191]),
    ("halves-3.5", "halves-3.5", 8191, 128, 2, [8191, 8191]),
]


def main() -> None:
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(dev), torch.__version__)
    for kl, vl, n, r, b, lens in CASES:
        c = T._case(dev, 256, kl, vl, 24, 4, n, r, b)
        for bi, length in enumerate(lens):
            row = T._row(c, bi)
            ref = T._reference(row, length).float()
            for backend in ("cuda", "triton"):
                out = T._kernel(row, length, backend=backend).float()
                err = (out - ref).abs()
                idx = int(err.flatten().argmax())
                rel = float((out - ref).norm() / ref.norm())
                over = int((err > 2e-3 + 1e-2 * ref.abs()).sum())
                print(f"{kl}/{vl} n={length} b={bi} {backend}: max abs {float(err.max()):.2e} at channel "
                      f"{idx % 256}; relative Frobenius {rel:.2e}; elements over 2e-3 + 1e-2|ref|: {over}")


if __name__ == "__main__":
    main()
