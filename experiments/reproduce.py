"""Reproduce the paper's comparison table: every baseline and HyMoERec trained on one
leave-one-out split with the same full-ranking evaluation, over several seeds. Run from the
repository root:

    python -m experiments.reproduce --dataset beauty --seeds 3
    python -m experiments.reproduce --data-file ../shared/data/beauty.txt --format sequences \\
        --seeds 1 --budget 10m --out benchmarks/results/beauty_budget.md
    python -m experiments.reproduce --render benchmarks/results/beauty_table1.json   # re-render only

Rows: GRU4Rec, NARM, BERT4Rec, Mamba4Rec, SASRec (dense FFN) and HyMoERec on the SASRec
and on the Mamba4Rec backbone (``--ffn hymoe``); each model starts from its paper's
configuration (``paper_defaults``). Writes the raw results as JSON and, rendered from that
JSON alone (``--render`` re-renders a saved one without training), a Markdown table: HR@5,
HR@10, NDCG@5, NDCG@10, mean ± std over seeds on the test users, beside the paper's Table 1
with the gap to it for every row (on ML-1M and Beauty), the baselines beside independent
RecBole runs of them on Beauty (both read from published/), and a paired test of each
HyMoERec row against the best baseline.
Every run is trained by the package's entry point, ``python -m hymoerec.train``, in its own
process; the data flags and the flags this script does not know (e.g. ``--batch-size 256``)
are passed to every run. Finished runs in ``--run-root`` are reused, interrupted ones resumed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import hymoerec
from experiments.tables import (NO_VALUE, PERMUTATIONS, mean_std_cell, paired_test,
                                published)
from hymoerec.cli import ArgumentParser, fail
from hymoerec.data import leave_one_out
from hymoerec.evaluate import Recommender
from hymoerec.metrics import ndcg_gains, rank_metrics, rank_targets
from hymoerec.options import add_data_arguments, data_flags, parse_args
from hymoerec.atomic_write import replaced_atomically, write_text_atomically
from hymoerec.run_folder import (LAST_CHECKPOINT, LOG_FILE, SUMMARY_FILE, RunFolderError,
                                 check_output_path, read_log)
from hymoerec.settings import load_data

METRICS = ("HR@5", "HR@10", "NDCG@5", "NDCG@10")


@dataclass(frozen=True)
class Entry:
    """One row of the table: a backbone with an FFN kind, and the row of the paper's Table 1
    it is compared with (None: not in the paper)."""
    label: str
    model: str
    ffn: str
    paper_row: str | None
    is_hymoerec: bool = False


ENTRIES = (
    Entry("GRU4Rec", "gru4rec", "dense", "GRU4Rec"),
    Entry("NARM", "narm", "dense", "NARM"),
    Entry("BERT4Rec", "bert4rec", "dense", "BERT4Rec"),
    Entry("Mamba4Rec", "mamba4rec", "dense", "Mamba4Rec"),
    Entry("SASRec (dense FFN)", "sasrec", "dense", None),
    Entry("HyMoERec (SASRec backbone)", "sasrec", "hymoe", "HyMoERec", True),
    Entry("HyMoERec (Mamba4Rec backbone)", "mamba4rec", "hymoe", "HyMoERec", True),
)

# The paper's Table 1 and independent RecBole runs of the baselines on Beauty:
# {dataset: {row: {metric: value}}}. The paper has no SASRec row ('—' in the table), and it does
# not say which backbone its HyMoERec uses, so that row is shown beside both of ours.
PUBLISHED = published("paper_table1")
INDEPENDENT = published("recbole_independent")
NOT_IN_PAPER = NO_VALUE     # a row the paper's Table 1 does not have
GAP_METRICS = ("HR@10", "NDCG@10")


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


def run_entry(entry: Entry, seed: int, common: list[str], run_root: Path) -> dict:
    """Train (or reuse / resume) one entry for one seed with ``python -m hymoerec.train``;
    returns its summary. A run whose summary says it is not finished (``--max-minutes``
    stopped it) is resumed. A failed run ends this script with the run's exit code."""
    run_dir = run_root / run_name(entry.model, entry.ffn, seed)
    argv = common + ["--model", entry.model, "--ffn", entry.ffn, "--seed", str(seed),
                     "--run-dir", str(run_dir), "--no-progress"]
    summary_path = run_dir / SUMMARY_FILE
    if summary_path.is_file() and json.loads(summary_path.read_text()).get("finished", True):
        print(f"[reproduce] {entry.label} seed {seed}: reusing {summary_path}", flush=True)
        return json.loads(summary_path.read_text())
    print(f"[reproduce] {entry.label} seed {seed}: training in {run_dir}", flush=True)
    resume = ["--resume"] if (run_dir / LAST_CHECKPOINT).is_file() else []
    # the package this script imported, so the run trains the same code
    package_root = str(Path(hymoerec.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [package_root] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
    done = subprocess.run([sys.executable, "-m", "hymoerec.train", *argv, *resume], env=env)
    if done.returncode:
        raise fail(f"{entry.label} seed {seed}: training in {run_dir} failed (exit code "
                   f"{done.returncode}; its error is above)", done.returncode)
    return json.loads(summary_path.read_text())


def test_ranks(run_dir: Path, split, args: Namespace,
               exclude_history: bool | None = None) -> np.ndarray:
    """Per-user test rank counts (n, 2) int64 ``[above, tied]`` of the best checkpoint in
    run_dir (:mod:`hymoerec.metrics`), under the run's protocol unless ``exclude_history``
    is given."""
    rec = Recommender.from_checkpoint(run_dir, args.device)
    exclude = args.exclude_history if exclude_history is None else exclude_history
    return rank_targets(rec.model.rank_next, split.history("test"), split.targets("test"),
                        args.max_len, exclude, args.eval_batch_size, rec.device)


def mean_test(result: dict, metric: str) -> float:
    """Mean over seeds of one row's test ``metric``."""
    return float(np.mean([run["test"][metric] for run in result["runs"]]))


def gap(result: dict, reference: dict, metric: str = "NDCG@10") -> str:
    """Relative gap of one row's mean test ``metric`` to a reference number, as "+x.x%"."""
    return f"{100 * (mean_test(result, metric) / reference[metric] - 1):+.1f}%"


def published_row(label: str, paper_key: str | None) -> dict | None:
    """The paper's Table 1 numbers for our row ``label`` on dataset ``paper_key``; None when
    the paper has no such row (or no table for that data)."""
    entry = next((e for e in ENTRIES if e.label == label), None)
    if entry is None or entry.paper_row is None:
        return None
    return PUBLISHED.get(paper_key or "", {}).get(entry.paper_row)


def epochs_run(run: dict) -> str:
    """A run's epoch count, marked when the run is still training (--no-train tables)."""
    return f"{run['epochs_run']}" + ("" if run.get("finished", True) else " (still training)")


def other_protocol_table(results: dict, exclude_history: bool) -> str:
    """Mean test metrics under the protocol the runs were not trained with (history
    excluded for history-kept runs, and the other way round), from each best checkpoint."""
    how = ("removed from the ranking (history excluded)" if exclude_history
           else "kept in the ranking (history kept)")
    lines = [f"The same checkpoints with the user's earlier items {how}:", "",
             "| Model | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for label, result in results.items():
        lines.append(f"| {label} | " + " | ".join(
            mean_std_cell([run["test_other_protocol"][m] for run in result["runs"]]) for m in METRICS) + " |")
    return "\n".join(lines)


def markdown_table(results: dict, paper_key: str | None, header: list[str]) -> str:
    """The main table (ours beside the paper's Table 1 with the gaps, when ``paper_key`` is
    one of PUBLISHED), epochs and validation curves, from the JSON form of ``results``."""
    with_paper = paper_key in PUBLISHED
    columns = list(METRICS) + ([f"paper {m}" for m in METRICS]
                               + [f"gap {m} vs paper" for m in GAP_METRICS] if with_paper else [])
    lines = header + ["", "| Model | " + " | ".join(columns) + " |",
                      "|---" * (len(columns) + 1) + "|"]
    for label, result in results.items():
        cells = [mean_std_cell([run["test"][m] for run in result["runs"]]) for m in METRICS]
        if with_paper:
            paper = published_row(label, paper_key)
            cells += ([f"{paper[m]:.4f}" for m in METRICS]
                      + [gap(result, paper, m) for m in GAP_METRICS]
                      if paper else [NOT_IN_PAPER] * (len(METRICS) + len(GAP_METRICS)))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| Model | seeds | epochs run (per seed) | best epoch | train s / epoch | "
                  "code commit (per seed) | seen-item offset |", "|---|---|---|---|---|---|---|"]
    for label, result in results.items():
        runs = result["runs"]
        lines.append(f"| {label} | {', '.join(str(r['config']['seed']) for r in runs)} | "
                     f"{', '.join(epochs_run(r) for r in runs)} | "
                     f"{', '.join(str(r['best_epoch']) for r in runs)} | "
                     f"{np.mean([r['train_seconds_per_epoch'] for r in runs]):.1f} | "
                     f"{', '.join((r['commits'] or ['?'])[0][:7] for r in runs)} | "
                     f"{'on' if runs[0]['config'].get('seen_bias') else 'off'} |")
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
                     + f" | {gap(results[label], ref)} |")
    return "\n".join(lines)


def significance_tests(results: dict) -> dict:
    """Paired tests (per-user test NDCG@10, averaged over seeds) of each HyMoERec row
    against the baseline with the best mean NDCG@10: {row: {"against": baseline, ...}}."""
    baselines = {label: r for label, r in results.items() if not r["is_hymoerec"]}
    if not baselines:
        return {}
    best = max(baselines, key=lambda label: baselines[label]["ndcg10_per_user"].mean())
    return {label: {"against": best, **paired_test(result["ndcg10_per_user"],
                                                   baselines[best]["ndcg10_per_user"])}
            for label, result in results.items() if result["is_hymoerec"]}


def significance_section(tests: dict) -> str:
    """The paired tests of :func:`significance_tests` as a Markdown table."""
    if not tests:
        return ""
    best = next(iter(tests.values()))["against"]
    lines = [f"Paired test over test users of per-user NDCG@10 (mean over seeds) against the "
             f"best baseline, **{best}**: mean difference, relative gain, paired t, two-sided "
             f"sign-flip permutation p ({PERMUTATIONS} flips), 95% paired-bootstrap interval.", "",
             "| HyMoERec row | mean diff | rel. gain | t | p (permutation) | 95% CI |",
             "|---|---|---|---|---|---|"]
    for label, test in tests.items():
        lines.append(f"| {label} | {test['mean_diff']:+.5f} | {100 * test['relative_gain']:+.1f}% | "
                     f"{test['t']:.2f} | {test['p_permutation']:.4f} | "
                     f"[{test['ci95'][0]:+.5f}, {test['ci95'][1]:+.5f}] |")
    return "\n".join(lines)


def render(report: dict) -> str:
    """The Markdown of a report (the JSON that :func:`main` writes), from it alone: the
    settings come from its recorded command line and runs, the published numbers from
    PUBLISHED and INDEPENDENT."""
    opts, passthrough = build_parser().parse_known_args(report["command"][3:])
    paper_key = paper_dataset(opts)
    results = report["results"]
    first = next(iter(results.values()))["runs"][0]
    train_minutes = sum(run["train_seconds_per_epoch"] * run["epochs_run"]
                        for r in results.values() for run in r["runs"]) / 60
    budget = " ".join(opts.budget) or "none (full training with early stopping)"
    if paper_key in PUBLISHED:
        published = (f"the paper's Table 1 ({paper_key}); it has no SASRec row "
                     f"('{NOT_IN_PAPER}') and does not name its HyMoERec's backbone, so that row "
                     f"stands beside both of ours. Gaps: our mean relative to the paper's number.")
    else:
        published = "none for this data (the paper's Table 1 has ML-1M and Beauty)."
    header = [f"# Comparison on {report['data']}", "",
              f"Leave-one-out split, full ranking over all items on "
              f"{first['test']['n_head'] + first['test']['n_tail']} test users "
              f"({'history excluded' if first['config']['exclude_history'] else 'history kept'}); "
              f"seeds 1..{opts.seeds} (each row's below), mean ± sample std over seeds when "
              f"more than one.",
              f"Training budget per model: {budget}."
              + (" **Budgeted run: models are not trained to convergence; the numbers are "
                 "not comparable to published ones.**" if opts.budget else ""),
              f"Shared training flags: {' '.join(passthrough) or '(trainer defaults)'}; each "
              f"model starts from its paper's configuration. Total training time "
              f"{train_minutes:.1f} min.",
              f"Published numbers: {published}"]
    sections = [markdown_table(results, paper_key, header),
                other_protocol_table(results, not first["config"]["exclude_history"])
                if all("test_other_protocol" in run for r in results.values() for run in r["runs"])
                else "",
                independent_section(results, paper_key),
                significance_section(report["significance"])]
    return "\n\n".join(section for section in sections if section) + "\n"


def run_name(model: str, ffn: str, seed: int) -> str:
    """A run's folder name in --run-root (experiments/table_runs.sh names them alike)."""
    return f"{model}-{ffn}-s{seed}"


def ranks_path(report_json: Path) -> Path:
    """The file beside a results JSON that holds its runs' per-user test ranks."""
    return report_json.with_name(report_json.stem + "_ranks.npz")


def kept_runs(report_json: Path, data_described: str) -> dict[str, tuple[dict, np.ndarray]]:
    """``--keep-runs``: run folder name -> (run record, per-user test rank counts (n, 2)
    int64) of every finished run in an earlier results JSON and its ranks file (an
    unfinished one needs its folder to go on). ValueError naming the file unless both are
    readable and of the data ``data_described``."""
    try:
        report = json.loads(report_json.read_text())
        with np.load(ranks_path(report_json)) as saved:
            ranks = {name: saved[name].astype(np.int64) for name in saved.files}
    except (OSError, ValueError) as err:
        raise ValueError(f"--keep-runs {report_json}: cannot read it and its ranks file "
                         f"{ranks_path(report_json).name} ({err})") from None
    if report.get("data") != data_described:
        raise ValueError(f"--keep-runs {report_json}: its runs are of other data "
                         f"({report.get('data')!r}, not {data_described!r})")
    kept = {}
    for result in report["results"].values():
        for run in result["runs"]:
            name = run_name(result["model"], result["ffn"], run["config"]["seed"])
            if not run["finished"]:
                continue
            if name not in ranks:
                raise ValueError(f"--keep-runs {report_json}: no ranks of run {name} in "
                                 f"{ranks_path(report_json).name}")
            kept[name] = (run, ranks[name])
    return kept


def paper_dataset(opts: Namespace) -> str | None:
    """Whose published numbers a run's table shows: --paper-dataset, else --dataset or the
    --data-file name when it is a key of PUBLISHED."""
    data_name = Path(opts.data_file).stem if opts.data_file else opts.dataset
    return opts.paper_dataset or (data_name.lower() if data_name.lower() in PUBLISHED else None)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        description="Train every baseline and HyMoERec on one split and write the comparison "
                    "table. Unknown flags are passed to every training run (see "
                    "python -m hymoerec.train --help).")
    add_data_arguments(p.add_argument_group("data (train.py's flags)"))
    p.add_argument("--seeds", type=int, default=3,
                   help="seeds 1..N per model (as experiments/beauty_runs.sh)")
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
    p.add_argument("--no-train", action="store_true",
                   help="train nothing: the table of the runs in --run-root that have a "
                        "summary (e.g. of experiments/table_runs.sh), marking those still "
                        "training; rows without one are left out")
    p.add_argument("--keep-runs", metavar="JSON",
                   help="an earlier results JSON of this script on the same data (e.g. the "
                        "committed table's): its finished runs, with their per-user test "
                        "ranks (saved beside it), stand in for runs whose folder in "
                        "--run-root has no summary, so a table fills across machines that do "
                        "not keep run folders")
    p.add_argument("--render", metavar="JSON",
                   help="train nothing: re-render the Markdown of a saved results JSON (to "
                        "--out, default the .md next to it)")
    return p


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    opts, passthrough = parser.parse_known_args(argv)
    if opts.render:
        out = Path(opts.out) if opts.out else Path(opts.render).with_suffix(".md")
        check_outputs(parser, [out], [opts.render])
        return render_saved(Path(opts.render), out)
    if opts.seeds < 1:
        parser.error("--seeds must be >= 1")
    if opts.dataset == "synthetic" and not opts.data_file and opts.synthetic_seed is None:
        opts.synthetic_seed = 0   # one data set for every seed
    common = data_flags(opts) + opts.budget + passthrough
    train_args = parse_args(common)   # validates the passed-through flags
    data_name = Path(opts.data_file).stem if opts.data_file else opts.dataset
    paper_key = paper_dataset(opts)
    run_root = Path(opts.run_root or Path("runs") / f"reproduce-{data_name}")
    out = Path(opts.out) if opts.out else run_root / "table.md"
    check_outputs(parser, [out, out.with_suffix(".json"), ranks_path(out.with_suffix(".json"))],
                  [opts.keep_runs] if opts.keep_runs else [])
    entries = [e for e in ENTRIES if not opts.models or e.label in opts.models or e.model in opts.models]

    data = load_data(train_args)
    split = leave_one_out(data)
    try:
        kept = kept_runs(Path(opts.keep_runs), data.describe()) if opts.keep_runs else {}
    except ValueError as err:
        parser.error(str(err))
    results, ranks_by_run = {}, {}
    for entry in entries:
        runs, ndcg = [], []
        for seed in range(1, opts.seeds + 1):
            name = run_name(entry.model, entry.ffn, seed)
            run_dir = run_root / name
            summary_path = run_dir / SUMMARY_FILE
            if not summary_path.is_file() and name in kept:
                run, ranks_by_run[name] = kept[name]
                runs.append(run)
                ndcg.append(ndcg_gains(ranks_by_run[name], 10))
                continue
            if opts.no_train:
                if not summary_path.is_file():
                    continue
                summary = json.loads(summary_path.read_text())
            else:
                summary = run_entry(entry, seed, common, run_root)
            run_args = Namespace(**summary["config"])
            ranks = test_ranks(run_dir, split, run_args)
            recomputed = rank_metrics(ranks)
            if abs(recomputed["NDCG@10"] - summary["test"]["NDCG@10"]) > 1e-6:
                raise RuntimeError(f"{entry.label} seed {seed}: re-scored NDCG@10 "
                                   f"{recomputed['NDCG@10']} differs from the run's "
                                   f"{summary['test']['NDCG@10']}")
            curve = [r["valid"]["NDCG@10"] for r in read_log(run_dir / LOG_FILE)]
            other = rank_metrics(test_ranks(run_dir, split, run_args,
                                            not run_args.exclude_history))
            runs.append({**{k: summary[k] for k in ("test", "valid", "epochs_run", "best_epoch",
                                                    "train_seconds_per_epoch", "config")},
                         "finished": summary.get("finished", True), "test_other_protocol": other,
                         "commits": summary.get("commits", []), "valid_curve": curve})
            ndcg.append(ndcg_gains(ranks, 10))
            ranks_by_run[name] = ranks
        if not runs:
            continue
        results[entry.label] = {"model": entry.model, "ffn": entry.ffn,
                                "is_hymoerec": entry.is_hymoerec, "runs": runs,
                                "ndcg10_per_user": np.mean(ndcg, axis=0)}

    if not results:
        parser.error(f"--no-train: no run in {run_root} has a {SUMMARY_FILE}, so there is no "
                     f"table to make")
    tests = significance_tests(results)
    raw = {label: {k: v for k, v in r.items() if k != "ndcg10_per_user"} for label, r in results.items()}
    report = {"command": ["python", "-m", "experiments.reproduce"]
              + list(sys.argv[1:] if argv is None else argv),
              "data": data.describe(), "results": raw, "significance": tests,
              "independent_reference": INDEPENDENT.get(paper_key or "", {})}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    with replaced_atomically(ranks_path(out.with_suffix(".json"))) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **{name: r.astype(np.int32) for name, r in ranks_by_run.items()})
    table = render(report)
    write_text_atomically(out, table)
    print(table)
    print(f"[reproduce] wrote {out} and {out.with_suffix('.json')}")
    return {"results": results, "significance": tests, "table": out}


def check_outputs(parser: argparse.ArgumentParser, outputs: list[Path], inputs: list[str]) -> None:
    """parser.error (exit 2) when an output file would replace a file of a run folder or one
    of the ``inputs`` this invocation reads (run_folder.check_output_path)."""
    for path in outputs:
        try:
            check_output_path(path, "--out", tuple(inputs))
        except RunFolderError as err:
            parser.error(str(err))


def render_saved(report_path: Path, out: Path) -> dict:
    """``--render``: the Markdown of a saved report, written to ``out``; nothing is trained."""
    report = json.loads(report_path.read_text())
    write_text_atomically(out, render(report))
    print(f"[reproduce] rendered {report_path} to {out}")
    return {"results": report["results"], "significance": report["significance"], "table": out}


if __name__ == "__main__":
    main()
