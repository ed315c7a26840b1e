#!/usr/bin/env bash
# The Beauty benchmark: seeds x {hymoe, dense} in two slots (one per FFN kind), each slot
# running its seeds one after another with one thread, so two runs go at a time.
# Usage: [SEEDS="1 2 3"] experiments/beauty_runs.sh BEAUTY_FILE OUT_DIR [extra train.py flags...]
# Then:  python experiments/aggregate_beauty.py OUT_DIR/beauty_*_s*/
# A run cut short continues with: python hymoerec/train.py --resume --run-dir OUT_DIR/beauty_<ffn>_s<seed>
set -euo pipefail
data=$1; out=$2; shift 2
cd "$(dirname "$0")/.."
mkdir -p "$out"
for ffn in hymoe dense; do
  (
    for seed in ${SEEDS:-1 2 3}; do
      python hymoerec/train.py --data-file "$data" --format sequences --ffn "$ffn" \
        --seed "$seed" --threads 1 --no-progress --run-dir "$out/beauty_${ffn}_s${seed}" "$@" \
        > "$out/beauty_${ffn}_s${seed}.log" 2>&1
    done
  ) &
done
wait
