# Shared by the long-run drivers (table_runs.sh, upcycle_runs.sh); source it from the
# repository root.

# the run folder's file names, from hymoerec/run_folder.py
read -r LAST_CHECKPOINT SUMMARY_FILE < <(python -c \
  'from hymoerec.run_folder import LAST_CHECKPOINT as L, SUMMARY_FILE as S; print(L, S)')

finished() {  # finished RUN_DIR: its summary says the run is done
  python -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1])).get("finished", True) else 1)' \
    "$1/$SUMMARY_FILE" 2>/dev/null
}

minutes_left() {  # whole minutes until $deadline (seconds since the epoch)
  echo $(( (deadline - $(date +%s)) / 60 ))
}
