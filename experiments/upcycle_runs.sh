#!/usr/bin/env bash
# The upcycling study (issue #17) on one data file, per seed, one thread per run:
#   dense-s<seed>         dense SASRec trained to early stopping
#   continued-s<seed>     that dense model trained on (--init-from, fresh optimizer)
#   upcycled-copy-s<seed> that dense model upcycled to HyMoE, experts copied
#   upcycled-drop-s<seed> the same with Drop-Upcycling (half of each expert's units re-drawn)
#   scratch-s<seed>       HyMoE trained from scratch
# Every run stops before the deadline (MINUTES from now) and resumes on the next call;
# finished runs are skipped. Then: python experiments/aggregate_upcycle.py OUT_DIR
# Usage: [SEEDS="1 2 3"] experiments/upcycle_runs.sh DATA_FILE OUT_DIR MINUTES [extra train.py flags]
set -euo pipefail
data=$1; out=$2; minutes=$3; shift 3
cd "$(dirname "$0")/.."
mkdir -p "$out"
deadline=$(( $(date +%s) + ${minutes%.*} * 60 ))

source experiments/run_helpers.sh

train() {  # train RUN_NAME FLAGS...: one run, resumed if it has a checkpoint, skipped if done
  local dir="$out/$1"; shift
  finished "$dir" && return 0
  local left=$(minutes_left)
  [ "$left" -ge 3 ] || return 1
  if [ -f "$dir/$LAST_CHECKPOINT" ]; then
    python hymoerec/train.py --resume --run-dir "$dir" --max-minutes "$left" >> "$dir.log" 2>&1
  else
    python hymoerec/train.py "$@" --threads 1 --no-progress --run-dir "$dir" \
      --max-minutes "$left" >> "$dir.log" 2>&1
  fi
  finished "$dir"
}

for seed in ${SEEDS:-1 2 3}; do
  dense="$out/dense-s$seed"
  train "dense-s$seed" --data-file "$data" --ffn dense --seed "$seed" "$@" || break
  train "continued-s$seed" --init-from "$dense" --ffn dense || break
  train "upcycled-copy-s$seed" --init-from "$dense" --ffn hymoe --expert-init copy || break
  train "upcycled-drop-s$seed" --init-from "$dense" --ffn hymoe --expert-init drop || break
  train "scratch-s$seed" --data-file "$data" --ffn hymoe --seed "$seed" "$@" || break
done
