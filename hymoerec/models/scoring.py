"""The two item-scoring primitives every backbone uses: the full-softmax training loss and
full-ranking scores. Kept in one place so fused / streaming versions can replace them."""
from __future__ import annotations

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


def full_item_scores(hidden: Tensor, item_emb: Tensor) -> Tensor:
    """Scores of every item for each query: (B, D) x (V + 1, D) -> (B, V + 1) float,
    column i = item i; column 0 (padding) is -inf so it never ranks."""
    scores = hidden @ item_emb.t()
    scores[:, 0] = float("-inf")
    return scores
