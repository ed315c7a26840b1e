"""Full-ranking evaluation: HR@K and NDCG@K over all items (no sampled negatives), overall
and split by item popularity (head = top 20% of items by training frequency).

A target's rank is kept as two counts over the other ranked items, ``[above, tied]``: the
items scoring strictly higher and those scoring exactly the same. Ties are broken at
random, in expectation: the 0-based rank is uniform on above..above + tied (expected rank
above + tied / 2), and HR@K / NDCG@K are their expectations over that draw. So ties never
favour the target: a model whose scores are all equal gets HR@K = K / n_items, like chance.
A NaN or infinite score is an error (NonFiniteScoresError), never a metric.

The rank counts come from :mod:`hymoe_kernels.cross_entropy.streaming_scores`: its
``streaming_rank``, which the models use, streams ``hidden @ weight.T`` over item chunks,
so evaluation memory does not grow with the catalog, and ``target_ranks`` counts them
from full scores (the readable definition).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .data import last_items, pad_right

CUTOFFS = (5, 10, 20)


def expected_rank(ranks: np.ndarray) -> np.ndarray:
    """Expected 0-based rank (n,) float64 of rank counts (n, 2) ``[above, tied]``."""
    ranks = np.asarray(ranks)
    return ranks[:, 0] + ranks[:, 1] / 2.0


def _expected_share(ranks: np.ndarray, k: int, weights: np.ndarray) -> np.ndarray:
    """Mean of ``weights[r]`` over the rank r uniform on above..above + tied, with weights
    (k,) for ranks 0..k-1 and 0 from rank k on; (n,) float64 of rank counts (n, 2)."""
    ranks = np.asarray(ranks, dtype=np.int64).reshape(-1, 2)
    above, tied = ranks[:, 0], ranks[:, 1]
    cumulative = np.concatenate([[0.0], np.cumsum(weights)])      # (k + 1,)
    first, stop = np.minimum(above, k), np.minimum(above + tied + 1, k)
    return (cumulative[stop] - cumulative[first]) / (tied + 1.0)


def hit_rates(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-user expected HR@k (n,) float64 of rank counts (n, 2): the chance that the
    target is in the top k when its ties are broken at random."""
    return _expected_share(ranks, k, np.ones(k))


def ndcg_gains(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-user expected NDCG@k (n,) float64 of rank counts (n, 2): the mean over tie
    breaks of 1 / log2(rank + 2) when the target is in the top k, else 0 (one relevant
    item, so the ideal DCG is 1)."""
    return _expected_share(ranks, k, 1.0 / np.log2(np.arange(k) + 2.0))


def rank_metrics(ranks: np.ndarray, cutoffs=CUTOFFS) -> dict[str, float]:
    """HR@K (:func:`hit_rates`) and NDCG@K (:func:`ndcg_gains`) averaged over rank counts
    (n, 2) int; NaN when there are none."""
    ranks = np.asarray(ranks).reshape(-1, 2)
    out = {}
    for k in cutoffs:
        out[f"HR@{k}"] = float(hit_rates(ranks, k).mean()) if len(ranks) else float("nan")
        out[f"NDCG@{k}"] = float(ndcg_gains(ranks, k).mean()) if len(ranks) else float("nan")
    return out


def head_items(train_counts: np.ndarray, head_fraction: float = 0.2) -> np.ndarray:
    """(n_items + 1,) bool: the ceil(head_fraction * n_items) most frequent items in
    training (ties broken by item index); index 0 (padding) is never head."""
    n_items = len(train_counts) - 1
    n_head = int(np.ceil(head_fraction * n_items))
    order = np.argsort(-train_counts[1:], kind="stable") + 1
    head = np.zeros(n_items + 1, dtype=bool)
    head[order[:n_head]] = True
    return head


def popularity_metrics(ranks: np.ndarray, targets: np.ndarray, head: np.ndarray) -> dict:
    """Overall metrics plus ``head/...`` and ``tail/...`` over users whose target is a head
    or a tail item, and the user counts ``n_head`` / ``n_tail``."""
    is_head = head[targets]
    out = rank_metrics(ranks)
    out.update({f"head/{k}": v for k, v in rank_metrics(ranks[is_head]).items()})
    out.update({f"tail/{k}": v for k, v in rank_metrics(ranks[~is_head]).items()})
    out["n_head"], out["n_tail"] = int(is_head.sum()), int((~is_head).sum())
    return out


@torch.no_grad()
def rank_targets(rank_fn: Callable[[Tensor, Tensor, Tensor | None], Tensor],
                 histories: list[np.ndarray],
                 targets: np.ndarray, max_len: int, exclude_history: bool = False,
                 batch_size: int = 1024, device: str | torch.device = "cpu",
                 shard: tuple[int, int] = (0, 1),
                 combine: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Rank counts (n, 2) int64 ``[above, tied]`` of every user's target among all items,
    from ``rank_fn(inputs (B, L), targets (B,), excluded (B, H) or None) -> (B, 2)`` int64
    (e.g. a model's ``rank_next``, or ``target_ranks`` of full scores) in batches of
    histories sorted by length (less padding). The model sees the last max_len items of
    each history; ``exclude_history`` removes all of the user's earlier items from the
    ranking. No users, or a batch_size below 1, is a ValueError.

    Sharded evaluation (one shard per process): ``shard`` = (index, count) scores only every
    count-th user of the length order from index on, leaving the other users' counts 0, and
    ``combine`` (e.g. a sum over processes) turns that (n, 2) int64 array into all users'."""
    if not histories:
        raise ValueError("there are no users to evaluate")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"the evaluation batch size must be an int >= 1, got {batch_size!r}")
    order = np.argsort([len(h) for h in histories], kind="stable")[shard[0]::shard[1]]
    ranks = np.zeros((len(histories), 2), dtype=np.int64)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch_histories = [histories[i] for i in idx]
        inputs = pad_right(last_items(batch_histories, max_len)).to(device)
        excluded = pad_right(batch_histories).to(device) if exclude_history else None
        batch_targets = torch.from_numpy(targets[idx]).to(device)
        ranks[idx] = rank_fn(inputs, batch_targets, excluded).cpu().numpy()
    return ranks if combine is None else combine(ranks)


def evaluate_ranking(rank_fn: Callable[[Tensor, Tensor, Tensor | None], Tensor],
                     histories: list[np.ndarray],
                     targets: np.ndarray, head: np.ndarray, max_len: int,
                     exclude_history: bool = False, batch_size: int = 1024,
                     device: str | torch.device = "cpu", shard: tuple[int, int] = (0, 1),
                     combine: Callable[[np.ndarray], np.ndarray] | None = None) -> dict:
    """:func:`popularity_metrics` of the ranks of :func:`rank_targets` (same arguments)."""
    ranks = rank_targets(rank_fn, histories, targets, max_len, exclude_history, batch_size,
                         device, shard, combine)
    return popularity_metrics(ranks, targets, head)


def format_metrics(metrics: dict) -> str:
    """HR/NDCG@{5,10,20} of :func:`popularity_metrics`, all / head / tail, as a text table."""
    keys = [f"{m}@{k}" for m in ("HR", "NDCG") for k in CUTOFFS]
    lines = ["            " + " ".join(f"{k:>9}" for k in keys)]
    for group, prefix in (("all", ""), ("head", "head/"), ("tail", "tail/")):
        lines.append(f"{group:>11} " + " ".join(f"{metrics[prefix + k]:9.4f}" for k in keys))
    return "\n".join(lines)
