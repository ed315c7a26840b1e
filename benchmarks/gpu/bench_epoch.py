"""How much slower is HyMoERec than SASRec to train: seconds per training epoch of SASRec
with the dense FFN and with HyMoE FFNs (the Triton kernels, each path, and the PyTorch
backend), in fp32 and under bf16 autocast, and each one's ratio to the dense model of the
same precision.

The data: ``../shared/data/beauty.txt`` next to the repository (or ``--data-file``), else a
synthetic set of Beauty's shape (22,363 users, 12,101 items, about 9 items per user);
``--tiny`` takes a tiny synthetic set (the CPU test). Each variant is trained as
``hymoerec/train.py`` trains it (``parse_args`` + ``Trainer``, the data's default
settings, batches of 2,048 targets): a few warm-up steps first (Triton compiles its kernels
on their first launch, cuBLAS picks its algorithms), then one whole epoch
(``Trainer.train_epoch``, the devices synchronised before and after), timed. bf16 runs the
forward and the loss under ``torch.autocast(dtype=torch.bfloat16)`` (the backward follows
the forward's dtypes). A Triton path is chosen by binding ``path=`` of
``hymoe_kernels.hymoe_op.triton_backend.hymoe_triton``, the function the HyMoE layer calls
for its Triton backend. Triton variants are timed on CUDA only (the CPU interpreter's times would mean
nothing); elsewhere they are listed as skipped. Results (JSON + Markdown) are rewritten after each variant, and no variant
starts once ``--budget-s`` is spent, so a run cut short keeps what it measured.

    python -m benchmarks.gpu.bench_epoch --out OUT                 # GPU: ~30 s; CPU: minutes
    python -m benchmarks.gpu.bench_epoch --tiny --out /tmp/x       # seconds on a CPU
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED_BEAUTY = REPO.parent / "shared" / "data" / "beauty.txt"
BEAUTY_SHAPE = dict(users=22_363, items=12_101, length=9)      # the synthetic stand-in
TINY_SHAPE = dict(users=150, items=200, length=8, batch_size=128)
# (name, --ffn, --backend, Triton path or None), in the order they run
VARIANTS = [("dense FFN (SASRec)", "dense", "auto", None),
            ("HyMoE, Triton fused tile", "hymoe", "triton", "fused"),
            ("HyMoE, Triton grouped", "hymoe", "triton", "grouped"),
            ("HyMoE, torch backend", "hymoe", "torch", None)]
PRECISIONS = ("bf16", "fp32")     # bf16 first, as the layer timings


@contextlib.contextmanager
def triton_path(path: str | None):
    """The HyMoE layer's Triton backend runs ``path`` ("fused" / "grouped") inside."""
    if path is None:
        yield
        return
    from hymoe_kernels.hymoe_op import triton_backend
    original = triton_backend.hymoe_triton
    triton_backend.hymoe_triton = functools.partial(original, path=path)
    try:
        yield
    finally:
        triton_backend.hymoe_triton = original


def data_flags(data_file: str | None, tiny: bool) -> tuple[list[str], str]:
    """train.py's data flags and a description: the Beauty file, or the synthetic set."""
    if data_file and not tiny:
        shown = os.path.relpath(data_file, REPO) if Path(data_file).is_absolute() else data_file
        return ["--data-file", data_file, "--format", "sequences"], f"{shown} (sequences)"
    shape = TINY_SHAPE if tiny else BEAUTY_SHAPE
    flags = ["--synthetic-users", str(shape["users"]), "--synthetic-items", str(shape["items"]),
             "--synthetic-length", str(shape["length"]), "--synthetic-seed", "0"]
    return flags, (f"synthetic, {shape['users']:,} users, {shape['items']:,} items, mean "
                   f"length {shape['length']}" + ("" if tiny else " (Beauty's shape)"))


def time_epoch(flags: list[str], precision: str, path: str | None, warmup_steps: int) -> dict:
    """Seconds of one training epoch of the model ``flags`` describe (module docstring)."""
    import torch

    from hymoerec import options, train

    with tempfile.TemporaryDirectory(prefix="bench_epoch-") as run_dir:
        trainer = train.Trainer(options.parse_args(flags + ["--run-dir", run_dir, "--overwrite"]))
        device = trainer.device
        if precision == "bf16":
            loss = trainer.train_loss

            def autocast_loss(inputs, targets):
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    return loss(inputs, targets)
            trainer.train_loss = autocast_loss

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        with triton_path(path):
            if warmup_steps:
                trainer.train_epoch(max_steps=warmup_steps)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync()
            steps_before = trainer.step
            wall, cpu = time.perf_counter(), time.process_time()
            record = trainer.train_epoch()
            sync()
            seconds, cpu_seconds = time.perf_counter() - wall, time.process_time() - cpu
        windows = trainer.windows
        return {"seconds": round(seconds, 4), "cpu_seconds": round(cpu_seconds, 4),
                "steps": trainer.step - steps_before,
                "targets": int(windows.lengths.sum() - len(windows)),
                "loss": round(record["loss"], 4), "device": str(device),
                "peak_gpu_bytes": (torch.cuda.max_memory_allocated(device)
                                   if device.type == "cuda" else None),
                "data": trainer.data.describe(), "max_len": trainer.args.max_len,
                "model": {name: getattr(trainer.config, name) for name in
                          ("d_model", "n_layers", "dropout", "num_experts", "top_k")}}


def markdown(report: dict) -> str:
    measured = [r for r in report["rows"].values() if "seconds" in r]
    model = (", ".join(f"{k} {v}" for k, v in measured[0]["model"].items())
             + f", max_len {measured[0]['max_len']}") if measured else "not run"
    lines = [f"# One training epoch: HyMoERec against SASRec ({report['machine']['when']})", "",
             f"{report['machine']['device']}, torch {report['machine']['torch']}"
             f"{', triton ' + report['machine']['triton'] if report['machine']['triton'] else ''}."
             f" Data: {report['data']}. SASRec ({model}; the HyMoE settings apply to the "
             f"HyMoE rows), batches of {report['batch_size']:,} targets, Adam; each epoch "
             f"after {report['warmup_steps']} warm-up steps; ratio: seconds per epoch over "
             f"the dense FFN's in the same precision (on a CPU, CPU seconds and their ratio in "
             f"parentheses: a shared machine's wall seconds include other work).", "",
             "| FFN | " + " | ".join(f"{p} s / epoch | {p} ratio to dense" for p in PRECISIONS)
             + " |", "|---|" + "---:|---:|" * len(PRECISIONS)]
    for name, *_ in VARIANTS:
        cells = [name]
        for precision in PRECISIONS:
            row = report["rows"].get(f"{name} | {precision}")
            if row is None:
                cells += ["not run", ""]
            elif "seconds" not in row:
                cells += [row.get("skipped") or f"failed: {row['failed']}", ""]
            else:
                on_cpu = row["device"] == "cpu"      # a shared CPU: CPU seconds beside
                cells += [f"{row['seconds']:.3f}" + (f" ({row['cpu_seconds']:.3f} CPU)" if on_cpu else ""),
                          f"{row['ratio_to_dense']:.2f}" + (f" ({row['cpu_ratio_to_dense']:.2f} CPU)"
                                                             if on_cpu else "")]
        lines.append("| " + " | ".join(cells) + " |")
    if measured:
        lines += ["", f"{measured[0]['steps']} steps and {measured[0]['targets']:,} targets "
                      f"per epoch."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for epoch.json / epoch.md")
    parser.add_argument("--data-file", default=str(SHARED_BEAUTY) if SHARED_BEAUTY.is_file() else None,
                        help="a 'sequences' file (default: ../shared/data/beauty.txt when "
                             "present, else synthetic data of Beauty's shape)")
    parser.add_argument("--tiny", action="store_true", help=f"tiny synthetic data {TINY_SHAPE}")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--batch-size", type=int, default=None,
                        help="targets per step (default 2048, train.py's on real data; "
                             "128 with --tiny)")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads, train.py's --threads (0: torch's default)")
    parser.add_argument("--budget-s", type=float, default=0.0,
                        help="start no variant after this many seconds (0: no limit)")
    args = parser.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = TINY_SHAPE["batch_size"] if args.tiny else 2048
    if args.data_file and not Path(args.data_file).is_file():
        parser.error(f"--data-file {args.data_file}: no such file")
    if args.batch_size < 1 or args.warmup_steps < 0 or args.budget_s < 0 or args.threads < 0:
        parser.error("--batch-size must be >= 1, --warmup-steps, --budget-s and --threads >= 0")
    import torch

    from hymoerec.settings import pick_device
    try:
        device = pick_device(args.device)
    except ValueError as err:
        parser.error(str(err))
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    # the interpreter (TRITON_INTERPRET=1) runs the kernels on a CPU for testing, far too
    # slowly for its epoch times to mean anything: Triton variants are timed on CUDA only
    triton_runs = triton_version is not None and device.type == "cuda"
    flags, described = data_flags(args.data_file, args.tiny)
    # no seen-item offset: the epochs compare the FFNs with the loss the paper trains
    flags += ["--batch-size", str(args.batch_size), "--epochs", "1", "--device", device.type,
              "--seed", "1", "--threads", str(args.threads), "--no-progress", "--no-seen-bias"]
    report = {"machine": {"when": time.strftime("%Y-%m-%d"),
                          "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                                     else f"CPU ({platform.processor() or platform.machine()}, "
                                          f"threads: {args.threads or torch.get_num_threads()})"),
                          "torch": torch.__version__, "triton": triton_version,
                          "python": platform.python_version()},
              "data": described, "batch_size": args.batch_size,
              "warmup_steps": args.warmup_steps, "rows": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    failed = False
    for precision in PRECISIONS:
        for name, ffn, backend, path in VARIANTS:
            key = f"{name} | {precision}"
            if backend == "triton" and not triton_runs:
                row = {"skipped": "needs CUDA"}
            elif args.budget_s and time.perf_counter() - started > args.budget_s:
                row = {"skipped": f"budget of {args.budget_s:.0f} s spent"}
            else:
                print(f"{key} ...", flush=True)
                try:
                    row = time_epoch(flags + ["--ffn", ffn, "--backend", backend], precision,
                                     path, args.warmup_steps)
                except (RuntimeError, ValueError) as err:   # e.g. a path the shape lacks
                    row = {"failed": " ".join(str(err).split())[:300]}
                    failed = True
                dense = row if ffn == "dense" else report["rows"][f"{VARIANTS[0][0]} | {precision}"]
                if "seconds" in row and "seconds" in dense:
                    row["ratio_to_dense"] = round(row["seconds"] / dense["seconds"], 4)
                    row["cpu_ratio_to_dense"] = round(row["cpu_seconds"] / dense["cpu_seconds"], 4)
            report["rows"][key] = row
            print(f"{key}: {json.dumps(row)}", flush=True)
            (out / "epoch.json").write_text(json.dumps(report, indent=1) + "\n")
            (out / "epoch.md").write_text(markdown(report))
    print(markdown(report))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
