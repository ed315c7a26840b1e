"""The item-scoring primitives every backbone uses: the full-softmax training loss (fused or
plain, optionally with a seen-item offset) and full-ranking scores. Kept in one place so
fused / streaming versions can replace them."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hymoe_kernels.cross_entropy import linear_cross_entropy
from hymoe_kernels.cross_entropy.score_chunks import listed_items_mask


def seen_items(inputs: Tensor, targets: Tensor) -> Tensor:
    """(M, L) int64: for each real position (target > 0) of the right-padded inputs /
    targets (B, L) int64, in row-major order (the order of ``hidden[targets > 0]``), the
    input items up to and including it, 0 elsewhere: what the model has seen when it
    predicts that target."""
    rows, cols = (targets > 0).nonzero(as_tuple=True)
    later = torch.arange(inputs.shape[1], device=inputs.device)[None, :] > cols[:, None]
    return inputs[rows].masked_fill(later, 0)


def full_softmax_loss(hidden: Tensor, item_emb: Tensor, targets: Tensor, fused: bool = True,
                      offset_items: Tensor | None = None, offset: Tensor | None = None) -> Tensor:
    """Mean cross-entropy of next-item prediction over all items.

    hidden (M, D) float: representations of real (non-padding) positions only (M >= 1);
    item_emb (V + 1, D) float: item embeddings, row 0 = padding (never a candidate);
    targets (M,) int64 in 1..V; optional offset_items (M, L) int64 item ids (0 = none) whose
    scores get the 0-d ``offset`` added, in each row (a learned seen-item offset). Returns a
    0-d float32 (float64 for float64 input) tensor, differentiable in hidden, item_emb (row
    0 gets no gradient) and offset.

    ``fused`` (default): :func:`hymoe_kernels.linear_cross_entropy`, which streams over item
    chunks and never stores the (M, V) scores; otherwise the plain ``F.cross_entropy`` of the
    full score matrix.
    """
    if hidden.shape[0] == 0:
        raise ValueError("full_softmax_loss needs at least one position (hidden has 0 rows)")
    candidates = item_emb[1:]
    ids = None if offset_items is None else offset_items - 1   # padding 0 -> -1: no item
    if fused:
        return linear_cross_entropy(hidden, candidates, targets - 1, offset_items=ids,
                                    offset=offset)
    scores = hidden @ candidates.t()
    if ids is not None:
        scores = scores + listed_items_mask(ids, 0, scores.shape[1], scores) * offset
    return F.cross_entropy(scores.float(), targets - 1)


def sampled_softmax_loss(hidden: Tensor, item_emb: Tensor, targets: Tensor, negatives: Tensor,
                         offset_items: Tensor | None = None,
                         offset: Tensor | None = None) -> Tensor:
    """Mean sampled-softmax cross-entropy: each target scored against the shared candidate
    items ``negatives`` (N,) int64 in 1..V (drawn uniformly, so the log-Q correction is a
    constant and drops out) instead of all items; a negative equal to the row's target is
    left out. Arguments and result as :func:`full_softmax_loss`."""
    positive = (hidden * item_emb[targets]).sum(-1, keepdim=True)          # (M, 1)
    scores = torch.cat([positive, hidden @ item_emb[negatives].t()], 1)    # (M, 1 + N)
    if offset_items is not None:
        listed = torch.cat([targets[:, None], negatives.expand(len(targets), -1)], 1)
        seen = (listed[:, :, None] == offset_items[:, None, :]).any(-1)
        scores = scores + seen * offset
    hit = torch.cat([torch.zeros_like(targets[:, None], dtype=torch.bool),
                     negatives[None, :] == targets[:, None]], 1)
    return F.cross_entropy(scores.float().masked_fill(hit, float("-inf")),
                           torch.zeros_like(targets))


def full_item_scores(hidden: Tensor, item_emb: Tensor, offset_items: Tensor | None = None,
                     offset: Tensor | float = 0.0) -> Tensor:
    """Scores of every item for each query: (B, D) x (V + 1, D) -> (B, V + 1) float,
    column i = item i; column 0 (padding) is -inf so it never ranks. ``offset_items``
    (B, L) int64: each row's listed items score ``offset`` more (a seen-item offset)."""
    scores = hidden @ item_emb.t()
    if offset_items is not None:
        listed = listed_items_mask(offset_items, 0, scores.shape[1], scores)
        scores = scores + listed * torch.as_tensor(offset, dtype=scores.dtype)
    scores[:, 0] = float("-inf")
    return scores
