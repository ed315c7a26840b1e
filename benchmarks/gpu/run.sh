#!/usr/bin/env bash
# GPU suite on a CUDA machine (no network; torch + triton installed): first what the CPU
# interpreter cannot show (NaN isolation across tokens, the counting sort at GPU sizes,
# launches on the inputs' device), then the kernels' correctness tests on CUDA, then timings.
# The stage timeouts below sum to 450 s (100 + 80 + 70 + 100 + 55 + 45; Triton compiles each
# new specialization on first launch, so the first stages are the slowest per test). The layer
# timings and the epoch timings rewrite their results after each case, so a stage cut by its
# timeout keeps what it measured. Described in benchmarks/gpu/README.md.
# Usage: benchmarks/gpu/run.sh [OUT]   (OUT defaults to $OUT, else benchmarks/results/gpu-<date>)
# Writes under OUT: machine.txt, tests.txt, bench_layer.{json,md,txt} (rewritten after each case),
# linear_cross_entropy.{json,md}, epoch.{json,md,txt} (rewritten after each variant).
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
timeout 100 $PYTEST tests/kernels/hymoe_op/test_nan_isolation.py tests/kernels/test_kernel_launch.py \
    "tests/kernels/hymoe_op/test_stage2_permutation.py::test_sort_sweep" 2>&1 | tee "$OUT/tests.txt" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== correctness tests on CUDA"
# the fused-tile tests, then the other kernel tests (each compiles its specializations)
timeout 80 $PYTEST tests/kernels/hymoe_op/test_fused_tile.py 2>&1 | tee -a "$OUT/tests.txt" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
others=$(ls tests/kernels/hymoe_op/test_stage*.py tests/kernels/hymoe_op/test_triton_backend.py \
         2>/dev/null)
if [ -n "$others" ]; then
    timeout 70 $PYTEST -k "not sort_sweep" $others 2>&1 | tee -a "$OUT/tests.txt" | tail -15
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

echo "== layer timings (bf16 first; results are rewritten after each case)"
timeout 100 python -m benchmarks.gpu.bench_layer --out "$OUT" --compile-budget-s 40 2>&1 \
    | tee "$OUT/bench_layer.txt" | tail -80
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== fused linear cross-entropy vs one cuBLAS GEMM and the plain loss (102,400 x 12,101 items)"
timeout 55 python -m pytest -q -p no:cacheprovider benchmarks/test_linear_cross_entropy.py -k gpu \
    --benchmark-json "$OUT/linear_cross_entropy.json" 2>&1 | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
python -m benchmarks.report "$OUT/linear_cross_entropy.json" > "$OUT/linear_cross_entropy.md" || status=1

echo "== one training epoch: dense FFN vs HyMoE (Triton fused / grouped, torch backend), bf16 and fp32"
# ../shared/data/beauty.txt when present, else synthetic data of Beauty's shape; 8 epochs of
# a few seconds each on an H200 (a specialization Triton has not compiled in the stages above
# compiles in the untimed warm-up steps); no variant starts after 30 s
timeout 45 python -m benchmarks.gpu.bench_epoch --out "$OUT" --budget-s 30 2>&1 \
    | tee "$OUT/epoch.txt" | tail -12
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
