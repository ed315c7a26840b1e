"""The whole recommender on a large catalog: synthetic data with 1,000,000 items and about
5,000,000 interactions, a fixed number of training steps and full-ranking evaluation of
10,000 users, with the fused cross-entropy (the default) and with ``--plain-loss``.

A full epoch is out of reach on a CPU: the full-softmax loss costs about
4 x 2 x targets x items x d_model FLOP (forward, and the backward's recomputed scores and
two gradient products), 2 x 10^12 FLOP per step of 2,048 targets over 10^6 items at
d_model 64, and an epoch has about 2,200 such steps. So each variant trains ``--steps``
steps of the epoch (``Trainer.train_epoch(max_steps=...)``, the training loop of
``hymoerec/train.py`` itself) and the epoch's time is *extrapolated* from them, labelled as
such: batches per epoch x measured seconds per step.

Each variant runs in a fresh process (one thread) that builds everything as
``python hymoerec/train.py --synthetic-items ...`` does (``parse_args`` + ``Trainer``: data,
leave-one-out split, training windows, head/tail split, model, Adam), then trains, then
ranks the test item of the first ``--eval-users`` evaluated users among all items
(``metrics.evaluate_ranking``, as validation and test do). It reports per stage wall and
CPU seconds and the peak resident memory above the process's baseline after its imports
(the kernel's peak counter is reset at the baseline, ``/proc/self/clear_refs``), and the
largest tensor any torch operation allocated (a dispatch mode watches every operation's
outputs, forward and backward; views are not allocations). The process's address space is
capped at ``--memory-limit-gib`` above that baseline, so a variant that needs more fails
with torch's "tried to allocate N bytes" (recorded: the point where it fails) instead of
pushing the machine into swap or the OOM killer.

    python -m benchmarks.bench_large_catalog --out benchmarks/results        # ~5 CPU minutes
    python -m benchmarks.bench_large_catalog --tiny --out /tmp/x             # seconds (the test)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.process_memory import reset_peak, status_bytes

REPO = Path(__file__).resolve().parents[1]
# the loss variants: their train.py flags (no seen-item offset, whose bitset grows with the
# catalog: the subject here is the fused loss against the plain one)
VARIANTS = {"fused": ["--no-seen-bias"], "plain": ["--plain-loss", "--no-seen-bias"]}
TINY = dict(users=80, items=100_000, length=8, steps=2, eval_users=20, batch_size=150,
            plain_batch_sizes=[150], memory_limit_gib=4.0)


class Stage:
    """A ``with`` block timed (wall, CPU) with its peak resident memory above ``baseline``,
    recorded into ``record[name]``; an exception of ``failures`` inside is recorded as
    ``{"failed": message}`` and stops the variant (``Stage.failed``)."""

    def __init__(self, record: dict, name: str, baseline: int, failures=(RuntimeError, MemoryError)):
        self.record, self.name, self.baseline, self.failures = record, name, baseline, failures
        self.failed = False

    def __enter__(self):
        reset_peak()
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, kind, err, tb):
        entry = {"seconds": round(time.perf_counter() - self.wall, 3),
                 "cpu_seconds": round(time.process_time() - self.cpu, 3),
                 "peak_above_baseline_bytes": status_bytes("VmHWM") - self.baseline}
        if err is not None and isinstance(err, self.failures):
            entry["failed"] = " ".join(str(err).split())[:400]
            self.failed = True
        self.record[self.name] = entry
        return self.failed


def measure(variant: str, users: int, items: int, length: int, steps: int, eval_users: int,
            batch_size: int, memory_limit_gib: float) -> dict:
    """One variant in this process (see the module docstring); call in a fresh one."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from hymoerec import options, train
    from hymoerec.data import bucketed_batches
    from hymoerec.metrics import evaluate_ranking

    class LargestTensor(TorchDispatchMode):
        """Records the largest tensor an operation allocates: (bytes, op, shape, dtype)."""

        def __init__(self):
            super().__init__()
            self.largest = (0, "", (), "")

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for value in tree_flatten(out)[0]:
                if isinstance(value, torch.Tensor) and not value._is_view():
                    size = value.numel() * value.element_size()
                    if size > self.largest[0]:
                        self.largest = (size, str(func), tuple(value.shape), str(value.dtype))
            return out

    torch.set_num_threads(1)
    run_dir = tempfile.mkdtemp(prefix="large_catalog-")
    flags = ["--synthetic-users", str(users), "--synthetic-items", str(items),
             "--synthetic-length", str(length), "--synthetic-seed", "0", "--batch-size",
             str(batch_size), "--epochs", "1", "--threads", "1", "--device", "cpu",
             "--no-progress", *VARIANTS[variant]]
    argv = flags + ["--run-dir", run_dir, "--overwrite"]
    record = {"variant": variant, "flags": flags, "steps": steps, "batch_size": batch_size}
    baseline = status_bytes("VmRSS")
    if memory_limit_gib > 0:          # 0: no cap (a test calling this in its own process)
        limit = status_bytes("VmSize") + int(memory_limit_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
    record["memory_limit_gib"] = memory_limit_gib
    watch = LargestTensor()

    with Stage(record, "setup", baseline) as stage:     # data, split, windows, model, Adam
        trainer = train.Trainer(options.parse_args(argv))
    if stage.failed:
        return record
    data, split = trainer.data, trainer.split
    n_batches = len(bucketed_batches(trainer.windows, batch_size, torch.Generator().manual_seed(0)))
    record["data"] = {"users": data.n_users, "items": data.n_items,
                      "interactions": data.n_interactions,
                      "items_seen_in_training": int((split.train_item_counts()[1:] > 0).sum()),
                      "training_windows": len(trainer.windows),
                      "training_targets": int(trainer.windows.lengths.sum() - len(trainer.windows)),
                      "evaluated_users": len(split.eval_users), "batches_per_epoch": n_batches,
                      "max_len": trainer.args.max_len}
    record["parameters"] = sum(p.numel() for p in trainer.model.parameters())
    with watch, Stage(record, "train", baseline) as stage:
        epoch = trainer.train_epoch(max_steps=steps)
    if stage.failed:
        record["largest_tensor"] = list(watch.largest)
        return record
    record["train"]["loss"] = epoch["loss"]
    per_step = record["train"]["seconds"] / steps
    per_step_cpu = record["train"]["cpu_seconds"] / steps
    record["train"]["seconds_per_step"] = round(per_step, 3)
    record["train"]["cpu_seconds_per_step"] = round(per_step_cpu, 3)
    record["epoch_extrapolated"] = {"seconds": round(per_step * n_batches),
                                    "cpu_seconds": round(per_step_cpu * n_batches)}
    if eval_users:
        histories = split.history("test")[:eval_users]
        targets = split.targets("test")[:eval_users]
        trainer.model.eval()
        with watch, Stage(record, "evaluate", baseline) as stage:
            metrics = evaluate_ranking(trainer.model.rank_next, histories, targets, trainer.head,
                                       trainer.args.max_len,
                                       batch_size=trainer.args.eval_batch_size)
        if not stage.failed:
            record["evaluate"].update(users=len(targets), **{
                k: metrics[k] for k in ("HR@10", "NDCG@10", "n_head", "n_tail")})
    record["largest_tensor"] = list(watch.largest)
    record["adam_state_bytes"] = sum(
        t.numel() * t.element_size() for state in trainer.optimizer.state.values()
        for t in state.values() if torch.is_tensor(t))
    weight = trainer.model.item_emb.weight
    record["item_embedding_bytes"] = weight.numel() * weight.element_size()
    shutil.rmtree(run_dir, ignore_errors=True)
    return record


def run_one(variant: str, settings: dict, batch_size: int, timeout: float) -> dict:
    """:func:`measure` in a fresh process with one thread."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    args = [variant, settings["users"], settings["items"], settings["length"], settings["steps"],
            settings["eval_users"], batch_size, settings["memory_limit_gib"]]
    code = ("import json, sys; from benchmarks.bench_large_catalog import measure; "
            "a = sys.argv[1:]; print(json.dumps(measure(a[0], *map(int, a[1:7]), float(a[7]))))")
    try:
        done = subprocess.run([sys.executable, "-W", "ignore", "-c", code, *map(str, args)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "batch_size": batch_size, "error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        return {"variant": variant, "batch_size": batch_size, "error": tail}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- report

def _mib(value) -> str:
    return f"{value / 2**20:,.0f}"


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"# The recommender on a large catalog ({report['machine']['when']})", "",
             f"{report['machine']['cpu']}, {report['machine']['cores']} cores (shared with "
             f"other work; one thread here), torch {report['machine']['torch']}. Synthetic "
             f"data (`--synthetic-users {s['users']} --synthetic-items {s['items']} "
             f"--synthetic-length {s['length']}`), SASRec with HyMoE FFNs (the defaults), "
             f"{s['steps']} training steps of the first epoch, then (fused loss only: "
             f"evaluation does not use the loss) full-ranking evaluation of the test items "
             f"of {s['eval_users']:,} users over all items. Peak: resident "
             f"memory above the process's baseline after imports, per stage. Address space "
             f"capped at {s['memory_limit_gib']} GiB above the baseline.", ""]
    data = next((r["data"] for r in report["rows"] if "data" in r), None)
    if data:
        lines += [f"Data: {data['users']:,} users, {data['items']:,} items "
                  f"({data['items_seen_in_training']:,} of them in the training sequences), "
                  f"{data['interactions']:,} interactions; {data['training_windows']:,} "
                  f"training windows (max_len {data['max_len']}) with "
                  f"{data['training_targets']:,} targets; {data['evaluated_users']:,} users "
                  f"with a test item.", ""]
    lines += ["| loss | targets / step | setup s (CPU s) | setup peak MiB | s / step (CPU s) | "
              "train peak MiB | evaluation s (CPU s) | evaluation peak MiB | largest tensor | "
              "epoch, extrapolated | result |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    for row in report["rows"]:
        name = "fused (default)" if row["variant"] == "fused" else "plain (`--plain-loss`)"
        if "error" in row:
            lines.append(f"| {name} | {row['batch_size']:,} | {row['error']} |||||||||")
            continue
        cells = [name, f"{row['batch_size']:,}"]
        for stage in ("setup", "train", "evaluate"):
            entry = row.get(stage)
            if entry is None:
                cells += ["", ""]
                continue
            seconds = (f"{entry['seconds_per_step']:.1f} ({entry['cpu_seconds_per_step']:.1f})"
                       if "seconds_per_step" in entry else
                       f"{entry['seconds']:.1f} ({entry['cpu_seconds']:.1f})")
            cells += ["failed" if "failed" in entry else seconds,
                      _mib(entry["peak_above_baseline_bytes"])]
        largest = row.get("largest_tensor")
        cells.append(f"{_mib(largest[0])} MiB ({largest[1]}, {tuple(largest[2])})"
                     if largest and largest[0] else "")
        epoch = row.get("epoch_extrapolated")
        cells.append(f"{epoch['seconds'] / 3600:.1f} h ({epoch['cpu_seconds'] / 3600:.1f} h CPU)"
                     if epoch else "")
        failed = [f"{stage}: {row[stage]['failed']}" for stage in ("setup", "train", "evaluate")
                  if stage in row and "failed" in row[stage]]
        result = "; ".join(failed) if failed else f"loss {row['train']['loss']:.3f}" + (
            f", HR@10 {row['evaluate']['HR@10']:.4f}" if "evaluate" in row else "")
        lines.append("| " + " | ".join(cells + [result]) + " |")
    lines += ["", "The epoch column is extrapolated, not measured: batches per epoch x the "
              "measured seconds per step (which include the epoch's batching once). The "
              "memory of the fixed parts: item embedding "
              + ", ".join(f"{_mib(r['item_embedding_bytes'])} MiB, Adam's state "
                          f"{_mib(r['adam_state_bytes'])} MiB" for r in report["rows"][:1]
                          if "adam_state_bytes" in r) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for cpu_large_catalog.json / .md")
    parser.add_argument("--users", type=int, default=250_000,
                        help="synthetic users (x --length = the interactions)")
    parser.add_argument("--items", type=int, default=1_000_000, help="synthetic items")
    parser.add_argument("--length", type=int, default=20, help="mean sequence length")
    parser.add_argument("--steps", type=int, default=3, help="training steps per variant")
    parser.add_argument("--eval-users", type=int, default=10_000, help="users ranked")
    parser.add_argument("--batch-size", type=int, default=2048,
                        help="next-item targets per step (train.py's default on real data)")
    parser.add_argument("--plain-batch-sizes", default="2048,256",
                        help="batch sizes of the --plain-loss runs, comma separated")
    parser.add_argument("--memory-limit-gib", type=float, default=8.0,
                        help="address space allowed above each process's baseline (0: no cap)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per variant")
    parser.add_argument("--tiny", action="store_true",
                        help=f"a tiny configuration with many items: {TINY}")
    args = parser.parse_args(argv)
    try:
        plain_sizes = [int(b) for b in args.plain_batch_sizes.split(",") if b]
    except ValueError:
        parser.error(f"--plain-batch-sizes {args.plain_batch_sizes!r}: expected integers "
                     f"separated by commas")
    settings = {"users": args.users, "items": args.items, "length": args.length,
                "steps": args.steps, "eval_users": args.eval_users,
                "batch_size": args.batch_size, "plain_batch_sizes": plain_sizes,
                "memory_limit_gib": args.memory_limit_gib}
    if args.tiny:
        settings.update(TINY)
    for name in ("users", "items", "steps", "eval_users", "batch_size"):
        if settings[name] < (2 if name in ("users", "items") else 1):
            parser.error(f"--{name.replace('_', '-')} must be >= {2 if name in ('users', 'items') else 1}, "
                         f"got {settings[name]}")
    if settings["length"] < 5:
        parser.error(f"--length must be >= 5, got {settings['length']}")
    if any(b < 1 for b in settings["plain_batch_sizes"]) or not settings["memory_limit_gib"] >= 0:
        parser.error("--plain-batch-sizes must be >= 1 and --memory-limit-gib >= 0")
    import torch

    report = {"machine": {"when": time.strftime("%Y-%m-%d"), "cpu": platform.processor()
                          or platform.machine(), "cores": os.cpu_count(),
                          "python": platform.python_version(), "torch": torch.__version__},
              "settings": settings, "rows": []}
    try:
        with open("/proc/cpuinfo") as f:
            report["machine"]["cpu"] = next(line.split(":", 1)[1].strip() for line in f
                                            if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # evaluation does not depend on the loss: the plain-loss runs only train
    plan = [("fused", settings["batch_size"], settings["eval_users"])] + [
        ("plain", b, 0) for b in settings["plain_batch_sizes"]]
    for variant, batch_size, eval_users in plan:
        print(f"{variant} loss, {batch_size} targets per step ...", flush=True)
        row = run_one(variant, dict(settings, eval_users=eval_users), batch_size, args.timeout)
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
        (out / "cpu_large_catalog.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / "cpu_large_catalog.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all("error" not in row for row in report["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
