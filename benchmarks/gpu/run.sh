#!/usr/bin/env bash
# GPU suite for one call on a GPU machine (no network; torch + triton preinstalled):
# the kernels' correctness tests on CUDA, then the layer timings (under 6 minutes in all).
# Usage: benchmarks/gpu/run.sh [OUT]   (OUT defaults to $OUT, else benchmarks/results/gpu-<date>)
# Writes under OUT: machine.txt, tests.txt, bench_layer.{json,md,txt} (rewritten after each case),
# linear_cross_entropy.{json,md}.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${1:-${OUT:-benchmarks/results/gpu-$(date +%Y-%m-%d)}}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
status=0

{ date -u; git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -20
  nvidia-smi 2>&1; python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$OUT/machine.txt" 2>&1

echo "== correctness tests on CUDA"
# first the fused-tile tests, then the other kernel tests (each compiles its specializations)
timeout 80 python -m pytest -q -x -p no:cacheprovider tests/test_kernels_fused_tile.py \
    2>&1 | tee "$OUT/tests.txt" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
others=$(ls tests/test_kernels_*.py tests/test_function.py 2>/dev/null | grep -v fused_tile)
if [ -n "$others" ]; then
    timeout 70 python -m pytest -q -x -p no:cacheprovider $others 2>&1 | tee -a "$OUT/tests.txt" | tail -15
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

echo "== layer timings (bf16 first; results are rewritten after each case)"
timeout 150 python -m benchmarks.gpu.bench_layer --out "$OUT" --compile-budget-s 45 2>&1 \
    | tee "$OUT/bench_layer.txt" | tail -80
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== fused linear cross-entropy vs one cuBLAS GEMM and the plain loss (102,400 x 12,101 items)"
timeout 55 python -m pytest -q -p no:cacheprovider benchmarks/test_linear_cross_entropy.py -k gpu \
    --benchmark-json "$OUT/linear_cross_entropy.json" 2>&1 | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
python -m benchmarks.report "$OUT/linear_cross_entropy.json" > "$OUT/linear_cross_entropy.md" || status=1
exit $status
