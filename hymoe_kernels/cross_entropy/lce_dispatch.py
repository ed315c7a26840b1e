"""Fused linear + cross-entropy: the full-catalog softmax loss of ``hidden @ weight.T``
without materialising the (rows x items) score matrix.

:func:`linear_cross_entropy` computes the mean softmax cross-entropy against ``target`` over
item chunks with an online log-sum-exp; the backward pass recomputes each chunk's scores and
returns gradients of ``hidden`` and ``weight``. Memory is O(rows x chunk) instead of
O(rows x items). Optionally each row's listed items score a learned ``offset`` more (a
recommender's seen-item offset), with its gradient too.

Backends: ``"torch"`` (chunked PyTorch, any device) and ``"triton"`` (the kernels of
:mod:`.lce_triton_kernels`; CUDA, or the CPU under
``TRITON_INTERPRET=1``). ``"auto"`` picks Triton for CUDA tensors of a width the kernels take
and torch otherwise (:func:`hymoe_kernels.backend.resolve`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..backend import Backend, resolve
from ..weights import KERNEL_DTYPES

LOSS_BACKENDS = ("auto", "torch", "triton")

# Budget of one score block (rows x items) of the chunked torch path, in elements. On the
# CPU, 2**21 fp32 values (8 MiB) per intra-op thread: single-threaded speed is flat from
# 1 to 16 MiB blocks, while each block costs ~10 parallel regions whose barriers stall
# when the cores are oversubscribed, so blocks are as large as a bounded working set
# allows. On CUDA, 2**24 (64 MiB) per block.
_TORCH_BLOCK_ELEMENTS = 1 << 21
_TORCH_CUDA_BLOCK_ELEMENTS = 1 << 24
_DEFAULT_ITEM_CHUNK = 2048
# Largest bitset of the rows' offset items (rows x items / 8 bytes) that "auto" hands to the
# Triton kernels; past it (e.g. 2,048 rows x 1M items = 256 MiB) the torch path streams them.
_OFFSET_BITSET_BYTES = 1 << 28


def _check_matrix(name: str, value: Tensor) -> None:
    """TypeError / ValueError unless ``value`` is a 2-d floating-point tensor."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {value.dtype}")


def check_hidden_weight(hidden: Tensor, weight: Tensor) -> None:
    """The operands of the scores ``hidden @ weight.T`` (here and in the recommender's
    streamed rankings): hidden (M, D) and weight (V >= 1, D), floating point, of one dtype
    and device; else TypeError / ValueError naming them."""
    _check_matrix("hidden", hidden)
    _check_matrix("weight", weight)
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (M, D) and weight (V, D) must share D, got hidden "
                         f"{tuple(hidden.shape)} and weight {tuple(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError("weight must have at least one row (item)")
    if hidden.device != weight.device:
        raise ValueError(f"hidden and weight must be on one device, got {hidden.device} "
                         f"and {weight.device}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden and weight must share a dtype, got {hidden.dtype} and "
                        f"{weight.dtype}")


def check_chunk_size(chunk_size: int | None) -> None:
    """ValueError unless ``chunk_size`` (items per chunk) is a positive int or None."""
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def scatter_row_items(items: Tensor, v0: int, v1: int, reduce: str, inside_value: float,
                      outside_value: float, out: Tensor) -> Tensor:
    """Scatter into ``out`` (M, v1 - v0), in place, at each row's listed item ids (M, L)
    int64 that fall inside [v0, v1): inside_value there, outside_value (the reduction's
    identity) for ids outside it (negative ids: none), reduced with ``reduce`` ("amax" /
    "amin"), so duplicate ids are harmless and the result deterministic. Returns ``out``."""
    local = items.long() - v0
    inside = (local >= 0) & (local < v1 - v0)
    fill = torch.where(inside, inside_value, outside_value).to(out.dtype)
    return out.scatter_reduce_(1, local.clamp(0, v1 - v0 - 1), fill, reduce=reduce)


def listed_items_mask(items: Tensor, v0: int, v1: int, like: Tensor) -> Tensor:
    """(M, v1 - v0) of ``like``'s dtype: 1 where the column's item v0 + j is among the row's
    ids ``items`` (M, L) int64, else 0."""
    return scatter_row_items(items, v0, v1, "amax", 1.0, 0.0, torch.zeros_like(like))


def distinct_items(items: Tensor, n_items: int) -> Tensor:
    """(N, L) int64: each row of item ids (N, L) sorted, with repeats and ids outside
    [0, n_items) set to -1 (no item), so every item a row lists appears in it once."""
    ids = torch.where((items >= 0) & (items < n_items), items.long(), -1).sort(dim=1).values
    repeat = torch.zeros_like(ids, dtype=torch.bool)
    repeat[:, 1:] = ids[:, 1:] == ids[:, :-1]
    return ids.masked_fill(repeat, -1)


def add_offset_(scores: Tensor, ids: Tensor, v0: int,
                offset: Tensor | float) -> tuple[Tensor, Tensor]:
    """Add ``offset`` (a number or 0-d tensor), in place, to the scores (N, W) of items
    [v0, v0 + W) at each row's :func:`distinct_items` ``ids`` (N, L) that fall in that chunk.
    Returns (columns, inside), both (N, L): each id's column, clamped into the chunk, and
    whether it lies inside (for gathering the offset's gradient from the same slots)."""
    width = scores.shape[1]
    local = ids - v0
    columns, inside = local.clamp(0, width - 1), (ids >= 0) & (local >= 0) & (local < width)
    scores.scatter_add_(1, columns, inside.to(scores.dtype) * offset)
    return columns, inside


def offset_of_targets(target: Tensor, offset_items: Tensor | None, offset: Tensor | float,
                      dtype: torch.dtype) -> Tensor | float:
    """(M,) ``offset`` where a row's target (M,) is among its ``offset_items`` (M, L), else
    0; the number 0 when there are no offset_items."""
    if offset_items is None:
        return 0.0
    listed = (offset_items == target[:, None]).any(dim=1).to(dtype)
    return listed * torch.as_tensor(offset, dtype=dtype, device=target.device)


def _torch_blocks(n_rows: int, n_items: int, chunk_size: int | None,
                  device: torch.device) -> tuple[int, int]:
    """(rows per block, items per chunk) of the chunked torch loss."""
    items = min(n_items, chunk_size or _DEFAULT_ITEM_CHUNK)
    if device.type == "cuda":
        budget = _TORCH_CUDA_BLOCK_ELEMENTS
    else:
        budget = _TORCH_BLOCK_ELEMENTS * torch.get_num_threads()
    rows = max(1, budget // items)
    return min(max(n_rows, 1), rows), items


# ----------------------------------------------------------------------------------------
# Chunked PyTorch implementation of the loss
# ----------------------------------------------------------------------------------------

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _torch_lse(hidden: Tensor, weight: Tensor, chunk_size: int | None,
               offset_items: Tensor | None, offset: Tensor | None) -> Tensor:
    """log sum_v exp(scores)[:, v] (N,) in the compute dtype, by online log-sum-exp, of the
    scores hidden @ weight.T plus ``offset`` at each row's ``offset_items`` (N, L), which are
    :func:`distinct_items`."""
    n_rows, n_items = hidden.shape[0], weight.shape[0]
    row_block, item_chunk = _torch_blocks(n_rows, n_items, chunk_size, hidden.device)
    dtype = _compute_dtype(hidden.dtype)
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


def _torch_grads(hidden: Tensor, weight: Tensor, target: Tensor, lse: Tensor, scale: Tensor,
                 chunk_size: int | None, offset_items: Tensor | None,
                 offset: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Gradients (d hidden, d weight, d offset or None) of scale * sum_i CE_i, recomputing
    scores per block; d offset = scale * sum_i (probability mass of row i's offset items -
    [target_i among them]), the offset_items being :func:`distinct_items`.

    Blocks are visited in a fixed order, so the result is bit-reproducible."""
    n_rows, n_items = hidden.shape[0], weight.shape[0]
    row_block, item_chunk = _torch_blocks(n_rows, n_items, chunk_size, hidden.device)
    dtype = _compute_dtype(hidden.dtype)
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


# ----------------------------------------------------------------------------------------
# Autograd op shared by both backends
# ----------------------------------------------------------------------------------------

class _LinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of CE(scores, target) / n_rows, on compacted (real) rows, where scores
    = hidden @ weight.T plus ``offset`` at each row's ``offset_items``.

    forward(hidden (N, D), weight (V, D), target (N,) int64 in [0, V), offset_items (N, L)
    int64 (:func:`distinct_items`) or None, offset 0-d float or None, backend (TORCH or
    TRITON), chunk_size) -> 0-d loss in the compute dtype. N = 0 gives loss 0 and zero
    gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, target, offset_items, offset, backend, chunk_size):
        n_rows = hidden.shape[0]
        dtype = _compute_dtype(hidden.dtype)
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
            lse = _torch_lse(hidden, weight, chunk_size, listed, offset_value)
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
            grad_hidden, grad_weight, grad_offset = _torch_grads(
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
