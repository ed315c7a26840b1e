"""Shared benchmark plumbing: devices, size preset, timing rounds and peak memory.

``HYMOE_BENCH_SIZE=tiny`` shrinks every benchmark to its smallest shape (the test suite
runs ``pytest benchmarks/ --benchmark-disable`` that way so the benchmarks cannot rot).

Peak memory is the largest amount of memory allocated by one call on top of what was
allocated before it (parameters, inputs and saved state excluded), in bytes:

* CUDA: ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` before the call,
  after ``reset_peak_memory_stats()``.
* CPU: the CPU allocator has no peak counter, so the call runs once under
  ``torch.profiler.profile(profile_memory=True)``, which records every allocation and free
  of a tensor's storage (size and time); replaying them in time order gives the live bytes
  after each event, and the peak is their maximum. Memory the C++ kernels take outside
  tensor storage (e.g. BLAS packing buffers) is not seen; it is small and the same for
  every variant.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from typing import Callable

import torch

TINY = os.environ.get("HYMOE_BENCH_SIZE", "full") == "tiny"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Wall time per benchmark to aim for when choosing its number of rounds.
TARGET_SECONDS = 0.01 if TINY else 1.5
MIN_ROUNDS, MAX_ROUNDS = 3, 30


def synchronize(device: str) -> None:
    """Wait for queued work on ``device`` (no-op on CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak bytes allocated during one call of ``fn`` beyond those live before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def run_benchmark(benchmark, fn: Callable[[], object], device: str,
                  baseline: Callable[[], object] | None = None) -> None:
    """Time ``fn`` with pytest-benchmark and record its peak memory in extra_info.

    One untimed warm-up call (compilation, allocator warm-up) comes first; the number of
    rounds is chosen from a second call so the benchmark takes about TARGET_SECONDS.
    ``baseline`` (the group's dense FFN), when given, runs before every round, outside
    pytest-benchmark's timing but timed here with the same timer; its median goes to
    extra_info["baseline_median_s"], so the ratio of the two compares them under the same
    machine load, round by round (on a shared machine the load drifts between tests).
    """
    def call() -> None:
        fn()
        synchronize(device)

    if benchmark.disabled:          # --benchmark-disable: run once, as a smoke test
        benchmark.pedantic(call, rounds=1, iterations=1)
        return
    call()
    start = time.perf_counter()
    call()
    once = time.perf_counter() - start
    benchmark.extra_info["peak_mem_bytes"] = peak_memory_bytes(fn, device)
    benchmark.extra_info.update(device=device, torch=torch.__version__,
                                threads=torch.get_num_threads())
    if device == "cuda":
        benchmark.extra_info["gpu"] = torch.cuda.get_device_name()
    rounds = min(MAX_ROUNDS, max(MIN_ROUNDS, math.ceil(TARGET_SECONDS / max(once, 1e-6))))
    baseline_seconds: list[float] = []
    timer = getattr(benchmark, "_timer", time.perf_counter)   # the --benchmark-timer

    def time_baseline() -> None:
        start = timer()
        baseline()
        synchronize(device)
        baseline_seconds.append(timer() - start)

    if baseline is not None:
        baseline()
    benchmark.pedantic(call, setup=time_baseline if baseline is not None else None,
                       rounds=rounds, iterations=1, warmup_rounds=0)
    if baseline_seconds:
        benchmark.extra_info["baseline_median_s"] = statistics.median(baseline_seconds)
