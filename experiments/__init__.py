"""The studies behind the committed results tables (not installed with the package): the
long-run drivers (*_runs.sh), the aggregators (aggregate_*.py), the table runner
(reproduce.py, run as ``python -m experiments.reproduce`` from the repository root), the
named run settings (configs/) and the published numbers they are compared with (published/)."""
