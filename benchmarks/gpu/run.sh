#!/usr/bin/env bash
# GPU suite for one call on a GPU machine (no network; torch + triton preinstalled): first what
# the CPU interpreter cannot show (NaN isolation across tokens, the counting sort at GPU sizes,
# launches on the inputs' device), then the kernels' correctness tests on CUDA, then timings.
# Budget: 7.5 minutes, within one 10-minute command: the stage timeouts below sum to 435 s
# (100 + 80 + 70 + 130 + 55; Triton compiles each new specialization on first launch, so the
# first stages are the slowest per test).
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
PYTEST="python -m pytest -q -x -p no:cacheprovider"

{ date -u; git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -20
  nvidia-smi 2>&1; python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$OUT/machine.txt" 2>&1

echo "== what the interpreter cannot show: NaN isolation, the sort at GPU sizes, device guards"
timeout 100 $PYTEST tests/test_kernels_nan_isolation.py tests/test_kernels_launch.py \
    "tests/test_kernels_permute.py::test_sort_sweep" 2>&1 | tee "$OUT/tests.txt" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== correctness tests on CUDA"
# the fused-tile tests, then the other kernel tests (each compiles its specializations)
timeout 80 $PYTEST tests/test_kernels_fused_tile.py 2>&1 | tee -a "$OUT/tests.txt" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
others=$(ls tests/test_kernels_*.py tests/test_function.py 2>/dev/null \
         | grep -v -e fused_tile -e nan_isolation -e kernels_launch)
if [ -n "$others" ]; then
    timeout 70 $PYTEST -k "not sort_sweep" $others 2>&1 | tee -a "$OUT/tests.txt" | tail -15
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

echo "== layer timings (bf16 first; results are rewritten after each case)"
timeout 130 python -m benchmarks.gpu.bench_layer --out "$OUT" --compile-budget-s 45 2>&1 \
    | tee "$OUT/bench_layer.txt" | tail -80
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== fused linear cross-entropy vs one cuBLAS GEMM and the plain loss (102,400 x 12,101 items)"
timeout 55 python -m pytest -q -p no:cacheprovider benchmarks/test_linear_cross_entropy.py -k gpu \
    --benchmark-json "$OUT/linear_cross_entropy.json" 2>&1 | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
python -m benchmarks.report "$OUT/linear_cross_entropy.json" > "$OUT/linear_cross_entropy.md" || status=1
exit $status
