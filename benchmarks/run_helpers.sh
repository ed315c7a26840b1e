# Shared by the long-run drivers (table_runs.sh, upcycle_runs.sh); source it.

finished() {  # finished RUN_DIR: its summary.json says the run is done
  python -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1])).get("finished", True) else 1)' \
    "$1/summary.json" 2>/dev/null
}

minutes_left() {  # whole minutes until $deadline (seconds since the epoch)
  echo $(( (deadline - $(date +%s)) / 60 ))
}
