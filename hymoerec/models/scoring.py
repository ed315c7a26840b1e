"""The item-scoring primitives every backbone uses: the full-softmax training loss (plain,
fused, or with a seen-item offset) and full-ranking scores. Kept in one place so fused /
streaming versions can replace them."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hymoe_kernels.linear_cross_entropy import linear_cross_entropy


def full_softmax_loss(hidden: Tensor, item_emb: Tensor, targets: Tensor,
                      fused: bool = True) -> Tensor:
    """Mean cross-entropy of next-item prediction over all items.

    hidden (M, D) float: representations of real (non-padding) positions only (M >= 1);
    item_emb (V + 1, D) float: item embeddings, row 0 = padding (never a candidate);
    targets (M,) int64 in 1..V. Returns a 0-d float32 (float64 for float64 input) tensor,
    differentiable in hidden and item_emb (row 0 gets no gradient).

    ``fused`` (default): :func:`hymoe_kernels.linear_cross_entropy`, which streams over item
    chunks and never stores the (M, V) scores; otherwise the plain ``F.cross_entropy`` of the
    full score matrix.
    """
    if hidden.shape[0] == 0:
        raise ValueError("full_softmax_loss needs at least one position (hidden has 0 rows)")
    if fused:
        return linear_cross_entropy(hidden, item_emb[1:], targets - 1)
    return F.cross_entropy((hidden @ item_emb[1:].t()).float(), targets - 1)


def seen_offset_softmax_loss(hidden: Tensor, inputs: Tensor, targets: Tensor,
                             item_emb: Tensor, offset: Tensor) -> Tensor:
    """Mean next-item cross-entropy over all items when every item already in the input up
    to a position scores ``offset`` (0-d) more there: the loss of a model with a learned
    seen-item offset. hidden (B, L, D) float, the positions' outputs; inputs / targets
    (B, L) int64 right-padded with 0 (only target > 0 enters the loss); item_emb (V + 1, D),
    row 0 = padding. Holds the (positions x items) score matrix, like the plain loss."""
    real = targets > 0
    B, L = inputs.shape
    causal = torch.ones(L, L, dtype=torch.bool, device=inputs.device).tril()
    # (M, L): the items seen up to each real position, sorted; each distinct item once
    seen = inputs[:, None, :].expand(B, L, L).masked_fill(~causal, 0)[real].sort(dim=1).values
    distinct = seen > 0
    distinct[:, 1:] &= seen[:, 1:] != seen[:, :-1]
    scores = hidden[real] @ item_emb.t()
    scores = scores.scatter_add(1, seen, distinct.to(scores.dtype) * offset.to(scores.dtype))
    return F.cross_entropy(scores[:, 1:].float(), targets[real] - 1)


def full_item_scores(hidden: Tensor, item_emb: Tensor, offset_items: Tensor | None = None,
                     offset: Tensor | float = 0.0) -> Tensor:
    """Scores of every item for each query: (B, D) x (V + 1, D) -> (B, V + 1) float,
    column i = item i; column 0 (padding) is -inf so it never ranks. ``offset_items``
    (B, L) int64: each row's listed items score ``offset`` more (a seen-item offset)."""
    scores = hidden @ item_emb.t()
    if offset_items is not None:
        listed = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, offset_items, True)
        scores = scores + listed.to(scores.dtype) * torch.as_tensor(offset, dtype=scores.dtype)
    scores[:, 0] = float("-inf")
    return scores
