"""The chunked PyTorch path of the fused linear cross-entropy (any device, float64 too).

The scores ``hidden @ weight.T`` are computed one block of rows x items at a time
(:func:`~.score_chunks.score_block_elements`): the forward keeps each row's running max and
sum of exp (online log-sum-exp), the backward recomputes each block's softmax and adds its
share of both gradients. Memory is O(block), not O(rows x items).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .score_chunks import add_offset_, compute_dtype, score_block_elements

# Items per chunk when the caller gives no chunk_size.
DEFAULT_ITEM_CHUNK = 2048


def _torch_blocks(n_rows: int, n_items: int, chunk_size: int | None,
                  device: torch.device) -> tuple[int, int]:
    """(rows per block, items per chunk) of the chunked torch loss."""
    items = min(n_items, chunk_size or DEFAULT_ITEM_CHUNK)
    rows = max(1, score_block_elements(device) // items)
    return min(max(n_rows, 1), rows), items


def torch_lse(hidden: Tensor, weight: Tensor, chunk_size: int | None,
               offset_items: Tensor | None, offset: Tensor | None) -> Tensor:
    """log sum_v exp(scores)[:, v] (N,) in the compute dtype, by online log-sum-exp, of the
    scores hidden @ weight.T plus ``offset`` at each row's ``offset_items`` (N, L), which are
    :func:`~.score_chunks.distinct_items`."""
    n_rows, n_items = hidden.shape[0], weight.shape[0]
    row_block, item_chunk = _torch_blocks(n_rows, n_items, chunk_size, hidden.device)
    dtype = compute_dtype(hidden.dtype)
    lse = torch.empty(n_rows, dtype=dtype, device=hidden.device)
    for r0 in range(0, n_rows, row_block):
        h = hidden[r0:r0 + row_block].to(dtype)
        rows_items = None if offset_items is None else offset_items[r0:r0 + row_block]
        running_max = torch.full((h.shape[0],), float("-inf"), dtype=dtype, device=h.device)
        running_sum = torch.zeros(h.shape[0], dtype=dtype, device=h.device)
        for v0 in range(0, n_items, item_chunk):
            scores = h @ weight[v0:v0 + item_chunk].to(dtype).T
            if rows_items is not None:
                add_offset_(scores, rows_items, v0, offset)
            new_max = torch.maximum(running_max, scores.amax(dim=1))
            running_sum.mul_(torch.exp(running_max - new_max))
            running_sum.add_(scores.sub_(new_max[:, None]).exp_().sum(dim=1))
            running_max = new_max
        lse[r0:r0 + row_block] = running_max + running_sum.log()
    return lse


def torch_grads(hidden: Tensor, weight: Tensor, target: Tensor, lse: Tensor, scale: Tensor,
                 chunk_size: int | None, offset_items: Tensor | None,
                 offset: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Gradients (d hidden, d weight, d offset or None) of scale * sum_i CE_i, recomputing
    scores per block; d offset = scale * sum_i (probability mass of row i's offset items -
    [target_i among them]), the offset_items being :func:`~.score_chunks.distinct_items`.

    Blocks are visited in a fixed order, so the result is bit-reproducible."""
    n_rows, n_items = hidden.shape[0], weight.shape[0]
    row_block, item_chunk = _torch_blocks(n_rows, n_items, chunk_size, hidden.device)
    dtype = compute_dtype(hidden.dtype)
    grad_hidden = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device)
    grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device)
    grad_offset = None if offset_items is None else torch.zeros((), dtype=dtype,
                                                                 device=hidden.device)
    for r0 in range(0, n_rows, row_block):
        h = hidden[r0:r0 + row_block].to(dtype)
        rows_lse = lse[r0:r0 + row_block]
        rows_target = target[r0:r0 + row_block]
        rows_items = None if offset_items is None else offset_items[r0:r0 + row_block]
        row_ids = torch.arange(h.shape[0], device=h.device)
        for v0 in range(0, n_items, item_chunk):
            w = weight[v0:v0 + item_chunk].to(dtype)
            probs = h @ w.T
            if rows_items is not None:
                columns, inside = add_offset_(probs, rows_items, v0, offset)
            probs.sub_(rows_lse[:, None]).exp_()
            local = rows_target - v0
            hit = (local >= 0) & (local < w.shape[0])
            probs[row_ids[hit], local[hit]] -= 1.0
            probs.mul_(scale)
            if rows_items is not None:
                grad_offset += (probs.gather(1, columns) * inside).sum()
            grad_hidden[r0:r0 + row_block].addmm_(probs, w)
            grad_weight[v0:v0 + item_chunk].addmm_(probs.T, h)
    return grad_hidden, grad_weight, grad_offset
