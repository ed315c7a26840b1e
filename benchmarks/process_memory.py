"""This process's resident memory, from /proc/self (Linux), for the benchmarks that measure
the peak memory of one stage in a fresh process (bench_readers, bench_large_catalog)."""
from __future__ import annotations


def status_bytes(key: str) -> int:
    """A /proc/self/status value in bytes: VmRSS (resident now), VmHWM (peak resident since
    the start or the last :func:`reset_peak`), VmSize (address space)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak() -> bool:
    """Restart the kernel's peak counter (VmHWM) at the resident memory of now; False
    where /proc/self/clear_refs cannot be written (the peak then counts from the start)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True
