"""The two item-scoring primitives every backbone uses: the full-softmax training loss and
full-ranking scores. Kept in one place so fused / streaming versions can replace them."""
from __future__ import annotations

import torch
from torch import Tensor

LOSS_ROW_CHUNK = 256  # rows of logits alive at once: (256, V) fits in cache for V ~ 10^4


class _ChunkedSoftmaxCrossEntropy(torch.autograd.Function):
    """Sum over rows of logsumexp(h W^T) - (h W^T)[target], with the gradient computed
    during the forward one row chunk at a time, so the (M, V) logits never exist at once
    (d logits = softmax - onehot; dh = d logits @ W; dW = d logits^T @ h)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        grad_weight = torch.zeros_like(weight) if need_grad else None
        acc_dtype = torch.promote_types(hidden.dtype, torch.float32)  # float32 or float64
        total = hidden.new_zeros((), dtype=acc_dtype)
        for start in range(0, hidden.shape[0], LOSS_ROW_CHUNK):
            h = hidden[start:start + LOSS_ROW_CHUNK]
            t = targets[start:start + LOSS_ROW_CHUNK]
            logits = (h @ weight.t()).to(acc_dtype)                # (c, V)
            target_logit = logits.gather(1, t.unsqueeze(1)).squeeze(1)
            row_max = logits.amax(dim=1, keepdim=True)
            exp = logits.sub_(row_max).exp_()                      # in place: one pass
            row_sum = exp.sum(dim=1, keepdim=True)
            lse = (row_max + row_sum.log()).squeeze(1)
            total += (lse - target_logit).sum()
            if need_grad:
                probs = exp.div_(row_sum)
                probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                probs = probs.to(weight.dtype)
                grad_hidden[start:start + LOSS_ROW_CHUNK] = probs @ weight
                grad_weight.addmm_(probs.t(), h)
        if need_grad:
            ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_total.to(grad_hidden.dtype)
        return grad_hidden * scale, grad_weight * scale, None


def full_softmax_loss(hidden: Tensor, item_emb: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of next-item prediction over all items.

    hidden (M, D) float: representations of real (non-padding) positions only (M >= 1);
    item_emb (V + 1, D) float: item embeddings, row 0 = padding (never a candidate);
    targets (M,) int64 in 1..V. Returns a 0-d float32 tensor (float64 for float64 input),
    differentiable in hidden and item_emb (row 0 gets no gradient).
    """
    if hidden.shape[0] == 0:
        raise ValueError("full_softmax_loss needs at least one position (hidden has 0 rows)")
    total = _ChunkedSoftmaxCrossEntropy.apply(hidden, item_emb[1:], targets - 1)
    return total / hidden.shape[0]


def full_item_scores(hidden: Tensor, item_emb: Tensor) -> Tensor:
    """Scores of every item for each query: (B, D) x (V + 1, D) -> (B, V + 1) float,
    column i = item i; column 0 (padding) is -inf so it never ranks."""
    scores = hidden @ item_emb.t()
    scores[:, 0] = float("-inf")
    return scores
