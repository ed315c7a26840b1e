#!/usr/bin/env bash
# Long table runs in parallel slots, each slot training its runs one after another on one
# thread, every run stopping cleanly (--max-minutes) before a shared deadline and resuming
# (--resume) where an earlier call left it. Run folders are named as experiments/reproduce.py
# names them (<model>-<ffn>-s<seed>), so `python -m experiments.reproduce --run-root OUT_DIR
# --no-train ...` renders the table of what has finished, and a later reproduce call reuses
# the runs.
# Usage: experiments/table_runs.sh DATA_FILE FORMAT OUT_DIR MINUTES SLOT [SLOT ...] [-- FLAGS]
#   SLOT: space-separated runs "model:ffn:seed ...", e.g. "sasrec:dense:1 sasrec:dense:2"
#   MINUTES: the deadline from now; a run starts no new epoch after it
#   FLAGS: extra train.py flags for every run (the same on every call: resume refuses changes)
# Finished runs (a summary with "finished": true) are skipped, so the same call goes on
# where the last one stopped. A run starts only with START_FLOOR minutes left (default 5).
set -euo pipefail
data=$1; format=$2; out=$3; minutes=$4; shift 4
slots=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do slots+=("$1"); shift; done
[ $# -gt 0 ] && shift
cd "$(dirname "$0")/.."
mkdir -p "$out"
deadline=$(( $(date +%s) + ${minutes%.*} * 60 ))

source experiments/run_helpers.sh

for slot in "${slots[@]}"; do
  (
    for run in $slot; do
      IFS=: read -r model ffn seed <<< "$run"
      dir="$out/$model-$ffn-s$seed"
      finished "$dir" && continue
      left=$(minutes_left)
      [ "$left" -ge "${START_FLOOR:-5}" ] || break
      resume=(); [ -f "$dir/$LAST_CHECKPOINT" ] && resume=(--resume)
      python hymoerec/train.py --data-file "$data" --format "$format" --model "$model" \
        --ffn "$ffn" --seed "$seed" --threads 1 --no-progress --run-dir "$dir" \
        --max-minutes "$left" "${resume[@]}" "$@" >> "$dir.log" 2>&1 || true
    done
  ) &
done
wait
