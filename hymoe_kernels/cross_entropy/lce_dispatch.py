"""The fused linear + cross-entropy: the full-catalog softmax loss of ``hidden @ weight.T``
without materialising the (rows x items) score matrix, and the choice of the path that runs.

:func:`linear_cross_entropy` computes the mean softmax cross-entropy against ``target`` over
item chunks with an online log-sum-exp; the backward pass recomputes each chunk's scores and
returns gradients of ``hidden`` and ``weight``. Memory is O(rows x chunk) instead of
O(rows x items). Optionally each row's listed items score a learned ``offset`` more (a
recommender's seen-item offset), with its gradient too.

Backends: ``"torch"`` (:mod:`.lce_torch_backend`, chunked PyTorch, any device) and
``"triton"`` (:mod:`.lce_triton_kernels`; CUDA, or the CPU under ``TRITON_INTERPRET=1``).
``"auto"`` picks Triton for CUDA tensors of a width the kernels take and torch otherwise
(:func:`hymoe_kernels.backend.resolve`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..backend import Backend, resolve
from ..weights import KERNEL_DTYPES
from .lce_torch_backend import torch_grads, torch_lse
from .score_chunks import (check_chunk_size, check_hidden_weight, compute_dtype, distinct_items,
                           offset_of_targets)

LOSS_BACKENDS = ("auto", "torch", "triton")

# Largest bitset of the rows' offset items (rows x items / 8 bytes) that "auto" hands to the
# Triton kernels; past it (e.g. 2,048 rows x 1M items = 256 MiB) the torch path streams them.
_OFFSET_BITSET_BYTES = 1 << 28


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of CE(scores, target) / n_rows, on compacted (real) rows, where scores
    = hidden @ weight.T plus ``offset`` at each row's ``offset_items``.

    forward(hidden (N, D), weight (V, D), target (N,) int64 in [0, V), offset_items (N, L)
    int64 (:func:`~.score_chunks.distinct_items`) or None, offset 0-d float or None,
    backend (TORCH or TRITON), chunk_size) -> 0-d loss in the compute dtype. N = 0 gives
    loss 0 and zero gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, target, offset_items, offset, backend, chunk_size):
        n_rows = hidden.shape[0]
        dtype = compute_dtype(hidden.dtype)
        offset_value = None if offset is None else offset.detach().to(dtype)
        listed = offset_items   # the rows' items: ids (N, L) for torch, a bitset for Triton
        offset_grad_rows = None  # Triton: d row loss / d offset (N,), from the forward
        if n_rows == 0:
            lse = hidden.new_empty(0, dtype=dtype)
            loss = hidden.new_zeros((), dtype=dtype)
        elif backend is Backend.TRITON:
            from .lce_triton_kernels import listed_bitset, triton_lce_forward
            if listed is not None:
                listed = listed_bitset(listed, weight.shape[0])
            lse, row_loss, offset_grad_rows = triton_lce_forward(hidden, weight, target, listed,
                                                                 offset_value)
            loss = row_loss.sum() / n_rows
        else:
            lse = torch_lse(hidden, weight, chunk_size, listed, offset_value)
            target_score = (hidden.to(dtype) * weight.index_select(0, target).to(dtype)).sum(1)
            target_score = target_score + offset_of_targets(target, listed, offset_value, dtype)
            loss = (lse - target_score).sum() / n_rows
        ctx.save_for_backward(hidden, weight, target, lse, listed, offset_value, offset_grad_rows)
        ctx.backend, ctx.chunk_size = backend, chunk_size
        ctx.offset_dtype = None if offset is None else offset.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, target, lse, listed, offset, offset_grad_rows = ctx.saved_tensors
        n_rows = hidden.shape[0]
        grad_offset = None
        if n_rows == 0:
            if offset is not None:
                grad_offset = torch.zeros((), dtype=ctx.offset_dtype, device=hidden.device)
            return (torch.zeros_like(hidden), torch.zeros_like(weight), None, None, grad_offset,
                    None, None)
        scale = grad_loss.to(lse.dtype) / n_rows
        if ctx.backend is Backend.TRITON:
            from .lce_triton_kernels import triton_lce_backward
            grad_hidden, grad_weight = triton_lce_backward(hidden, weight, target, lse, scale,
                                                           listed, offset)
            if offset_grad_rows is not None:
                grad_offset = offset_grad_rows.sum() * scale
        else:
            grad_hidden, grad_weight, grad_offset = torch_grads(
                hidden, weight, target, lse, scale, ctx.chunk_size, listed, offset)
        if grad_offset is not None:
            grad_offset = grad_offset.to(ctx.offset_dtype)
        return (grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype), None, None,
                grad_offset, None, None)


def _resolve_backend(backend: str, hidden: Tensor, n_items: int, has_offset: bool) -> Backend:
    """TORCH or TRITON for hidden (M, D) against n_items items: "auto" takes Triton for CUDA
    tensors of a dtype and width the kernels take, and with an offset a rows' item bitset
    within _OFFSET_BITSET_BYTES; "triton" for another dtype is a TypeError."""
    if backend == "triton" and hidden.dtype not in KERNEL_DTYPES:
        raise TypeError(f"backend='triton' takes float32/bfloat16/float16 hidden and weight, "
                        f"got {hidden.dtype}; use backend='torch'")

    def triton_fits() -> bool:
        from .lce_triton_kernels import triton_supports
        bitset_bytes = hidden.shape[0] * -(-n_items // 8) if has_offset else 0
        return (hidden.dtype in KERNEL_DTYPES and triton_supports(hidden.shape[1], hidden.dtype)
                and bitset_bytes <= _OFFSET_BITSET_BYTES)
    return resolve(backend, hidden, LOSS_BACKENDS, triton_fits)


def _check_offset(offset_items: Tensor | None, offset: Tensor | None, hidden: Tensor) -> None:
    """The optional offset arguments of :func:`linear_cross_entropy`: both or neither;
    offset_items (M, L) integer ids on hidden's device; offset a 0-d floating tensor there."""
    if (offset_items is None) != (offset is None):
        raise ValueError("offset_items and offset go together: give both or neither")
    if offset_items is None:
        return
    if not isinstance(offset_items, Tensor) or offset_items.dim() != 2 \
            or offset_items.shape[0] != hidden.shape[0]:
        raise ValueError(f"offset_items must be a tensor of shape (M, L) with M = "
                         f"{hidden.shape[0]}, got {getattr(offset_items, 'shape', offset_items)}")
    if offset_items.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"offset_items must be int64 (or int32), got dtype {offset_items.dtype}")
    if not isinstance(offset, Tensor) or offset.dim() != 0 or not offset.is_floating_point():
        raise TypeError(f"offset must be a 0-d floating-point tensor, got {offset!r}")
    for name, value in (("offset_items", offset_items), ("offset", offset)):
        if value.device != hidden.device:
            raise ValueError(f"{name} must be on hidden's device {hidden.device}, got "
                             f"{value.device}")


def linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor,
                         ignore_index: int = -100, chunk_size: int | None = None,
                         backend: str = "auto", offset_items: Tensor | None = None,
                         offset: Tensor | None = None) -> Tensor:
    """Mean cross-entropy of the scores ``hidden @ weight.T`` without storing them.

    Equals ``F.cross_entropy(hidden @ weight.T, target, ignore_index=ignore_index)`` up to
    float rounding, but the (M, V) score matrix is streamed in item chunks (online
    log-sum-exp) and recomputed in the backward pass, so memory does not grow with V.

    Args:
        hidden: (M, D) float32/bfloat16/float16 (float64: torch backend) row representations.
        weight: (V, D) item embeddings, same dtype and device as ``hidden``.
        target: (M,) int64 item ids in [0, V), or ``ignore_index`` for positions that are not
            scored (they are dropped before any work is done).
        ignore_index: target value of unscored positions.
        chunk_size: items per chunk of the torch backend (default 2048); the Triton backend
            picks its own tiles.
        backend: "auto" (Triton for CUDA tensors of a width the kernels take -- D <= 256 in
            bf16/fp16, D <= 64 in fp32 -- and, with an offset, a rows x items bitset of at
            most 256 MiB; else torch), "torch" or "triton".
        offset_items: optional (M, L) int64 ids in [0, V) (negative: no item; duplicates
            count once): each row's items whose scores get ``offset`` added, e.g. the items
            a user has already seen (the Triton kernels read them as a (M, V / 8) bitset).
        offset: 0-d float tensor (given with offset_items; may require grad), the added score.

    Returns:
        0-d float32 tensor (float64 for float64 inputs), the mean over non-ignored
        positions. When every position is ignored the loss is 0 and both gradients are
        zero (``F.cross_entropy`` returns NaN there; a batch without targets should not
        poison the parameters).
    """
    check_hidden_weight(hidden, weight)
    check_chunk_size(chunk_size)
    if not isinstance(target, Tensor) or target.shape != hidden.shape[:1]:
        raise ValueError(f"target must be a tensor of shape (M,) = ({hidden.shape[0]},), got "
                         f"{tuple(target.shape) if isinstance(target, Tensor) else type(target)}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must be int64 (or int32), got dtype {target.dtype}")
    if target.device != hidden.device:
        raise ValueError(f"target must be on hidden's device {hidden.device}, got {target.device}")
    _check_offset(offset_items, offset, hidden)
    backend = _resolve_backend(backend, hidden, weight.shape[0], offset_items is not None)

    rows = (target != ignore_index).nonzero().squeeze(1)
    real_target = target.index_select(0, rows).long()
    n_items = weight.shape[0]
    if real_target.numel() and (int(real_target.min()) < 0 or int(real_target.max()) >= n_items):
        raise ValueError(f"target ids must lie in [0, {n_items}) or equal ignore_index="
                         f"{ignore_index}; got values in [{int(real_target.min())}, "
                         f"{int(real_target.max())}]")
    real_hidden = hidden.index_select(0, rows).contiguous()
    real_items = (None if offset_items is None
                  else distinct_items(offset_items.index_select(0, rows), n_items))
    return _LinearCrossEntropy.apply(real_hidden, weight.contiguous(), real_target, real_items,
                                     offset, backend, chunk_size)
