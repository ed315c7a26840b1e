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


def warm_up(device: str, seconds: float) -> None:
    """Run fp32 matmuls, GELUs and their backward on ``device`` for about ``seconds``, so
    that the first benchmark of a process does not pay for thread-pool start-up, allocator
    growth and the CPU clocking up (the first group measured slow without it).

    On the CPU it first allocates and frees buffers of up to 32 MiB: glibc serves a large
    block with a fresh mmap (page faults on every touch) until a freed mmapped block raises
    its threshold, so without this the first benchmarks pay page faults the later ones
    do not, in a steady-state training process none do."""
    if device == "cpu":
        for mib in (1, 4, 16, 32):
            torch.ones(mib << 18)            # mib MiB of float32, touched, then freed
    x = torch.randn(4096, 256, device=device, requires_grad=True)
    w = torch.randn(256, 256, device=device, requires_grad=True)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        torch.nn.functional.gelu(x @ w).sum().backward()
        synchronize(device)


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
                  references: dict[str, Callable[[], object]] | None = None) -> None:
    """Time ``fn`` with pytest-benchmark and record its peak memory in extra_info.

    One untimed warm-up call (compilation, allocator warm-up) comes first; the number of
    rounds is chosen from a second call so the benchmark takes about TARGET_SECONDS.
    ``references`` (e.g. the group's dense FFN and naive expert loop), when given, each run
    before every round, outside pytest-benchmark's timing but timed here with the same
    timer; their medians go to extra_info["reference_median_s"][name], so ``fn``'s median
    divided by a reference's compares the two under the same machine load, round by round
    (on a shared machine the load drifts between tests).
    """
    references = references or {}

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
    reference_seconds: dict[str, list[float]] = {name: [] for name in references}
    timer = getattr(benchmark, "_timer", time.perf_counter)   # the --benchmark-timer

    def time_references() -> None:
        for name, reference in references.items():
            start = timer()
            reference()
            synchronize(device)
            reference_seconds[name].append(timer() - start)

    for reference in references.values():                    # their own warm-up call
        reference()
    benchmark.pedantic(call, setup=time_references if references else None,
                       rounds=rounds, iterations=1, warmup_rounds=0)
    if references:
        benchmark.extra_info["reference_median_s"] = {
            name: statistics.median(seconds) for name, seconds in reference_seconds.items()}
