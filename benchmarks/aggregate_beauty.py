"""Aggregate Beauty runs (3 seeds x {hymoe, dense}) into benchmarks/results/beauty_table.{json,md}.

    python benchmarks/aggregate_beauty.py /work/runs/beauty_*_s*

Each argument is a run folder. A finished run contributes its summary.json; a run stopped
before early stopping ended (e.g. by a time limit) is scored from its best.pt with
hymoerec.evaluate and marked ``finished: false``, with the epochs it reached.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hymoerec.checkpoint import load_checkpoint  # noqa: E402
from hymoerec.evaluate import evaluate_checkpoint  # noqa: E402

PAPER = {"HR@10": 0.0756, "NDCG@10": 0.0442}  # the paper's HyMoERec test numbers on Beauty
METRICS = [f"{m}@{k}" for m in ("HR", "NDCG") for k in (5, 10, 20)]
RESULTS = Path(__file__).resolve().parent / "results"


def run_record(run_dir: Path, launch_commit: str | None = None) -> dict:
    """Config, test metrics, epochs and CPU seconds per epoch of one run folder
    (``launch_commit``, when given, replaces the commit the run recorded)."""
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line]
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        config, test, finished = summary["config"], summary["test"], True
        commit = launch_commit or summary["commit"]
    else:
        config = json.loads((run_dir / "config.json").read_text())
        test = evaluate_checkpoint(run_dir / "best.pt", device="cpu")["test"]
        finished = False
        commit = launch_commit or load_checkpoint(run_dir / "last.pt").get("commits", [None])[0]
    best = max(log, key=lambda r: r["valid"]["NDCG@10"])
    return {"run": run_dir.name, "ffn": config["ffn"], "seed": config["seed"],
            "finished": finished, "commit": commit, "epochs_run": len(log),
            "best_epoch": best["epoch"], "steps": log[-1]["step"],
            "train_cpu_seconds_per_epoch": statistics.mean(r["train_cpu_seconds"] for r in log),
            "train_wall_seconds_per_epoch": statistics.mean(r["train_seconds"] for r in log),
            "config": config, "test": test}


def aggregate(records: list[dict]) -> dict:
    table = {}
    for ffn in sorted({r["ffn"] for r in records}):
        runs = [r for r in records if r["ffn"] == ffn]
        row = {"seeds": [r["seed"] for r in runs], "n_runs": len(runs),
               "all_finished": all(r["finished"] for r in runs)}
        for group, prefix in (("all", ""), ("head", "head/"), ("tail", "tail/")):
            for metric in METRICS:
                values = [r["test"][prefix + metric] for r in runs]
                row[f"{prefix}{metric}"] = statistics.mean(values)
                row[f"{prefix}{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        row["train_cpu_seconds_per_epoch"] = statistics.mean(
            r["train_cpu_seconds_per_epoch"] for r in runs)
        row["epochs_run"] = [r["epochs_run"] for r in runs]
        table[ffn] = row
    checks = {}
    if "hymoe" in table:
        for metric, target in PAPER.items():
            checks[f"hymoe {metric} >= paper {target}"] = table["hymoe"][metric] >= target
        if "dense" in table:
            for metric in PAPER:
                checks[f"hymoe {metric} > dense"] = table["hymoe"][metric] > table["dense"][metric]
    return {"paper": PAPER, "table": table, "checks": checks, "runs": records}


def markdown(result: dict) -> str:
    lines = ["| FFN | runs | " + " | ".join(METRICS) + " | CPU s/epoch | epochs |",
             "|---|---|" + "---|" * len(METRICS) + "---|---|"]
    for ffn, row in result["table"].items():
        cells = [f"{row[m]:.4f} ± {row[m + '_std']:.4f}" for m in METRICS]
        lines.append(f"| {ffn} | {row['n_runs']}{'' if row['all_finished'] else ' (cut)'} | "
                     + " | ".join(cells) + f" | {row['train_cpu_seconds_per_epoch']:.1f} | "
                     + ",".join(map(str, row["epochs_run"])) + " |")
    lines.append(f"| paper HyMoERec | | | {PAPER['HR@10']} | | | {PAPER['NDCG@10']} | | | |")
    lines += ["", "Head (top 20% items by training frequency) / tail test NDCG@10: "
              + "; ".join(f"{ffn} {row['head/NDCG@10']:.4f} / {row['tail/NDCG@10']:.4f}"
                          for ffn, row in result["table"].items()), ""]
    lines += [f"- {name}: {'yes' if ok else 'NO'}" for name, ok in result["checks"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=RESULTS / "beauty_table")
    p.add_argument("--launch-commit", help="commit the runs were started from (overrides what "
                                           "they recorded; for runs older than that record)")
    args = p.parse_args()
    result = aggregate([run_record(d, args.launch_commit) for d in args.run_dirs])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
