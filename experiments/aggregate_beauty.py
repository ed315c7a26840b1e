"""Aggregate Beauty runs (3 seeds x {hymoe, dense}) into benchmarks/results/beauty_table.{json,md}.

    python experiments/aggregate_beauty.py runs/beauty/beauty_*_s*/

Each argument is a run folder. Its best.pt (best validation NDCG@10) is scored on the test
split with hymoerec.evaluate under both protocols (history kept / excluded; cached in the
run folder). A run without summary.json was stopped before early stopping ended (e.g. by a
time limit) and is marked ``finished: false``, with the epochs it reached.
"""
from __future__ import annotations

import json
import statistics
import sys
from argparse import Namespace
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.tables import format_mean_std, mean_std, published  # noqa: E402
from hymoerec.checkpoint import load_checkpoint  # noqa: E402
from hymoerec.cli import ArgumentParser  # noqa: E402
from hymoerec.data import leave_one_out  # noqa: E402
from hymoerec.evaluate import Recommender, evaluate_checkpoint, seen_items_in_top  # noqa: E402
from hymoerec.models import ModelConfig  # noqa: E402
from hymoerec.models.base import older_runs_value  # noqa: E402
from hymoerec.run_folder import (BEST_CHECKPOINT, CONFIG_FILE, LAST_CHECKPOINT,  # noqa: E402
                                 LOG_FILE, SUMMARY_FILE)
from hymoerec.settings import load_data  # noqa: E402

# the paper's HyMoERec test numbers on Beauty
PAPER = {m: published("paper_table1")["beauty"]["HyMoERec"][m] for m in ("HR@10", "NDCG@10")}
METRICS = [f"{m}@{k}" for m in ("HR", "NDCG") for k in (5, 10, 20)]
RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


PROTOCOLS = {"test": "history kept (RecBole protocol, the default)",
             "test_exclude_history": "history excluded (S3-Rec / ICLRec protocol)"}


def best_checkpoint_metrics(run_dir: Path, exclude_history: bool) -> dict:
    """Valid / test metrics of run_dir's best checkpoint, cached in run_dir as JSON."""
    cache = run_dir / f"best_metrics_{'exclude' if exclude_history else 'keep'}_history.json"
    if not cache.is_file():
        metrics = evaluate_checkpoint(run_dir / BEST_CHECKPOINT, exclude_history, device="cpu")
        cache.write_text(json.dumps(metrics, indent=2) + "\n")
    return json.loads(cache.read_text())


def last_item_first_share(run_dir: Path) -> float:
    """Share of test users whose most recent history item run_dir's best checkpoint ranks first among
    all items (history kept). Beauty has no repeated items, so each such top slot is wasted:
    the tied item embeddings score an item high right after it was consumed. Cached."""
    cache = run_dir / "last_item_first_share.json"
    if not cache.is_file():
        rec = Recommender.from_checkpoint(run_dir / BEST_CHECKPOINT, "cpu")
        histories = leave_one_out(load_data(Namespace(**rec.config))).history("test")
        share = seen_items_in_top(rec, histories, k=1)["last_item_first"]
        cache.write_text(json.dumps(share) + "\n")
    return json.loads(cache.read_text())


def run_record(run_dir: Path, launch_commit: str | None = None) -> dict:
    """Config, test metrics under both protocols, epochs and CPU seconds per epoch of one
    run folder (``launch_commit``: the code's commit for runs that predate recording it)."""
    log = [json.loads(line) for line in (run_dir / LOG_FILE).read_text().splitlines() if line]
    summary_path = run_dir / SUMMARY_FILE
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        config, finished, test = summary["config"], True, summary["test"]
        commit = summary["commits"][0] if "commits" in summary else launch_commit
    else:
        config = json.loads((run_dir / CONFIG_FILE).read_text())
        finished, test = False, best_checkpoint_metrics(run_dir, False)["test"]
        commit = load_checkpoint(run_dir / LAST_CHECKPOINT).get("commits", [launch_commit])[0]
    best = max(log, key=lambda r: r["valid"]["NDCG@10"])
    return {"run": run_dir.name, "ffn": config["ffn"], "seed": config["seed"],
            "finished": finished, "commit": commit, "epochs_run": len(log),
            "best_epoch": best["epoch"], "steps": log[-1]["step"],
            "train_cpu_seconds_per_epoch": statistics.mean(r["train_cpu_seconds"] for r in log),
            "train_wall_seconds_per_epoch": statistics.mean(r["train_seconds"] for r in log),
            "config": config,
            "test": test,
            "test_exclude_history": best_checkpoint_metrics(run_dir, True)["test"],
            "last_item_first_share": last_item_first_share(run_dir)}


def aggregate(records: list[dict]) -> dict:
    """Per protocol and FFN kind: mean and std over runs (0 for one run) of every test
    metric, and the checks against the paper and the dense ablation."""
    result = {"paper": PAPER, "protocols": PROTOCOLS, "tables": {}, "checks": {}}
    for protocol in PROTOCOLS:
        table = {}
        for ffn in sorted({r["ffn"] for r in records}):
            runs = [r for r in records if r["ffn"] == ffn]
            row = {"seeds": [r["seed"] for r in runs], "all_finished": all(r["finished"] for r in runs),
                   "epochs_run": [r["epochs_run"] for r in runs],
                   "best_epoch": [r["best_epoch"] for r in runs],
                   "train_cpu_seconds_per_epoch": statistics.mean(
                       r["train_cpu_seconds_per_epoch"] for r in runs),
                   "last_item_first_share": statistics.mean(
                       r["last_item_first_share"] for r in runs)}
            for prefix in ("", "head/", "tail/"):
                for metric in METRICS:
                    mean, std = mean_std([r[protocol][prefix + metric] for r in runs])
                    row[prefix + metric], row[prefix + metric + "_std"] = mean, std or 0.0
            table[ffn] = row
        result["tables"][protocol] = table
        if "hymoe" in table:
            for metric, target in PAPER.items():
                result["checks"][f"{protocol}: hymoe {metric} >= paper {target}"] = \
                    table["hymoe"][metric] >= target
                if "dense" in table:
                    result["checks"][f"{protocol}: hymoe {metric} > dense"] = \
                        table["hymoe"][metric] > table["dense"][metric]
    result["runs"] = records
    return result


def markdown(result: dict) -> str:
    runs = result["runs"]
    # a run saved before a model field existed: the value it trained with
    config = {f.name: older_runs_value(f) for f in fields(ModelConfig)} | runs[0]["config"]
    settings = ", ".join(f"{k}={config[k]}" for k in
                         ("batch_size", "lr", "epochs", "patience", "d_model", "n_layers",
                          "n_heads", "dropout", "max_len", "output_head", "head_skip",
                          "num_experts", "top_k", "warmup_steps", "lb_weight", "threads"))
    lines = [f"Beauty ({config.get('data_file')}), test metrics of the best-validation "
             f"checkpoint, mean ± std over seeds. Settings: {settings}.", ""]
    for protocol, title in result["protocols"].items():
        lines += [f"**{title}**", "",
                  "| FFN | seeds | " + " | ".join(METRICS) + " | CPU s/epoch | epochs (best) |",
                  "|---|---|" + "---|" * len(METRICS) + "---|---|"]
        for ffn, row in result["tables"][protocol].items():
            cells = [format_mean_std(row[m], row[m + "_std"]) for m in METRICS]
            seeds = ",".join(map(str, row["seeds"])) + ("" if row["all_finished"] else " (cut)")
            epochs = ", ".join(f"{e} ({b})" for e, b in zip(row["epochs_run"], row["best_epoch"]))
            lines.append(f"| {ffn} | {seeds} | " + " | ".join(cells)
                         + f" | {row['train_cpu_seconds_per_epoch']:.1f} | {epochs} |")
        lines.append(f"| paper HyMoERec | | | {PAPER['HR@10']} | | | {PAPER['NDCG@10']} | | | |")
        lines += ["", "Head (top 20% items by training frequency) / tail NDCG@10: "
                  + "; ".join(f"{ffn} {row['head/NDCG@10']:.4f} / {row['tail/NDCG@10']:.4f}"
                              for ffn, row in result["tables"][protocol].items()), ""]
    shares = result["tables"]["test"]
    lines += ["Test users whose most recent item (never their next one here) the model ranks "
              "first, history kept: " + "; ".join(f"{ffn} {100 * row['last_item_first_share']:.1f}%"
                                                   for ffn, row in shares.items()), ""]
    lines += [f"- {name}: {'yes' if ok else 'NO'}" for name, ok in result["checks"].items()]
    lines += ["", "Runs: " + "; ".join(
        f"{r['run']} ({'finished' if r['finished'] else 'cut'}, {r['epochs_run']} epochs, "
        f"commit {str(r['commit'])[:7]})" for r in runs)]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=RESULTS / "beauty_table")
    p.add_argument("--launch-commit", help="commit of runs started before train.py recorded "
                                           "its commit at start")
    args = p.parse_args()
    for run_dir in args.run_dirs:
        if not (run_dir / LOG_FILE).is_file():
            p.error(f"{run_dir} is not a run folder (it has no {LOG_FILE})")
    result = aggregate([run_record(d, args.launch_commit) for d in args.run_dirs])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
