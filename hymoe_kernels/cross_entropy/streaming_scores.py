"""Streamed scoring: the rank of a target, or the top-k items, among all items of the scores
``hidden @ weight.T``, computed over item chunks (:mod:`.score_chunks`, as the fused loss
walks them) so that memory does not grow with the catalog.

A target's rank is kept as two counts over the other ranked items, ``[above, tied]``: the
items scoring strictly higher and those scoring exactly the same (a caller breaks ties at
random, in expectation). A NaN or infinite score is an error (NonFiniteScoresError), never a
rank.

:func:`target_ranks` counts from a full (B, V + 1) score matrix whose column 0 is a padding
item: the readable definition. :func:`streaming_rank` and :func:`streaming_topk` compute
the same from ``hidden @ weight.T`` streamed over item chunks; the tests check them against
:func:`target_ranks`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .score_chunks import (add_offset_, check_chunk_size, check_hidden_weight, compute_dtype,
                           distinct_items, offset_of_targets, scatter_row_items,
                           score_block_elements)


class NonFiniteScoresError(FloatingPointError):
    """A ranking met a NaN or infinite score, so no rank is defined (e.g. a diverged model)."""


def _raise_unless_finite(finite: Tensor) -> None:
    """NonFiniteScoresError unless ``finite`` (0-d bool) is true."""
    if not bool(finite):
        raise NonFiniteScoresError("the scores hold NaN or infinite values, so no ranking is "
                                   "defined (a diverged model or corrupt weights)")


def target_ranks(scores: Tensor, targets: Tensor, history: Tensor | None = None) -> Tensor:
    """Rank counts (B, 2) int64 ``[above, tied]`` of each target among all items (module
    docstring), from full scores. scores (B, V + 1) float (column 0 = padding, ignored);
    targets (B,) int64; history (B, H) int64 right-padded with 0 or None: those items are
    removed from the ranking (the target itself is never removed, nor counted). Raises
    NonFiniteScoresError if a score (other than padding's) is NaN or infinite."""
    _raise_unless_finite(torch.isfinite(scores[:, 1:]).all())
    rows = torch.arange(scores.shape[0], device=scores.device)
    target_scores = scores[rows, targets].unsqueeze(1)
    ranked = torch.ones_like(scores, dtype=torch.bool)
    ranked[:, 0] = False
    if history is not None:
        ranked.scatter_(1, history, False)
    ranked[rows, targets] = False
    return torch.stack([(ranked & (scores > target_scores)).sum(dim=1),
                        (ranked & (scores == target_scores)).sum(dim=1)], dim=1)


def _eval_chunk(n_rows: int, n_items: int, chunk_size: int | None, device: torch.device) -> int:
    """Items per streamed chunk: ``chunk_size``, or a block of about the budget's scores on
    ``device`` (at least 256 items)."""
    budget = score_block_elements(device)
    return min(n_items, chunk_size or max(256, budget // max(n_rows, 1)))


def _check_eval_args(hidden: Tensor, weight: Tensor, exclude: Tensor | None,
                     padding_idx: int | None, chunk_size: int | None,
                     offset_items: Tensor | None = None) -> None:
    """TypeError / ValueError for arguments of streaming_topk / streaming_rank out of range."""
    check_hidden_weight(hidden, weight)
    check_chunk_size(chunk_size)
    n_items = weight.shape[0]
    if padding_idx is not None and not (isinstance(padding_idx, int)
                                        and 0 <= padding_idx < n_items):
        raise ValueError(f"padding_idx must be None or an int in [0, {n_items}), "
                         f"got {padding_idx!r}")
    for name, items in (("exclude", exclude), ("offset_items", offset_items)):
        if items is None:
            continue
        if not isinstance(items, Tensor) or items.dim() != 2 \
                or items.shape[0] != hidden.shape[0]:
            got = tuple(items.shape) if isinstance(items, Tensor) else type(items)
            raise ValueError(f"{name} must be an (M, L) tensor with M = {hidden.shape[0]}, "
                             f"got {got}")
        if items.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must hold int64 item ids, got dtype {items.dtype}")
        if items.device != hidden.device:
            raise ValueError(f"{name} must be on hidden's device {hidden.device}, "
                             f"got {items.device}")
        if items.numel() and int(items.max()) >= n_items:
            raise ValueError(f"{name} holds item id {int(items.max())} >= n_items = {n_items}")


def _listed_offset(offset_items: Tensor | None, offset: Tensor | float, n_items: int,
                   scores_like: Tensor) -> tuple[Tensor, Tensor] | None:
    """Computed once per call, used by every chunk: each row's listed items (M, L) as
    :func:`distinct_items` and ``offset`` as a 0-d tensor of ``scores_like``'s dtype and
    device; None when no row lists any item."""
    if offset_items is None or not offset_items.shape[1]:
        return None
    return (distinct_items(offset_items, n_items),
            torch.as_tensor(offset, dtype=scores_like.dtype, device=scores_like.device))


def _chunk_scores(hidden: Tensor, weight: Tensor, v0: int, v1: int, exclude: Tensor | None,
                  padding_idx: int | None, finite: Tensor,
                  listed_offset: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """(M, v1 - v0) scores (hidden's dtype, float32 or float64) of items v0..v1-1, plus the
    offset at each row's listed items (:func:`_listed_offset`), with excluded items set to
    -inf. ``finite`` (0-d bool) is and-ed in place with whether every score was finite
    before the exclusions (checked once per call, without a host sync)."""
    scores = hidden @ weight[v0:v1].to(hidden.dtype).T
    if listed_offset is not None:
        add_offset_(scores, listed_offset[0], v0, listed_offset[1])
    finite &= torch.isfinite(scores).all()
    if padding_idx is not None and v0 <= padding_idx < v1:
        scores[:, padding_idx - v0] = float("-inf")
    if exclude is not None and exclude.shape[1]:
        scatter_row_items(exclude, v0, v1, "amin", float("-inf"), float("inf"), scores)
    return scores


@torch.no_grad()
def streaming_rank(hidden: Tensor, weight: Tensor, target: Tensor, exclude: Tensor | None = None,
                   padding_idx: int | None = None, chunk_size: int | None = None,
                   offset_items: Tensor | None = None, offset: Tensor | float = 0.0) -> Tensor:
    """:func:`target_ranks` of the scores ``hidden @ weight.T``, taken while streaming over
    item chunks (no (M, V) score matrix is stored): per row, the rank counts ``[above,
    tied]`` of ``target`` among the other admissible items.

    Excluded items (``exclude``, ``padding_idx``: as in :func:`streaming_topk`) are not
    counted; the target itself is always scored, even if it is listed in ``exclude``, and
    never counted. With ``padding_idx=0`` and the 0-padded history as ``exclude`` this is
    ``target_ranks(full_scores, target, history)``, up to the rounding of the target's own
    score (computed as a row dot product, not inside the chunk's GEMM). ``offset_items``
    (M, L) int64 and ``offset`` (a number or 0-d tensor): each row's listed items score
    ``offset`` more, the target too if listed (a model's seen-item offset).

    Args:
        hidden: (M, D) float; weight: (V, D) of hidden's dtype; target: (M,) int64 in [0, V).
    Returns:
        (M, 2) int64 [above, tied], each in [0, V).
    Raises:
        NonFiniteScoresError if any score is NaN or infinite.
    """
    _check_eval_args(hidden, weight, exclude, padding_idx, chunk_size, offset_items)
    n_rows, n_items = hidden.shape[0], weight.shape[0]
    if not isinstance(target, Tensor) or target.shape != (n_rows,):
        raise ValueError(f"target must be a tensor of shape (M,) = ({n_rows},)")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must be int64 item ids, got dtype {target.dtype}")
    if n_rows and (int(target.min()) < 0 or int(target.max()) >= n_items):
        raise ValueError(f"target ids must lie in [0, {n_items})")
    target = target.long()
    chunk = _eval_chunk(n_rows, n_items, chunk_size, hidden.device)
    h = hidden.to(compute_dtype(hidden.dtype))
    target_score = ((h * weight.index_select(0, target).to(h.dtype)).sum(dim=1)
                    + offset_of_targets(target, offset_items, offset, h.dtype))[:, None]
    finite = torch.isfinite(target_score).all()
    listed_offset = _listed_offset(offset_items, offset, n_items, h)
    counts = torch.zeros(n_rows, 2, dtype=torch.long, device=hidden.device)
    for v0 in range(0, n_items, chunk):
        v1 = min(v0 + chunk, n_items)
        scores = _chunk_scores(h, weight, v0, v1, exclude, padding_idx, finite, listed_offset)
        counts[:, 0] += (scores > target_score).sum(dim=1)
        counts[:, 1] += (scores == target_score).sum(dim=1)
        own = target - v0
        inside = (own >= 0) & (own < v1 - v0)
        # the target's own column never counts, whatever rounding gave it
        own_score = scores.gather(1, own.clamp(0, v1 - v0 - 1)[:, None])
        counts -= (inside[:, None] & torch.cat([own_score > target_score,
                                                own_score == target_score], dim=1)).long()
    _raise_unless_finite(finite)
    return counts


@torch.no_grad()
def streaming_topk(hidden: Tensor, weight: Tensor, k: int, exclude: Tensor | None = None,
                   padding_idx: int | None = None, chunk_size: int | None = None,
                   offset_items: Tensor | None = None,
                   offset: Tensor | float = 0.0) -> tuple[Tensor, Tensor]:
    """Top-``k`` items per row of ``hidden @ weight.T``, streamed over item chunks.

    Args:
        hidden: (M, D) float row representations.
        weight: (V, D) item embeddings (same dtype as hidden).
        k: number of items to return, 1 <= k <= V.
        exclude: optional (M, L) int64 item ids never returned for that row (e.g. the
            user's history); negative entries are padding and ignored. Pad with
            ``padding_idx`` or -1.
        padding_idx: an item id (e.g. 0, the padding item) never returned for any row.
        chunk_size: items per chunk (default: a block of about
            :func:`~.score_chunks.score_block_elements` scores).
        offset_items, offset: optional (M, L) int64 item ids that score ``offset`` (a
            number or 0-d tensor) more for that row (a model's seen-item offset).

    Returns:
        (scores, ids): (M, k) float32 (float64 for float64 inputs) in descending order, and
        (M, k) int64. Rows with fewer than k admissible items end with score -inf, id -1.

    Raises NonFiniteScoresError if any score is NaN or infinite.
    """
    _check_eval_args(hidden, weight, exclude, padding_idx, chunk_size, offset_items)
    n_rows, n_items = hidden.shape[0], weight.shape[0]
    if not isinstance(k, int) or not 1 <= k <= n_items:
        raise ValueError(f"k must be an int in [1, n_items = {n_items}], got {k!r}")
    chunk = _eval_chunk(n_rows, n_items, chunk_size, hidden.device)
    h = hidden.to(compute_dtype(hidden.dtype))
    best_scores = torch.full((n_rows, k), float("-inf"), dtype=h.dtype, device=hidden.device)
    best_ids = torch.full((n_rows, k), -1, dtype=torch.long, device=hidden.device)
    finite = torch.ones((), dtype=torch.bool, device=hidden.device)
    listed_offset = _listed_offset(offset_items, offset, n_items, h)
    for v0 in range(0, n_items, chunk):
        v1 = min(v0 + chunk, n_items)
        scores = _chunk_scores(h, weight, v0, v1, exclude, padding_idx, finite, listed_offset)
        chunk_scores, chunk_ids = scores.topk(min(k, v1 - v0), dim=1)
        merged_scores = torch.cat([best_scores, chunk_scores], dim=1)
        merged_ids = torch.cat([best_ids, chunk_ids + v0], dim=1)
        best_scores, order = merged_scores.topk(k, dim=1)
        best_ids = merged_ids.gather(1, order)
    _raise_unless_finite(finite)
    best_ids.masked_fill_(best_scores == float("-inf"), -1)
    return best_scores, best_ids
