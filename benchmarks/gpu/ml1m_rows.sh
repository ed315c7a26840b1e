#!/usr/bin/env bash
# The ML-1M table's rows on one GPU: every run its own process, all at once (one thread
# each; an H200 holds them all), each stopping before MINUTES, then the table of what
# finished, with the paper's numbers beside it (unfinished runs are marked, their best
# checkpoint so far evaluated). Writes four files under OUT: ml1m_table1.md, ml1m_table1.json,
# ml1m_table1_ranks.npz (per-user test ranks) and ml1m_runs.tgz (every run's summary, config
# and log; no checkpoints). KEEP=JSON (e.g.
# the committed benchmarks/results/ml1m_table1.json) adds the runs recorded there for rows
# not trained here (reproduce --keep-runs). The run folders stay in RUN_ROOT (default
# ${TMPDIR:-/tmp}/ml1m-runs), outside OUT, so a later call on the same machine resumes them.
# Usage: [ROWS="model:ffn:seed ..."] [RUN_ROOT=DIR] [KEEP=JSON] benchmarks/gpu/ml1m_rows.sh DATA_FILE OUT MINUTES [-- FLAGS]
#   DATA_FILE: ml-1m.txt (`user item` pairs); FLAGS: extra train.py flags for every run
set -euo pipefail
data=$1; out=$2; minutes=$3; shift 3
[ "${1:-}" = "--" ] && shift
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
rows=${ROWS:-"sasrec:dense:1 sasrec:dense:2 sasrec:dense:3 sasrec:hymoe:1 sasrec:hymoe:2
  sasrec:hymoe:3 gru4rec:dense:1 narm:dense:1 bert4rec:dense:1 mamba4rec:dense:1
  mamba4rec:hymoe:1"}
run_root=${RUN_ROOT:-${TMPDIR:-/tmp}/ml1m-runs}
mkdir -p "$out" "$run_root"
# one slot per run, so every run trains at once; a run may start with a minute left
START_FLOOR=1 experiments/table_runs.sh "$data" pairs "$run_root" "$minutes" $rows -- "$@"
seeds=$(for r in $rows; do echo "${r##*:}"; done | sort -n | tail -1)
keep=(); [ -n "${KEEP:-}" ] && keep=(--keep-runs "$KEEP")
python -m experiments.reproduce --no-train --data-file "$data" --format pairs --paper-dataset ml-1m \
  --seeds "$seeds" --run-root "$run_root" --out "$out/ml1m_table1.md" "${keep[@]}" "$@"
tar czf "$out/ml1m_runs.tgz" -C "$run_root" --exclude '*.pt' .
