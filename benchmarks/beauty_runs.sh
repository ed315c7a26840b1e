#!/usr/bin/env bash
# The Beauty benchmark: 3 seeds x {hymoe, dense}, two runs at a time with one thread each.
# Usage: benchmarks/beauty_runs.sh BEAUTY_FILE OUT_DIR [extra train.py flags...]
# Then: python benchmarks/aggregate_beauty.py OUT_DIR/beauty_*/summary.json
set -euo pipefail
data=$1; out=$2; shift 2
cd "$(dirname "$0")/.."
mkdir -p "$out"
for seed in 1 2 3; do
  for ffn in hymoe dense; do
    python hymoerec/train.py --data-file "$data" --format sequences --ffn "$ffn" \
      --seed "$seed" --threads 1 --no-progress --run-dir "$out/beauty_${ffn}_s${seed}" "$@" \
      > "$out/beauty_${ffn}_s${seed}.log" 2>&1 &
  done
  wait
done
