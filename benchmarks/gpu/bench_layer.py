"""Time the HyMoE layer on a GPU: forward and forward+backward of every implementation.

Paths, each on the same inputs, side by side:

* ``dense``     -- the plain position-wise FFN (torch, cuBLAS): the floor any MoE pays on top of;
* ``eager``     -- :func:`hymoe_kernels.hymoe_op.reference.hymoe_reference`;
* ``compiled``  -- ``torch.compile`` of the reference (compile time excluded, within a budget);
* ``grouped``   -- :func:`hymoe_kernels.hymoe_triton` with ``path="grouped"``;
* ``fused_tile``-- the same with ``path="fused"`` (the fused token-tile kernels), where
  ``fused_tile_supported``.

Times are medians of ``triton.testing.do_bench`` (which also flushes L2 between runs), with the
inputs rotated over copies that together exceed L2. For each row the table gives the ratios to
dense and to the eager/compiled reference, and the fraction of the H200 ceilings reached:
HBM (minimal bytes: x, y, weights once; backward adds dy, dx and the weight gradients) and
tensor-core FLOP/s for 16-bit dtypes or FMA FLOP/s for fp32 (active FLOPs: dense FFN + k
experts + router; backward counted as twice the forward).

``--dry-run`` runs every path once at a tiny size on the CPU (Triton paths need
TRITON_INTERPRET=1) and writes the same reports, so the script is checked without a GPU.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from hymoe_kernels.hymoe_op.fused_tile import fused_tile_supported
from hymoe_kernels.hymoe_op.reference import hymoe_reference
from hymoe_kernels.hymoe_op.triton_backend import hymoe_triton
from hymoe_kernels.weights import HyMoEWeights

H200_HBM_BYTES_PER_S = 4.3e12
H200_PEAK_FLOPS = {"bf16": 790e12, "fp16": 790e12, "fp32": 67e12}   # dense tensor core / FMA
L2_ROTATION_BYTES = 256 * 2**20        # rotated inputs span this much memory (H200 L2: 60 MB)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PATHS = ("dense", "eager", "compiled", "grouped", "fused_tile")
FULL_TOKENS = (256 * 50, 256 * 200)
FULL_SHAPES = ((64, 256), (128, 512), (512, 2048))


@dataclass(frozen=True)
class Case:
    """One benchmark problem: tokens x D with hidden F, E experts, top-k, dtype name."""

    tokens: int
    D: int
    F: int
    E: int
    top_k: int
    dtype: str


def dense_ffn(x, w1, b1, w2, b2):
    """The plain PFFN the layer replaces: gelu(x @ w1 + b1) @ w2 + b2."""
    return F.gelu(F.linear(x, w1.t(), b1)) @ w2 + b2


def make_inputs(case: Case, device: str, copies: int, seed: int = 0):
    """``copies`` different (x, dy, mask), one HyMoEWeights (requires_grad), alpha_param, ramp."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dtype = DTYPES[case.dtype]
    D = case.D
    sizes = (D, D, case.E, case.F)            # router hidden width H = D
    weights = HyMoEWeights(*(((torch.rand(s, generator=gen) * 2 - 1) * fan ** -0.5)
                             .to(device, dtype).requires_grad_()
                             for s, fan in zip(HyMoEWeights.shapes(*sizes),
                                               HyMoEWeights.fan_in(*sizes))))
    batches = []
    for _ in range(copies):
        x = torch.randn(case.tokens, D, generator=gen).to(device, dtype).requires_grad_()
        dy = torch.randn(case.tokens, D, generator=gen).to(device, dtype)
        mask = (torch.rand(case.tokens, generator=gen) < 0.9).to(device)
        batches.append((x, dy, mask))
    alpha_param = torch.zeros((), device=device).requires_grad_()
    ramp = torch.ones((), device=device)
    return batches, weights, alpha_param, ramp


def path_function(path: str, compiled_reference: Callable | None) -> Callable | None:
    """The HyMoE function of ``path`` (hymoe_reference's signature), or None if unavailable."""
    if path == "eager":
        return hymoe_reference
    if path == "compiled":
        return compiled_reference
    if path in ("grouped", "fused_tile"):
        return functools.partial(hymoe_triton, path="fused" if path == "fused_tile" else "grouped")
    raise ValueError(f"unknown path {path!r}")


def make_step(path: str, case: Case, batches, weights, alpha_param, ramp, backward: bool,
              compiled_reference: Callable | None) -> Callable[[], object] | None:
    """A no-argument callable running one forward (and backward) on the next input copy."""
    counter = [0]
    dprob_sum = torch.randn(case.E, device=alpha_param.device)
    if path == "dense":
        dense_weights = weights.dense

        def step():
            x, dy, _ = batches[counter[0] % len(batches)]
            counter[0] += 1
            if not backward:
                with torch.no_grad():
                    return dense_ffn(x, *dense_weights)
            y = dense_ffn(x, *dense_weights)
            return torch.autograd.grad(y, [x, *dense_weights], dy)
        return step

    fn = path_function(path, compiled_reference)
    if fn is None or (path == "fused_tile" and not fused_tile_supported(
            case.D, case.F, case.E, case.D, case.top_k, DTYPES[case.dtype])):
        return None

    def step():
        x, dy, mask = batches[counter[0] % len(batches)]
        counter[0] += 1
        if not backward:
            with torch.no_grad():
                return fn(x, mask, weights, alpha_param, ramp, case.top_k)
        y, prob_sum, _ = fn(x, mask, weights, alpha_param, ramp, case.top_k)
        return torch.autograd.grad([y, prob_sum], [x, *weights, alpha_param], [dy, dprob_sum])
    return step


def rel_diff(step: Callable, reference_step: Callable) -> float:
    """max |y - y_ref| / max |y_ref| of the next forward of two paths on the same input."""
    y, y_ref = step()[0].float(), reference_step()[0].float()
    return ((y - y_ref).abs().max() / y_ref.abs().max()).item()


def work(case: Case, backward: bool) -> tuple[float, float]:
    """(minimal HBM bytes, active FLOPs) of one call."""
    itemsize = DTYPES[case.dtype].itemsize
    D, Fh, E, H, N = case.D, case.F, case.E, case.D, case.tokens
    weight_bytes = itemsize * ((E + 1) * (2 * D * Fh + Fh + D) + D * H + H + H * E + E)
    token_bytes = itemsize * N * D * 2 + N                       # x, y, mask
    flops_per_token = 2 * 2 * D * Fh * (1 + case.top_k) + 2 * (D * H + H * E)
    if not backward:
        return token_bytes + weight_bytes, flops_per_token * N
    # backward: read x, dy, write dx; read weights again, write their gradients
    return (token_bytes + itemsize * N * D * 3 + 3 * weight_bytes, 3 * flops_per_token * N)


def time_step(step: Callable[[], object], device: str, dry_run: bool) -> float:
    """Median milliseconds of one call."""
    if dry_run or device != "cuda":
        start = time.perf_counter()
        step()
        return (time.perf_counter() - start) * 1e3
    import triton.testing
    return triton.testing.do_bench(step, warmup=10, rep=60, return_mode="median")


def machine_info(device: str) -> dict:
    import triton
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "host": platform.node(), "python": platform.python_version(),
            "torch": torch.__version__, "triton": triton.__version__, "device": device}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, sm_count=props.multi_processor_count,
                    gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}")
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                            text=True, check=True).stdout.strip()
        info["git_dirty"] = bool(subprocess.run(["git", "status", "--porcelain"],
                                                capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        info["git_commit"] = "unknown"
    return info


def run(cases: list[Case], paths: tuple[str, ...], device: str, dry_run: bool,
        compile_budget_s: float, on_row: Callable[[list[dict]], None]) -> list[dict]:
    """Time every case x path x (forward, forward+backward); one row per (case, mode);
    ``on_row(rows so far)`` after each row (so a run cut short still leaves its results)."""
    compiled_reference = None
    if "compiled" in paths:
        torch._dynamo.config.cache_size_limit = 64
        compiled_reference = torch.compile(hymoe_reference)
    compile_spent = 0.0
    rows = []
    for case in cases:
        itemsize = DTYPES[case.dtype].itemsize
        copies = 1 if dry_run else max(2, min(16, L2_ROTATION_BYTES // (case.tokens * case.D * itemsize * 2)))
        batches, weights, alpha_param, ramp = make_inputs(case, device, copies)
        for backward in (False, True):
            row = {**asdict(case), "mode": "fwd+bwd" if backward else "fwd", "ms": {}, "notes": {}}
            for path in paths:
                if path == "compiled" and compile_spent > compile_budget_s:
                    row["notes"][path] = "skipped: compile budget spent"
                    continue
                step = make_step(path, case, batches, weights, alpha_param, ramp, backward,
                                 compiled_reference)
                if step is None:
                    row["notes"][path] = "not available for this shape/checkout"
                    continue
                try:
                    start = time.perf_counter()
                    step()                            # compile / autotune-free first call
                    if device == "cuda":
                        torch.cuda.synchronize()
                    if path == "compiled":
                        compile_spent += time.perf_counter() - start
                    row["ms"][path] = time_step(step, device, dry_run)
                    if dry_run and not backward and path not in ("dense", "eager"):
                        eager_step = make_step("eager", case, batches, weights, alpha_param,
                                               ramp, False, None)
                        row["notes"][path] = f"y vs eager: {rel_diff(step, eager_step):.1e}"
                except Exception as error:            # report the failure, keep timing the rest
                    row["notes"][path] = f"failed: {type(error).__name__}: {str(error)[:300]}"
            bytes_moved, flops = work(case, backward)
            row["min_bytes"], row["active_flops"] = bytes_moved, flops
            rows.append(row)
            print(format_row(row), flush=True)
            on_row(rows)
    return rows


def derived(row: dict, path: str) -> dict:
    """Ratios and ceiling fractions of one path's time in ``row``."""
    ms = row["ms"][path]
    seconds = ms * 1e-3
    out = {"ms": ms,
           "hbm_fraction": row["min_bytes"] / seconds / H200_HBM_BYTES_PER_S,
           "flop_fraction": row["active_flops"] / seconds / H200_PEAK_FLOPS[row["dtype"]]}
    for base in ("dense", "eager", "compiled"):
        if base in row["ms"]:
            out[f"x_vs_{base}"] = ms / row["ms"][base]
    return out


def format_row(row: dict) -> str:
    cells = [f"{path}={row['ms'][path]:.3f}ms" for path in PATHS if path in row["ms"]]
    return (f"{row['tokens']:>6} tok D={row['D']:<4} F={row['F']:<5} {row['dtype']} "
            f"{row['mode']:<7} " + " ".join(cells))


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets, evaluated on the measured rows (reported, never asserted)."""
    lines = []
    for row in rows:
        fast = [p for p in ("fused_tile", "grouped") if p in row["ms"]]
        if row["dtype"] != "bf16" or row["mode"] != "fwd+bwd" or not fast:
            continue
        best = min(fast, key=lambda p: row["ms"][p])
        d = derived(row, best)
        if row["tokens"] == 51200 and row["D"] == 64 and row["F"] == 256:
            for base, goal, op in (("eager", 5.0, ">="), ("compiled", 2.0, ">="),
                                   ("dense", 1.5, "<=")):
                if f"x_vs_{base}" not in d:
                    continue
                if base == "dense":
                    value = d["x_vs_dense"]
                    met = value <= goal
                    lines.append(f"D=64 bf16 fwd+bwd {best}: {value:.2f}x dense time "
                                 f"(target <= {goal}x): {'met' if met else 'NOT met'}")
                else:
                    speedup = 1.0 / d[f"x_vs_{base}"]
                    met = speedup >= goal
                    lines.append(f"D=64 bf16 fwd+bwd {best}: {speedup:.2f}x faster than {base} "
                                 f"(target >= {goal}x): {'met' if met else 'NOT met'}")
        if row["D"] == 512:
            met = d["flop_fraction"] >= 0.5
            lines.append(f"D=512 {row['tokens']} tok bf16 fwd+bwd {best}: "
                         f"{100 * d['flop_fraction']:.1f}% of bf16 peak (target >= 50%): "
                         f"{'met' if met else 'NOT met'}")
    return lines


def markdown(rows: list[dict], info: dict) -> str:
    lines = ["# HyMoE layer timings", "",
             "Machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), "",
             f"Median ms (triton.testing.do_bench). HBM % = minimal bytes / time / "
             f"{H200_HBM_BYTES_PER_S / 1e12} TB/s; FLOP % = active FLOPs / time / peak "
             f"({', '.join(f'{k} {v / 1e12:.0f} TF/s' for k, v in H200_PEAK_FLOPS.items())}); "
             "ratios are time / baseline time (< 1 = faster).", "",
             "| tokens | D | F | dtype | mode | path | ms | x dense | x eager | x compiled | HBM % "
             "| FLOP % | notes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for path in PATHS:
            if path not in row["ms"]:
                if path in row["notes"]:
                    lines.append(f"| {row['tokens']} | {row['D']} | {row['F']} | {row['dtype']} | "
                                 f"{row['mode']} | {path} | | | | | | | {row['notes'][path]} |")
                continue
            d = derived(row, path)

            def ratio(key):
                return f"{d[key]:.2f}" if key in d else ""
            lines.append(f"| {row['tokens']} | {row['D']} | {row['F']} | {row['dtype']} | "
                         f"{row['mode']} | {path} | {d['ms']:.3f} | {ratio('x_vs_dense')} | "
                         f"{ratio('x_vs_eager')} | {ratio('x_vs_compiled')} | "
                         f"{100 * d['hbm_fraction']:.1f} | {100 * d['flop_fraction']:.1f} | "
                         f"{row['notes'].get(path, '')} |")
    lines += ["", "## Targets (reported, not asserted)", ""]
    lines += [f"- {line}" for line in targets(rows)] or ["- no bf16 fwd+bwd rows measured"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="folder for bench_layer.json / bench_layer.md "
                        "(default benchmarks/results/gpu-<date>)")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes on the CPU, one call per path (checks the script)")
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--compile-budget-s", type=float, default=150.0,
                        help="stop timing torch.compile once its compilations took this long")
    args = parser.parse_args(argv)
    paths = tuple(args.paths.split(","))
    unknown = set(paths) - set(PATHS)
    if unknown:
        parser.error(f"--paths: unknown {sorted(unknown)}; choose from {PATHS}")
    dtypes = args.dtypes.split(",")
    if set(dtypes) - set(DTYPES):
        parser.error(f"--dtypes: choose from {tuple(DTYPES)}")
    if args.dry_run:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        cases = [Case(24, 16, 32, 4, 2, dtype) for dtype in dtypes]
        paths = tuple(p for p in paths if p != "compiled")
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: use --dry-run to check the script on the CPU")
        device = "cuda"
        cases = [Case(tokens, D, Fh, 4, 2, dtype) for dtype in dtypes
                 for D, Fh in FULL_SHAPES for tokens in FULL_TOKENS]
    out = args.out or os.path.join("benchmarks", "results",
                                   "gpu-" + datetime.date.today().isoformat())
    os.makedirs(out, exist_ok=True)
    info = machine_info(device)

    def save(rows: list[dict]) -> None:
        report = {"machine": info, "dry_run": args.dry_run, "rows": rows,
                  "derived": [{path: derived(row, path) for path in row["ms"]} for row in rows],
                  "targets": targets(rows)}
        with open(os.path.join(out, "bench_layer.json"), "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=1)
        with open(os.path.join(out, "bench_layer.md"), "w", encoding="utf-8") as handle:
            handle.write(markdown(rows, info))

    rows = run(cases, paths, device, args.dry_run, args.compile_budget_s, save)
    print(markdown(rows, info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
