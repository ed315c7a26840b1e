"""Aggregate a study of training candidates (one run folder each, same data and seed) into
a JSON of validation curves and a Markdown table, both protocols side by side.

    python experiments/aggregate_candidates.py RUN_DIR... --baseline NAME --out benchmarks/results/beauty_candidates.md

For each run: the flags that differ from the baseline run's, the commit(s) it ran on, its
epochs and best epoch (early stopping reads validation NDCG@10 with history kept), the best
validation NDCG@10 under each protocol (history kept; history excluded, as BSARec and
S3-Rec rank), the training CPU seconds an epoch and to the best epoch, and, for a finished
run, the best checkpoint's test HR/NDCG@10 under both protocols. A run still training is
listed with its curve so far and no test numbers.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hymoerec.cli import ArgumentParser, fail  # noqa: E402
from hymoerec.options import build_parser  # noqa: E402
from hymoerec.run_folder import CONFIG_FILE, LOG_FILE, SUMMARY_FILE, read_log, write_json  # noqa: E402

# settings that say where and how fast a run went, not what it trained
NOT_A_CANDIDATE = ("run_dir", "threads", "no_progress", "max_minutes", "device",
                   "eval_batch_size", "resume", "overwrite", "config", "dist_timeout")
KEPT, EXCLUDED = "valid", "valid_history_excluded"


def candidate(run_dir: Path, baseline_config: dict | None) -> dict:
    """One run's record: label, differing flags, curves, best epoch, CPU cost, tests."""
    config = json.loads((run_dir / CONFIG_FILE).read_text())
    log = read_log(run_dir / LOG_FILE)
    if not log:
        raise ValueError(f"{run_dir / LOG_FILE}: no finished epoch")
    if any(EXCLUDED not in r for r in log):
        raise ValueError(f"{run_dir / LOG_FILE}: an epoch without {EXCLUDED} (a run from "
                         f"before both protocols were logged)")
    best = max(log, key=lambda r: r[KEPT]["NDCG@10"])
    cpu = [r["train_cpu_seconds"] for r in log]
    # a setting newer than the baseline's run has its default there
    defaults = vars(build_parser().parse_args([]))
    differs = {k: v for k, v in config.items() if k not in NOT_A_CANDIDATE
               and baseline_config is not None and baseline_config.get(k, defaults.get(k)) != v}
    record = {
        "label": run_dir.name, "differs_from_baseline": differs,
        "epochs": len(log), "best_epoch": best["epoch"],
        "valid_ndcg10": {"kept": [r[KEPT]["NDCG@10"] for r in log],
                         "excluded": [r[EXCLUDED]["NDCG@10"] for r in log]},
        "best_valid": {"kept": best[KEPT], "excluded": best[EXCLUDED]},
        "best_valid_excluded_any_epoch": max(r[EXCLUDED]["NDCG@10"] for r in log),
        "train_cpu_s_per_epoch": sum(cpu) / len(cpu),
        "train_cpu_s_to_best": sum(cpu[:best["epoch"]]),
        "finished": False, "commits": [], "test": None,
    }
    summary_path = run_dir / SUMMARY_FILE
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        record.update(finished=summary["finished"], commits=summary.get("commits", []),
                      test={"kept": {k: summary["test"][k] for k in ("HR@10", "NDCG@10")},
                            "excluded": {k: summary["test_history_excluded"][k]
                                         for k in ("HR@10", "NDCG@10")}})
    return record


def markdown(records: list[dict], baseline: str) -> str:
    def gain(value: float, base: float) -> str:
        return f"{100 * (value / base - 1):+.1f}%"

    base = next(r for r in records if r["label"] == baseline)
    lines = [f"Baseline: `{baseline}`. Validation NDCG@10 at the best epoch (early stopping on "
             "history kept) under both protocols; test of the best checkpoint for finished "
             "runs.", "",
             "| run | differs from the baseline | epochs (best) | valid NDCG@10 kept | "
             "valid NDCG@10 excluded | vs baseline (excluded) | CPU s / epoch | CPU min to best "
             "| test HR@10 / NDCG@10 kept | test HR@10 / NDCG@10 excluded |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        flags = ", ".join(f"`{k}={v}`" for k, v in r["differs_from_baseline"].items()) or "—"
        test = r["test"]
        cells = ([f"{test[p]['HR@10']:.4f} / {test[p]['NDCG@10']:.4f}" for p in ("kept", "excluded")]
                 if test else ["(training)", "(training)"])
        lines.append(
            f"| {r['label']} | {flags} | {r['epochs']} ({r['best_epoch']}) | "
            f"{r['best_valid']['kept']['NDCG@10']:.4f} | {r['best_valid']['excluded']['NDCG@10']:.4f} | "
            f"{gain(r['best_valid']['excluded']['NDCG@10'], base['best_valid']['excluded']['NDCG@10'])} | "
            f"{r['train_cpu_s_per_epoch']:.1f} | {r['train_cpu_s_to_best'] / 60:.1f} | "
            f"{cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--baseline", required=True, help="name of the baseline run folder")
    parser.add_argument("--out", type=Path, required=True, help="Markdown path; the JSON goes "
                                                                "beside it")
    args = parser.parse_args(argv)
    names = [d.name for d in args.run_dirs]
    if args.baseline not in names:
        parser.error(f"--baseline {args.baseline} is not one of the run folders ({', '.join(names)})")
    try:
        base_config = json.loads((args.run_dirs[names.index(args.baseline)] / CONFIG_FILE).read_text())
        records = [candidate(d, base_config) for d in args.run_dirs]
    except (OSError, ValueError, KeyError) as err:
        raise fail(f"{err}") from None
    result = {"baseline": args.baseline, "runs": records}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(records, args.baseline))
    write_json(args.out.with_suffix(".json"), result)
    return result


if __name__ == "__main__":
    main()
