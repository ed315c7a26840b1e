"""Full-ranking evaluation: HR@K and NDCG@K over all items (no sampled negatives), overall
and split by item popularity (head = top 20% of items by training frequency)."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .data import last_items, pad_right

CUTOFFS = (5, 10, 20)


def target_ranks(scores: Tensor, targets: Tensor, history: Tensor | None = None) -> Tensor:
    """0-based rank of each target among all items: the number of items scored strictly
    higher. scores (B, V + 1) float (column 0 = padding, ignored); targets (B,) int64;
    history (B, H) int64 right-padded with 0 or None: those items are removed from the
    ranking (the target itself is never removed). Returns (B,) int64."""
    scores = scores.clone()
    scores[:, 0] = float("-inf")
    rows = torch.arange(scores.shape[0], device=scores.device)
    target_scores = scores[rows, targets]
    if history is not None:
        scores.scatter_(1, history, float("-inf"))
    return (scores > target_scores.unsqueeze(1)).sum(dim=1)


def ndcg_gains(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-user NDCG@k (n,) float64 of 0-based ranks (n,) int: 1 / log2(rank + 2) when the
    target is in the top k, else 0 (one relevant item, so the ideal DCG is 1)."""
    ranks = np.asarray(ranks)
    return np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)


def rank_metrics(ranks: np.ndarray, cutoffs=CUTOFFS) -> dict[str, float]:
    """HR@K (target in the top K) and NDCG@K (:func:`ndcg_gains`), averaged over the ranks
    (n,) int; NaN when there are none."""
    ranks = np.asarray(ranks)
    out = {}
    for k in cutoffs:
        out[f"HR@{k}"] = float((ranks < k).mean()) if len(ranks) else float("nan")
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
    """0-based rank (n,) int64 of every user's target among all items, from
    ``rank_fn(inputs (B, L), targets (B,), excluded (B, H) or None) -> (B,)`` int64 (e.g. a
    model's ``rank_next``, or :func:`target_ranks` of full scores) in batches of histories
    sorted by length (less padding). The model sees the last max_len items of each history;
    ``exclude_history`` removes all of the user's earlier items from the ranking.

    Sharded evaluation (one shard per process): ``shard`` = (index, count) scores only every
    count-th user of the length order from index on, leaving the other users' ranks 0, and
    ``combine`` (e.g. a sum over processes) turns that (n,) int64 array into all users' ranks."""
    order = np.argsort([len(h) for h in histories], kind="stable")[shard[0]::shard[1]]
    ranks = np.zeros(len(histories), dtype=np.int64)
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
