"""What the study tables share: the published numbers (data files in published/), the
mean ± std cell, and the paired test over users."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

PUBLISHED_DIR = Path(__file__).resolve().parent / "published"
PERMUTATIONS = 10_000
NO_VALUE = "—"


def published(name: str) -> dict:
    """The tables of published/<name>.json: {dataset: {row: {metric: value}}} (its "source"
    says where the numbers come from)."""
    return json.loads((PUBLISHED_DIR / f"{name}.json").read_text(encoding="utf-8"))["tables"]


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value) of ``values``."""
    mean = float(np.mean(values))
    return mean, (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def format_mean_std(mean: float, std: float | None, digits: int = 4) -> str:
    """"mean ± std" with ``digits`` decimals, or the mean alone when ``std`` is None."""
    return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def mean_std_cell(values: list[float], digits: int = 4) -> str:
    """The table cell of ``values`` over seeds: :func:`format_mean_std` of their
    :func:`mean_std`, NO_VALUE when there are none."""
    return format_mean_std(*mean_std(values), digits) if len(values) else NO_VALUE


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
