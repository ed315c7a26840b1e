"""Aggregate the upcycling study of experiments/upcycle_runs.sh into upcycle_<data>.{json,md}.

    python experiments/aggregate_upcycle.py RUNS_DIR [--out benchmarks/results/upcycle_beauty.md]

Per seed, the runs dense-s<seed> (dense SASRec to early stopping), continued-s<seed> (that
model trained on with a fresh optimizer), upcycled-{copy,drop}-s<seed> (that model upcycled
to HyMoE) and scratch-s<seed> (HyMoE from scratch). The table gives each kind's test
HR/NDCG@10 (head / tail NDCG@10 too), the epochs and CPU minutes it cost beyond the dense
run, and how many epochs an upcycled run took to reach the best validation NDCG@10 of the
from-scratch HyMoE run; then a paired test over test users of each upcycled kind against the
continued dense model (per-user NDCG@10, mean over seeds). Runs missing or still training
are left out of the means and counted.
"""
from __future__ import annotations

import json
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.reproduce import test_ranks  # noqa: E402
from experiments.tables import NO_VALUE, mean_std_cell, paired_test  # noqa: E402
from hymoerec.cli import ArgumentParser  # noqa: E402
from hymoerec.data import leave_one_out  # noqa: E402
from hymoerec.metrics import ndcg_gains  # noqa: E402
from hymoerec.run_folder import LOG_FILE, SUMMARY_FILE, read_log, write_json  # noqa: E402
from hymoerec.settings import load_data  # noqa: E402

KINDS = {"dense": "dense SASRec (the starting point)",
         "continued": "dense, trained on (fresh optimizer)",
         "upcycled-copy": "upcycled to HyMoE, experts copied",
         "upcycled-drop": "upcycled to HyMoE, Drop-Upcycling (50%)",
         "scratch": "HyMoE from scratch"}
STARTED_FROM_DENSE = ("continued", "upcycled-copy", "upcycled-drop")


def run_record(run_dir: Path) -> dict | None:
    """Test metrics, epochs, CPU minutes and the validation curve of one finished run (None
    when it has no summary or is still training)."""
    summary_path = run_dir / SUMMARY_FILE
    if not summary_path.is_file():
        return None
    summary = json.loads(summary_path.read_text())
    if not summary.get("finished", True):
        return None
    test = summary["test"]
    return {"HR@10": test["HR@10"], "NDCG@10": test["NDCG@10"],
            "head/NDCG@10": test["head/NDCG@10"], "tail/NDCG@10": test["tail/NDCG@10"],
            "epochs": summary["epochs_run"], "best_epoch": summary["best_epoch"],
            "cpu_minutes": summary["train_cpu_seconds_per_epoch"] * summary["epochs_run"] / 60,
            "valid_curve": [r["valid"]["NDCG@10"] for r in read_log(run_dir / LOG_FILE)],
            "commits": summary.get("commits", []), "config": summary["config"]}


def epochs_to_reach(curve: list[float], target: float) -> int | None:
    """First epoch (1-based) whose validation NDCG@10 reaches ``target``; None if none."""
    return next((epoch for epoch, value in enumerate(curve, 1) if value >= target), None)


def aggregate(runs_dir: Path) -> dict:
    seeds = sorted({int(p.name.rsplit("-s", 1)[1]) for p in runs_dir.glob("dense-s*")
                    if p.is_dir()})
    records = {kind: {s: run_record(runs_dir / f"{kind}-s{s}") for s in seeds} for kind in KINDS}
    per_user, split = {}, None
    for kind in STARTED_FROM_DENSE:
        done = [s for s in seeds if records[kind][s] and records["continued"][s]]
        if not done:
            continue
        if split is None:
            split = leave_one_out(load_data(Namespace(**records[kind][done[0]]["config"])))
        per_user[kind] = {s: ndcg_gains(test_ranks(runs_dir / f"{kind}-s{s}", split, Namespace(
            **records[kind][s]["config"])), 10) for s in done}
    tests = {}
    for kind in ("upcycled-copy", "upcycled-drop"):
        both = sorted(set(per_user.get(kind, {})) & set(per_user.get("continued", {})))
        if both:
            tests[kind] = {"seeds": both, **paired_test(
                np.mean([per_user[kind][s] for s in both], axis=0),
                np.mean([per_user["continued"][s] for s in both], axis=0))}
    reach = {}
    for kind in ("upcycled-copy", "upcycled-drop"):
        reach[kind] = {s: epochs_to_reach(records[kind][s]["valid_curve"],
                                          max(records["scratch"][s]["valid_curve"]))
                       for s in seeds if records[kind][s] and records["scratch"][s]}
    return {"runs_dir": str(runs_dir), "seeds": seeds, "records": records,
            "paired_tests": tests, "epochs_to_scratch_best": reach}


def render(report: dict) -> str:
    records, seeds = report["records"], report["seeds"]
    first = next((r for kind in KINDS for r in records[kind].values() if r), None)
    lines = ["# Upcycling a trained dense SASRec to HyMoE", "",
             f"Runs in `{report['runs_dir']}` (experiments/upcycle_runs.sh), seeds "
             f"{', '.join(map(str, seeds))}; test users, "
             f"{'history excluded' if first and first['config']['exclude_history'] else 'history kept'}; "
             "mean ± std over the finished seeds. Extra epochs and CPU minutes are those of the "
             "run itself; the runs that start from the dense model come on top of its cost.", "",
             "| run | finished seeds | HR@10 | NDCG@10 | head NDCG@10 | tail NDCG@10 | epochs | "
             "best epoch | CPU min |", "|---" * 10 + "|"]
    for kind, label in KINDS.items():
        done = [r for r in records[kind].values() if r]
        cell = {key: mean_std_cell([r[key] for r in done]) for key in
                ("HR@10", "NDCG@10", "head/NDCG@10", "tail/NDCG@10")}
        lines.append(f"| {label} | {len(done)} of {len(seeds)} | {cell['HR@10']} | "
                     f"{cell['NDCG@10']} | {cell['head/NDCG@10']} | {cell['tail/NDCG@10']} | "
                     f"{mean_std_cell([r['epochs'] for r in done], 1)} | "
                     f"{mean_std_cell([r['best_epoch'] for r in done], 1)} | "
                     f"{mean_std_cell([r['cpu_minutes'] for r in done], 1)} |")
    if report["paired_tests"]:
        lines += ["", "Paired test over test users of per-user NDCG@10 (mean over the seeds "
                      "where both finished), upcycled against the continued dense model:", "",
                  "| upcycled | seeds | mean diff | rel. gain | t | p (permutation) | 95% CI |",
                  "|---|---|---|---|---|---|---|"]
        for kind, t in report["paired_tests"].items():
            lines.append(f"| {KINDS[kind]} | {', '.join(map(str, t['seeds']))} | "
                         f"{t['mean_diff']:+.5f} | {100 * t['relative_gain']:+.1f}% | "
                         f"{t['t']:.2f} | {t['p_permutation']:.4f} | "
                         f"[{t['ci95'][0]:+.5f}, {t['ci95'][1]:+.5f}] |")
    reach = {k: v for k, v in report["epochs_to_scratch_best"].items() if v}
    if reach:
        lines += ["", "Epochs an upcycled run took to reach the best validation NDCG@10 of "
                      f"HyMoE from scratch (same seed; {NO_VALUE} never):", ""]
        for kind, per_seed in reach.items():
            lines.append(f"- {KINDS[kind]}: " + ", ".join(
                f"seed {s}: {NO_VALUE if e is None else e}" for s, e in per_seed.items()))
    commits = sorted({c for kind in KINDS for r in records[kind].values() if r
                      for c in r["commits"] if c})
    lines += ["", f"Code: commit {', '.join(commits) or 'unrecorded'}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs_dir", type=Path)
    p.add_argument("--out", type=Path, help="Markdown file (default RUNS_DIR/upcycle.md); "
                                            "the JSON is written next to it")
    args = p.parse_args(argv)
    if not any(args.runs_dir.glob("dense-s*")):
        p.error(f"{args.runs_dir} holds no dense-s<seed> run of experiments/upcycle_runs.sh")
    report = aggregate(args.runs_dir)
    out = args.out or args.runs_dir / "upcycle.md"
    write_json(out.with_suffix(".json"), {k: v for k, v in report.items()})
    out.write_text(render(report))
    print(out.read_text())
    return report


if __name__ == "__main__":
    main()
