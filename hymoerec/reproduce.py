"""Reproduce the paper's comparison table: every baseline and HyMoERec trained on one
leave-one-out split with the same full-ranking evaluation, over several seeds.

    python -m hymoerec.reproduce --dataset beauty --seeds 3
    python -m hymoerec.reproduce --data-file ../shared/data/beauty.txt --format sequences \\
        --seeds 1 --budget 10m --out benchmarks/results/beauty_budget.md

Rows: GRU4Rec, NARM, BERT4Rec, Mamba4Rec, SASRec (dense FFN) and HyMoERec on the SASRec
and on the Mamba4Rec backbone (``--ffn hymoe``); each model starts from its paper's
configuration (``paper_defaults``). Writes a Markdown table (HR@5, HR@10, NDCG@5, NDCG@10,
mean ± std over seeds on the test users, beside the published numbers where known, and the
baselines beside independent RecBole runs of them on Beauty) with a paired test of each
HyMoERec row against the best baseline, and the raw results as JSON.
Flags it does not know are passed to every training run (e.g. ``--batch-size 256``).
Finished runs in ``--run-root`` are reused, interrupted ones resumed.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hymoerec.data import DATASETS, FORMATS, leave_one_out
from hymoerec.evaluate import Recommender
from hymoerec.metrics import ndcg_gains, rank_metrics, rank_targets
from hymoerec.train import load_data, parse_args
from hymoerec.train import main as train_main

METRICS = ("HR@5", "HR@10", "NDCG@5", "NDCG@10")
PERMUTATIONS = 10_000


@dataclass(frozen=True)
class Entry:
    """One row of the table: a backbone with an FFN kind."""
    label: str
    model: str
    ffn: str
    is_hymoerec: bool = False


ENTRIES = (
    Entry("GRU4Rec", "gru4rec", "dense"),
    Entry("NARM", "narm", "dense"),
    Entry("BERT4Rec", "bert4rec", "dense"),
    Entry("Mamba4Rec", "mamba4rec", "dense"),
    Entry("SASRec (dense FFN)", "sasrec", "dense"),
    Entry("HyMoERec (SASRec backbone)", "sasrec", "hymoe", True),
    Entry("HyMoERec (Mamba4Rec backbone)", "mamba4rec", "hymoe", True),
)

# The only published full-ranking numbers available offline: HyMoERec's HR@10 / NDCG@10 on
# Beauty and ML-1m (the backbone of the paper's HyMoERec is not stated, so they are shown
# beside both HyMoERec rows). No baseline number is available offline.
PUBLISHED = {
    "beauty": {"HyMoERec": {"HR@10": 0.0756, "NDCG@10": 0.0442}},
    "ml-1m": {"HyMoERec": {"HR@10": 0.3103, "NDCG@10": 0.1790}},
}
NOT_AVAILABLE = "n/a"  # not available offline

# Independent full-ranking runs of the baselines under RecBole's protocol, the default here
# (5-core Beauty, max length 50, leave-one-out by time, full softmax CE, full
# ranking with history kept, early stopping on validation NDCG@10, patience 10, batch 128,
# one seed), published in github.com/kanishkaRandunu/pswrec2k26: GRU4Rec and SASRec from
# results/beauty_results.md, BERT4Rec (mask ratio 0.2, dropout 0.2) from
# archives/results/results_old/benchmark_beauty.md.
# Not the paper's Table 1: a yardstick for "is this baseline trained as well as usual".
INDEPENDENT = {
    "beauty": {
        "GRU4Rec": {"HR@5": 0.0414, "HR@10": 0.0623, "NDCG@5": 0.0274, "NDCG@10": 0.0342},
        "BERT4Rec": {"HR@5": 0.0242, "HR@10": 0.0404, "NDCG@5": 0.0158, "NDCG@10": 0.0211},
        "SASRec (dense FFN)": {"HR@5": 0.0556, "HR@10": 0.0842, "NDCG@5": 0.0329,
                               "NDCG@10": 0.0421},
    },
}


def parse_budget(text: str | None) -> list[str]:
    """Training flags for a budget: "N" -> at most N epochs, "Nm" -> at most N minutes per
    model (no new epoch starts after N minutes), None -> no budget."""
    if text is None:
        return []
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(m?)", text.strip())
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"--budget must be epochs (e.g. 5) or minutes (e.g. "
                                         f"10m), got {text!r}")
    if match.group(2):
        return ["--max-minutes", match.group(1)]
    if "." in match.group(1):
        raise argparse.ArgumentTypeError(f"--budget in epochs must be a whole number, got {text!r}")
    return ["--epochs", match.group(1)]


def paired_test(ours: np.ndarray, theirs: np.ndarray, seed: int = 0) -> dict:
    """Paired comparison over users of per-user scores ours / theirs (n,) float: mean
    difference, relative gain, t statistic, two-sided sign-flip permutation p-value
    (PERMUTATIONS random flips of the per-user differences, +1 smoothed) and a 95% paired
    bootstrap interval of the mean difference."""
    diff = np.asarray(ours, dtype=np.float64) - np.asarray(theirs, dtype=np.float64)
    n = len(diff)
    if n < 2:
        raise ValueError(f"a paired test needs at least 2 users, got {n}")
    rng = np.random.default_rng(seed)
    observed = abs(diff.mean())
    spread = diff.std(ddof=1)
    if spread > 0:
        t_stat = diff.mean() / (spread / math.sqrt(n))
    else:  # every user differs by the same amount
        t_stat = math.copysign(math.inf, diff.mean()) if diff.mean() else 0.0
    extreme = 0
    boot_means = []
    for start in range(0, PERMUTATIONS, 500):
        size = min(500, PERMUTATIONS - start)
        signs = rng.integers(0, 2, size=(size, n), dtype=np.int8) * 2 - 1
        extreme += int((np.abs(signs @ diff / n) >= observed - 1e-15).sum())
        picks = rng.integers(0, n, size=(size, n))
        boot_means.append(diff[picks].mean(axis=1))
    boot = np.concatenate(boot_means)
    base = float(np.mean(theirs))
    return {"mean_diff": float(diff.mean()), "relative_gain": float(diff.mean() / base) if base else math.nan,
            "t": float(t_stat), "p_permutation": (extreme + 1) / (PERMUTATIONS + 1),
            "ci95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))], "n_users": n}


def run_entry(entry: Entry, seed: int, common: list[str], run_root: Path) -> dict:
    """Train (or reuse / resume) one entry for one seed; returns its summary plus the
    per-user test ranks."""
    run_dir = run_root / f"{entry.model}-{entry.ffn}-s{seed}"
    argv = common + ["--model", entry.model, "--ffn", entry.ffn, "--seed", str(seed),
                     "--run-dir", str(run_dir), "--no-progress"]
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        print(f"[reproduce] {entry.label} seed {seed}: reusing {summary_path}", flush=True)
        summary = json.loads(summary_path.read_text())
    else:
        print(f"[reproduce] {entry.label} seed {seed}: training in {run_dir}", flush=True)
        summary = train_main(argv + (["--resume"] if (run_dir / "last.pt").is_file() else []))
    return summary


def test_ranks(run_dir: Path, split, args: Namespace) -> np.ndarray:
    """Per-user test ranks (n,) int64 of the best checkpoint in run_dir."""
    rec = Recommender.from_checkpoint(run_dir, args.device)
    return rank_targets(rec.model.rank_next, split.history("test"), split.targets("test"),
                        args.max_len, args.exclude_history, args.eval_batch_size, rec.device)


def fmt(values: list[float]) -> str:
    mean = float(np.mean(values))
    if len(values) == 1:
        return f"{mean:.4f}"
    return f"{mean:.4f} ± {float(np.std(values, ddof=1)):.4f}"


def mean_test(result: dict, metric: str) -> float:
    """Mean over seeds of one row's test ``metric``."""
    return float(np.mean([run["test"][metric] for run in result["runs"]]))


def ndcg10_gap(result: dict, reference: dict) -> str:
    """Relative gap of one row's mean test NDCG@10 to a reference number, as "+x.x%"."""
    return f"{100 * (mean_test(result, 'NDCG@10') / reference['NDCG@10'] - 1):+.1f}%"


def markdown_table(results: dict, paper_key: str | None, header: list[str]) -> str:
    published = PUBLISHED.get(paper_key or "", {})
    lines = header + ["", "| Model | " + " | ".join(METRICS) + " | "
                      + " | ".join(f"paper {m}" for m in METRICS) + " | gap NDCG@10 vs paper |",
                      "|---" * (2 * len(METRICS) + 2) + "|"]
    for label, result in results.items():
        ours = [fmt([run["test"][m] for run in result["runs"]]) for m in METRICS]
        paper = published.get("HyMoERec", {}) if result["is_hymoerec"] else {}
        paper_cells = [f"{paper[m]:.4f}" if m in paper else NOT_AVAILABLE for m in METRICS]
        gap = ndcg10_gap(result, paper) if "NDCG@10" in paper else NOT_AVAILABLE
        lines.append(f"| {label} | " + " | ".join(ours) + " | " + " | ".join(paper_cells)
                     + f" | {gap} |")
    lines += ["", "| Model | epochs run (per seed) | best epoch | train s / epoch |", "|---|---|---|---|"]
    for label, result in results.items():
        runs = result["runs"]
        lines.append(f"| {label} | {', '.join(str(r['epochs_run']) for r in runs)} | "
                     f"{', '.join(str(r['best_epoch']) for r in runs)} | "
                     f"{np.mean([r['train_seconds_per_epoch'] for r in runs]):.1f} |")
    longest = max(len(run["valid_curve"]) for r in results.values() for run in r["runs"])
    lines += ["", "Validation NDCG@10 after each epoch (first seed), for comparisons at equal "
                  "epochs when a time budget gave the models different epoch counts:", "",
              "| Model | " + " | ".join(str(e) for e in range(1, longest + 1)) + " |",
              "|---" * (longest + 1) + "|"]
    for label, result in results.items():
        curve = result["runs"][0]["valid_curve"]
        lines.append(f"| {label} | " + " | ".join(f"{v:.4f}" for v in curve)
                     + " |" * (longest - len(curve) + 1))
    return "\n".join(lines)


def independent_section(results: dict, paper_key: str | None) -> str:
    """Our mean test metrics beside the independent RecBole runs of the same baselines."""
    reference = INDEPENDENT.get(paper_key or "", {})
    rows = [label for label in results if label in reference]
    if not rows:
        return ""
    lines = ["Baselines beside independent RecBole runs on the same data and protocol (batch "
             "128, one seed; github.com/kanishkaRandunu/pswrec2k26, not the paper's Table 1):",
             "", "| Model | " + " | ".join(METRICS) + " | "
             + " | ".join(f"RecBole {m}" for m in METRICS) + " | gap NDCG@10 |",
             "|---" * (2 * len(METRICS) + 2) + "|"]
    for label in rows:
        ref = reference[label]
        lines.append(f"| {label} | "
                     + " | ".join(f"{mean_test(results[label], m):.4f}" for m in METRICS) + " | "
                     + " | ".join(f"{ref[m]:.4f}" for m in METRICS)
                     + f" | {ndcg10_gap(results[label], ref)} |")
    return "\n".join(lines)


def significance_section(results: dict) -> tuple[str, dict]:
    """Paired tests (per-user test NDCG@10, averaged over seeds) of each HyMoERec row
    against the baseline with the best mean NDCG@10."""
    baselines = {label: r for label, r in results.items() if not r["is_hymoerec"]}
    if not baselines:
        return "", {}
    best = max(baselines, key=lambda label: baselines[label]["ndcg10_per_user"].mean())
    lines = [f"Paired test over test users of per-user NDCG@10 (mean over seeds) against the "
             f"best baseline, **{best}**: mean difference, relative gain, paired t, two-sided "
             f"sign-flip permutation p ({PERMUTATIONS} flips), 95% paired-bootstrap interval.", "",
             "| HyMoERec row | mean diff | rel. gain | t | p (permutation) | 95% CI |",
             "|---|---|---|---|---|---|"]
    tests = {}
    for label, result in results.items():
        if not result["is_hymoerec"]:
            continue
        test = paired_test(result["ndcg10_per_user"], baselines[best]["ndcg10_per_user"])
        tests[label] = {"against": best, **test}
        lines.append(f"| {label} | {test['mean_diff']:+.5f} | {100 * test['relative_gain']:+.1f}% | "
                     f"{test['t']:.2f} | {test['p_permutation']:.4f} | "
                     f"[{test['ci95'][0]:+.5f}, {test['ci95'][1]:+.5f}] |")
    return "\n".join(lines), tests


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train every baseline and HyMoERec on one split and write the comparison "
                    "table. Unknown flags are passed to every training run (see "
                    "python -m hymoerec.train --help).")
    p.add_argument("--dataset", default="synthetic", choices=DATASETS)
    p.add_argument("--data-file", help="your own interaction file (overrides --dataset)")
    p.add_argument("--format", default="sequences", choices=FORMATS)
    p.add_argument("--seeds", type=int, default=3,
                   help="seeds 1..N per model (as benchmarks/beauty_runs.sh)")
    p.add_argument("--budget", type=parse_budget, default=[],
                   help="per-model training budget: epochs (e.g. 5) or minutes (e.g. 10m); "
                        "default: full training (early stopping)")
    p.add_argument("--models", nargs="+", choices=[e.label for e in ENTRIES] +
                   sorted({e.model for e in ENTRIES}), metavar="MODEL",
                   help="only these rows (labels or model names; default all)")
    p.add_argument("--paper-dataset", choices=sorted(PUBLISHED),
                   help="whose published numbers to show (default: --dataset, or the "
                        "--data-file name when it is one of them)")
    p.add_argument("--run-root", help="folder of the training runs (default runs/reproduce-<data>)")
    p.add_argument("--out", help="Markdown table (default <run-root>/table.md); a .json "
                                 "with the raw results is written next to it")
    return p


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    opts, passthrough = parser.parse_known_args(argv)
    if opts.seeds < 1:
        parser.error("--seeds must be >= 1")
    data_flags = (["--data-file", opts.data_file, "--format", opts.format] if opts.data_file
                  else ["--dataset", opts.dataset])
    if opts.dataset == "synthetic" and not opts.data_file and "--synthetic-seed" not in passthrough:
        data_flags += ["--synthetic-seed", "0"]   # one data set for every seed
    common = data_flags + opts.budget + passthrough
    train_args = parse_args(common)   # validates the passed-through flags
    data_name = Path(opts.data_file).stem if opts.data_file else opts.dataset
    paper_key = opts.paper_dataset or (data_name.lower() if data_name.lower() in PUBLISHED else None)
    run_root = Path(opts.run_root or Path("runs") / f"reproduce-{data_name}")
    out = Path(opts.out) if opts.out else run_root / "table.md"
    entries = [e for e in ENTRIES if not opts.models or e.label in opts.models or e.model in opts.models]

    data = load_data(train_args)
    split = leave_one_out(data)
    results = {}
    for entry in entries:
        runs, ndcg = [], []
        for seed in range(1, opts.seeds + 1):
            summary = run_entry(entry, seed, common, run_root)
            run_args = Namespace(**summary["config"])
            ranks = test_ranks(run_root / f"{entry.model}-{entry.ffn}-s{seed}", split, run_args)
            recomputed = rank_metrics(ranks)
            if abs(recomputed["NDCG@10"] - summary["test"]["NDCG@10"]) > 1e-6:
                raise RuntimeError(f"{entry.label} seed {seed}: re-scored NDCG@10 "
                                   f"{recomputed['NDCG@10']} differs from the run's "
                                   f"{summary['test']['NDCG@10']}")
            log = run_root / f"{entry.model}-{entry.ffn}-s{seed}" / "log.jsonl"
            curve = [json.loads(line)["valid"]["NDCG@10"]
                     for line in log.read_text().splitlines() if line.strip()]
            runs.append({**{k: summary[k] for k in ("test", "valid", "epochs_run", "best_epoch",
                                                    "train_seconds_per_epoch", "config")},
                         "commits": summary.get("commits", []), "valid_curve": curve})
            ndcg.append(ndcg_gains(ranks, 10))
        results[entry.label] = {"model": entry.model, "ffn": entry.ffn,
                                "is_hymoerec": entry.is_hymoerec, "runs": runs,
                                "ndcg10_per_user": np.mean(ndcg, axis=0)}

    train_minutes = sum(run["train_seconds_per_epoch"] * run["epochs_run"]
                        for r in results.values() for run in r["runs"]) / 60
    budget = " ".join(opts.budget) or "none (full training with early stopping)"
    header = [f"# Comparison on {data.describe()}", "",
              f"Leave-one-out split, full ranking over all {data.n_items} items on "
              f"{len(split.eval_users)} test users "
              f"({'history excluded' if train_args.exclude_history else 'history kept'}); "
              f"seeds 1..{opts.seeds}, mean ± sample std over seeds when more than one.",
              f"Training budget per model: {budget}."
              + (" **Budgeted run: models are not trained to convergence; the numbers are "
                 "not comparable to published ones.**" if opts.budget else ""),
              f"Shared training flags: {' '.join(passthrough) or '(trainer defaults)'}; each "
              f"model starts from its paper's configuration. Total training time "
              f"{train_minutes:.1f} min.",
              f"Published numbers: only HyMoERec's HR@10 / NDCG@10 are available offline "
              f"({paper_key or 'none for this data'}); every other published cell is "
              f"'{NOT_AVAILABLE}' (not available offline) rather than a guessed value."]
    table = markdown_table(results, paper_key, header)
    independent = independent_section(results, paper_key)
    if independent:
        table += "\n\n" + independent
    significance, tests = significance_section(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n\n" + significance + "\n")
    raw = {label: {k: v for k, v in r.items() if k != "ndcg10_per_user"} for label, r in results.items()}
    out.with_suffix(".json").write_text(json.dumps(
        {"command": ["python", "-m", "hymoerec.reproduce"] + list(sys.argv[1:] if argv is None else argv),
         "data": data.describe(), "results": raw, "significance": tests,
         "independent_reference": INDEPENDENT.get(paper_key or "", {})}, indent=2) + "\n")
    print(table + "\n\n" + significance)
    print(f"[reproduce] wrote {out} and {out.with_suffix('.json')}")
    return {"results": results, "significance": tests, "table": out}


if __name__ == "__main__":
    main()
