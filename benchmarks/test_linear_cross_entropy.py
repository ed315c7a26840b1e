"""Benchmarks: fused ``linear_cross_entropy`` against the plain path
``F.cross_entropy(hidden @ weight.T, target, ignore_index=-100)``.

Run from the repository root (a few minutes on 2 CPU cores)::

    python -m pytest benchmarks/test_linear_cross_entropy.py \
        --benchmark-json=benchmarks/results/cpu_linear_cross_entropy.json
    python -m benchmarks.test_linear_cross_entropy \
        benchmarks/results/cpu_linear_cross_entropy.json \
        > benchmarks/results/cpu_linear_cross_entropy.md

Groups (ratios are read side by side within one run; nothing is asserted):

* ``lce-cpu-time``: forward + backward at Beauty's catalog (12,101 items, D = 64), rows =
  128 sequences x 50 positions, with every position scored ("all-real") and with 11.5 % of
  positions scored ("beauty-padding": Beauty's mean of 8.9 interactions per user, minus
  the 3 held out / shifted, over a max length of 50), at 1 and 2 torch threads.
* ``lce-cpu-memory-items``: peak memory of forward + backward for 10^4, 10^5, 10^6 items at
  2,048 rows (fewer than the 102,400 of a 2,048 x 50 batch so 10^6 items run in seconds;
  the fused working memory does not depend on the item count, see below).
* ``lce-cpu-memory-batch``: the fused path at the full 2,048 x 50 = 102,400 rows.
* ``lce-gpu-*``: the same comparisons on CUDA (skipped without a GPU), plus a single cuBLAS
  GEMM of the score shape as the yardstick for the fused forward.

CPU peak memory: each case runs in a fresh subprocess that builds its inputs, warms the op
up on a tiny problem (so code pages and thread pools are resident), then resets the kernel's
peak-RSS counter (``echo 5 > /proc/self/clear_refs``), runs forward + backward once and
reads ``VmHWM``. ``peak`` = VmHWM - VmRSS before the step, i.e. every byte the step
touched on top of its inputs; ``working`` = peak minus the two gradient tensors (M x D and
V x D), which every path must return. Torch's CPU allocator hands freed blocks back to
malloc; the subprocess runs with ``MALLOC_MMAP_THRESHOLD_=131072`` so that every freed
block over 128 KiB goes back to the OS and the high-water mark follows the live tensors
(without it, reused heap pages add a few MiB of noise). Memory cases run with 1 torch
thread; the torch path's score block is 8 MiB per thread, so its working set grows with the
thread count, never with the item count.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from hymoe_kernels.cross_entropy import linear_cross_entropy

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIM = 64
BEAUTY_ITEMS = 12_101
BEAUTY_REAL_FRACTION = 0.115
MIB = 1 << 20


def make_inputs(n_rows, n_items, real_fraction, device="cpu", dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n_rows, DIM, generator=gen) * 0.5).to(device, dtype).requires_grad_()
    weight = (torch.randn(n_items, DIM, generator=gen) * 0.5).to(device, dtype).requires_grad_()
    target = torch.randint(0, n_items, (n_rows,), generator=gen)
    target[torch.rand(n_rows, generator=gen) >= real_fraction] = -100
    return hidden, weight, target.to(device)


def plain_loss(hidden, weight, target):
    return F.cross_entropy(hidden @ weight.T, target, ignore_index=-100)


def fused_loss(hidden, weight, target):
    return linear_cross_entropy(hidden, weight, target)


LOSSES = {"plain": plain_loss, "fused": fused_loss}


def train_step(loss_fn, hidden, weight, target):
    hidden.grad = weight.grad = None
    loss_fn(hidden, weight, target).backward()


# ------------------------------------------------------------------------------- CPU time

@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("real", ["all-real", "beauty-padding"])
@pytest.mark.parametrize("path", ["plain", "fused"])
def test_cpu_time_beauty(benchmark, path, real, threads):
    benchmark.group = f"lce-cpu-time {real} threads={threads}"
    fraction = 1.0 if real == "all-real" else BEAUTY_REAL_FRACTION
    hidden, weight, target = make_inputs(128 * 50, BEAUTY_ITEMS, fraction)
    benchmark.extra_info.update(rows=hidden.shape[0], items=BEAUTY_ITEMS, dim=DIM,
                                real_fraction=fraction, threads=threads)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        benchmark.pedantic(train_step, args=(LOSSES[path], hidden, weight, target),
                           rounds=3, iterations=1, warmup_rounds=1)
    finally:
        torch.set_num_threads(previous)
    benchmark.extra_info["load_average"] = os.getloadavg()[0]  # other processes on the host


# ----------------------------------------------------------------------------- CPU memory

PEAK_SCRIPT = r"""
import json, sys
import torch
sys.path.insert(0, sys.argv[2])
import benchmarks.test_linear_cross_entropy as bench

def status_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])

case = json.loads(sys.argv[1])
torch.set_num_threads(case["threads"])
loss_fn = bench.LOSSES[case["path"]]
bench.train_step(loss_fn, *bench.make_inputs(64, 100, 1.0, seed=1))  # warm-up
hidden, weight, target = bench.make_inputs(case["rows"], case["items"], 1.0)
before = status_kib("VmRSS")
with open("/proc/self/clear_refs", "w") as clear_refs:
    clear_refs.write("5")  # reset VmHWM to the current RSS
bench.train_step(loss_fn, hidden, weight, target)
peak = (status_kib("VmHWM") - before) * 1024
grads = (hidden.grad.numel() + weight.grad.numel()) * hidden.grad.element_size()
print(json.dumps({"peak_bytes": peak, "grad_bytes": grads}))
"""


def measure_cpu_peak(path, rows, items, threads=1):
    """Peak bytes of one forward + backward above its inputs, in a fresh subprocess."""
    case = json.dumps({"path": path, "rows": rows, "items": items, "threads": threads})
    # a fixed mmap threshold makes glibc return every freed block over 128 KiB to the OS,
    # so RSS follows the live tensors instead of keeping freed heap pages
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, case, REPO_ROOT], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=600, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def record_cpu_peak(benchmark, path, rows, items):
    result = benchmark.pedantic(measure_cpu_peak, args=(path, rows, items), rounds=1,
                                iterations=1)
    benchmark.extra_info.update(
        rows=rows, items=items, dim=DIM, peak_mib=result["peak_bytes"] / MIB,
        working_mib=(result["peak_bytes"] - result["grad_bytes"]) / MIB,
        plain_logits_mib=rows * items * 4 / MIB)


@pytest.mark.parametrize("items", [10_000, 100_000, 1_000_000])
@pytest.mark.parametrize("path", ["plain", "fused"])
def test_cpu_memory_vs_items(benchmark, path, items):
    benchmark.group = "lce-cpu-memory-items rows=2048"
    if path == "plain" and items == 1_000_000:
        pytest.skip("plain path at 10^6 items: 2048 x 10^6 fp32 logits = 7.6 GiB, several "
                    "copies live in the backward; infeasible on the shared CPU machine")
    record_cpu_peak(benchmark, path, 2048, items)


def test_cpu_memory_full_batch(benchmark):
    benchmark.group = "lce-cpu-memory-batch rows=102400"
    record_cpu_peak(benchmark, "fused", 2048 * 50, 10_000)


# -------------------------------------------------------------------------------------- GPU

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cuda_timed(fn, *args):
    def run():
        fn(*args)
        torch.cuda.synchronize()
    return run


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op", ["cublas-gemm", "plain-forward", "fused-forward"])
def test_gpu_time_forward(benchmark, op, dtype):
    benchmark.group = f"lce-gpu-forward {str(dtype)[6:]}"
    hidden, weight, target = make_inputs(2048 * 50, BEAUTY_ITEMS, 1.0, "cuda", dtype)
    fns = {"cublas-gemm": lambda h, w, t: h @ w.T, "plain-forward": plain_loss,
           "fused-forward": fused_loss}
    with torch.no_grad():
        benchmark.pedantic(cuda_timed(fns[op], hidden, weight, target), rounds=20,
                           warmup_rounds=3)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("path", ["plain", "fused"])
def test_gpu_time_forward_backward(benchmark, path, dtype):
    benchmark.group = f"lce-gpu-forward-backward {str(dtype)[6:]}"
    hidden, weight, target = make_inputs(2048 * 50, BEAUTY_ITEMS, 1.0, "cuda", dtype)
    benchmark.pedantic(cuda_timed(train_step, LOSSES[path], hidden, weight, target),
                       rounds=10, warmup_rounds=2)


@needs_cuda
@pytest.mark.parametrize("items", [10_000, 100_000, 1_000_000])
@pytest.mark.parametrize("path", ["plain", "fused"])
def test_gpu_memory_vs_items(benchmark, path, items):
    benchmark.group = "lce-gpu-memory-items rows=102400"
    rows = 2048 * 50
    logits_bytes = rows * items * 4
    if path == "plain" and 3 * logits_bytes > torch.cuda.get_device_properties(0).total_memory:
        pytest.skip(f"plain path: {rows} x {items} fp32 logits = {logits_bytes / (1 << 30):.0f} "
                    "GiB, about 3 copies live in the backward: does not fit")
    hidden, weight, target = make_inputs(rows, items, 1.0, "cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(cuda_timed(train_step, LOSSES[path], hidden, weight, target), rounds=1)
    grads = (hidden.numel() + weight.numel()) * 4
    peak = torch.cuda.max_memory_allocated() - before
    benchmark.extra_info.update(rows=rows, items=items, dim=DIM, peak_mib=peak / MIB,
                                working_mib=(peak - grads) / MIB)


# ------------------------------------------------------------------------------ reporting

def plain_extrapolation(benches: list) -> list[str]:
    """Lines projecting the plain path's peak to 2,048 x 50 rows and 10^4..10^6 items from
    its measured peak / logits-size ratio (the plain peak grows linearly in rows x items)."""
    ratios = [b["extra_info"]["peak_mib"] / b["extra_info"]["plain_logits_mib"]
              for b in benches if "[plain" in b["name"]]
    if not ratios:
        return []
    ratio = max(ratios)
    gib = [ratio * 2048 * 50 * 10 ** exp * 4 / (1 << 30) for exp in (4, 5, 6)]
    projected = ", ".join(f"10^{exp} items: {size:,.0f} GiB" for exp, size in zip((4, 5, 6), gib))
    return ["", f"Plain path: measured peak = {ratio:.2f} x the fp32 logits; projected to "
                f"2,048 x 50 rows: {projected} (this machine has 24 GiB)."]


def render_markdown(results: dict) -> str:
    """A markdown summary of a --benchmark-json file: per group, each case's time and its
    ratio to the group's fastest case, or for memory groups the peak and working MiB."""
    cpu = results["machine_info"].get("cpu", {}).get("brand_raw", "?")
    lines = ["# linear_cross_entropy benchmarks", "",
             f"Machine: {cpu}; torch {torch.__version__}. Generated by `python -m "
             "benchmarks.test_linear_cross_entropy <json>`; method and shapes in the module "
             "docstring of benchmarks/test_linear_cross_entropy.py.", ""]
    groups: dict[str, list] = {}
    for bench in results["benchmarks"]:
        groups.setdefault(bench["group"], []).append(bench)
    for group, benches in groups.items():
        lines += [f"## {group}", ""]
        if "peak_mib" in benches[0]["extra_info"]:
            lines += ["| case | peak MiB | working MiB (peak - grads) | plain logits MiB |",
                      "| --- | --- | --- | --- |"]
            for b in benches:
                info = b["extra_info"]
                lines.append(f"| {b['name']} | {info['peak_mib']:.1f} | "
                             f"{info['working_mib']:.1f} | "
                             f"{info.get('plain_logits_mib', float('nan')):.1f} |")
            lines += plain_extrapolation(benches)
        else:
            fastest = min(b["stats"]["min"] for b in benches)
            lines += ["| case | min time (s) | mean time (s) | min / fastest min | "
                      "host load average |", "| --- | --- | --- | --- | --- |"]
            for b in benches:
                stats = b["stats"]
                load = b["extra_info"].get("load_average", float("nan"))
                lines.append(f"| {b['name']} | {stats['min']:.4f} | {stats['mean']:.4f} | "
                             f"{stats['min'] / fastest:.2f} | {load:.1f} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1]) as json_file:
        print(render_markdown(json.load(json_file)))
