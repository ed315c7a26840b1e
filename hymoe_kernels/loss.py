"""Full-catalog losses and rankings that never materialise the (rows x items) score matrix.

* :func:`linear_cross_entropy` -- mean softmax cross-entropy of ``hidden @ weight.T``
  against ``target``, computed over item chunks with an online log-sum-exp; the backward
  pass recomputes each chunk's scores and returns gradients of ``hidden`` and ``weight``.
  Memory is O(rows x chunk) instead of O(rows x items).
* :func:`streaming_topk` -- the ``k`` best-scoring items per row, kept as a running top-k
  while streaming over item chunks.
* :func:`streaming_rank` -- the rank of a target item among all items, as the counts of items
  scoring strictly higher and of items tied with it, by streaming.

Backends of the loss: ``"torch"`` (chunked PyTorch, any device) and ``"triton"`` (the
kernels of :mod:`hymoe_kernels.kernels.linear_cross_entropy`; CUDA, or the CPU under
``TRITON_INTERPRET=1``). ``"auto"`` picks Triton for CUDA tensors and torch otherwise.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

LOSS_BACKENDS = ("auto", "torch", "triton")


class NonFiniteScoresError(FloatingPointError):
    """A ranking met a NaN or infinite score, so no rank is defined (e.g. a diverged model)."""

# Budget of one score block (rows x items) of the chunked torch path, in elements. On the
# CPU, 2**21 fp32 values (8 MiB) per intra-op thread: single-threaded speed is flat from
# 1 to 16 MiB blocks, while each block costs ~10 parallel regions whose barriers stall
# when the cores are oversubscribed, so blocks are as large as a bounded working set
# allows. On CUDA, 2**24 (64 MiB) per block.
_TORCH_BLOCK_ELEMENTS = 1 << 21
_TORCH_CUDA_BLOCK_ELEMENTS = 1 << 24
_DEFAULT_ITEM_CHUNK = 2048
# Budget of one score block for streaming top-k / rank: 2**24 fp32 values = 64 MiB.
_EVAL_BLOCK_ELEMENTS = 1 << 24


def _check_matrix(name: str, value: Tensor) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {value.dtype}")


def _check_hidden_weight(hidden: Tensor, weight: Tensor) -> None:
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


def _check_chunk(chunk_size: int | None) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


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


def _torch_lse(hidden: Tensor, weight: Tensor, chunk_size: int | None) -> Tensor:
    """log sum_v exp(hidden @ weight.T)[:, v] (N,) in the compute dtype, by online
    log-sum-exp."""
    n_rows, n_items = hidden.shape[0], weight.shape[0]
    row_block, item_chunk = _torch_blocks(n_rows, n_items, chunk_size, hidden.device)
    dtype = _compute_dtype(hidden.dtype)
    lse = torch.empty(n_rows, dtype=dtype, device=hidden.device)
    for r0 in range(0, n_rows, row_block):
        h = hidden[r0:r0 + row_block].to(dtype)
        running_max = torch.full((h.shape[0],), float("-inf"), dtype=dtype, device=h.device)
        running_sum = torch.zeros(h.shape[0], dtype=dtype, device=h.device)
        for v0 in range(0, n_items, item_chunk):
            scores = h @ weight[v0:v0 + item_chunk].to(dtype).T
            new_max = torch.maximum(running_max, scores.amax(dim=1))
            running_sum.mul_(torch.exp(running_max - new_max))
            running_sum.add_(scores.sub_(new_max[:, None]).exp_().sum(dim=1))
            running_max = new_max
        lse[r0:r0 + row_block] = running_max + running_sum.log()
    return lse


def _torch_grads(hidden: Tensor, weight: Tensor, target: Tensor, lse: Tensor, scale: Tensor,
                 chunk_size: int | None) -> tuple[Tensor, Tensor]:
    """Gradients (d hidden, d weight) of scale * sum_i CE_i, recomputing scores per block.

    Blocks are visited in a fixed order, so the result is bit-reproducible."""
    n_rows, n_items = hidden.shape[0], weight.shape[0]
    row_block, item_chunk = _torch_blocks(n_rows, n_items, chunk_size, hidden.device)
    dtype = _compute_dtype(hidden.dtype)
    grad_hidden = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device)
    grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device)
    for r0 in range(0, n_rows, row_block):
        h = hidden[r0:r0 + row_block].to(dtype)
        rows_lse = lse[r0:r0 + row_block]
        rows_target = target[r0:r0 + row_block]
        row_ids = torch.arange(h.shape[0], device=h.device)
        for v0 in range(0, n_items, item_chunk):
            w = weight[v0:v0 + item_chunk].to(dtype)
            probs = (h @ w.T).sub_(rows_lse[:, None]).exp_()
            local = rows_target - v0
            hit = (local >= 0) & (local < w.shape[0])
            probs[row_ids[hit], local[hit]] -= 1.0
            probs.mul_(scale)
            grad_hidden[r0:r0 + row_block].addmm_(probs, w)
            grad_weight[v0:v0 + item_chunk].addmm_(probs.T, h)
    return grad_hidden, grad_weight


# ----------------------------------------------------------------------------------------
# Autograd op shared by both backends
# ----------------------------------------------------------------------------------------

class _LinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of CE(hidden @ weight.T, target) / n_rows, on compacted (real) rows.

    forward(hidden (N, D), weight (V, D), target (N,) int64 in [0, V), backend, chunk_size)
    -> 0-d loss in the compute dtype. N = 0 gives loss 0 and zero gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, target, backend, chunk_size):
        n_rows = hidden.shape[0]
        if n_rows == 0:
            lse = hidden.new_empty(0, dtype=_compute_dtype(hidden.dtype))
            loss = hidden.new_zeros((), dtype=_compute_dtype(hidden.dtype))
        elif backend == "triton":
            from .kernels.linear_cross_entropy import triton_lce_forward
            lse, row_loss = triton_lce_forward(hidden, weight, target)
            loss = row_loss.sum() / n_rows
        else:
            lse = _torch_lse(hidden, weight, chunk_size)
            dtype = _compute_dtype(hidden.dtype)
            target_score = (hidden.to(dtype) * weight.index_select(0, target).to(dtype)).sum(1)
            loss = (lse - target_score).sum() / n_rows
        ctx.save_for_backward(hidden, weight, target, lse)
        ctx.backend, ctx.chunk_size = backend, chunk_size
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, target, lse = ctx.saved_tensors
        n_rows = hidden.shape[0]
        if n_rows == 0:
            return torch.zeros_like(hidden), torch.zeros_like(weight), None, None, None
        scale = grad_loss.to(lse.dtype) / n_rows
        if ctx.backend == "triton":
            from .kernels.linear_cross_entropy import triton_lce_backward
            grad_hidden, grad_weight = triton_lce_backward(hidden, weight, target, lse, scale)
        else:
            grad_hidden, grad_weight = _torch_grads(hidden, weight, target, lse, scale,
                                                    ctx.chunk_size)
        return grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype), None, None, None


def _resolve_loss_backend(backend: str, hidden: Tensor) -> str:
    if backend not in LOSS_BACKENDS:
        raise ValueError(f"backend must be one of {LOSS_BACKENDS}, got {backend!r}")
    triton_dtype = hidden.dtype in (torch.float32, torch.bfloat16, torch.float16)
    if backend == "auto":
        if not (hidden.is_cuda and triton_dtype):
            return "torch"
        from .kernels.linear_cross_entropy import triton_supports
        return "triton" if triton_supports(hidden.shape[1], hidden.dtype) else "torch"
    if backend == "triton":
        if not triton_dtype:
            raise TypeError(f"backend='triton' takes float32/bfloat16/float16 hidden and weight, "
                            f"got {hidden.dtype}; use backend='torch'")
        if not hidden.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set "
                             "before triton is imported to run the kernels on the CPU")
    return backend


def linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor,
                         ignore_index: int = -100, chunk_size: int | None = None,
                         backend: str = "auto") -> Tensor:
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
            bf16/fp16, D <= 64 in fp32 -- else torch), "torch" or "triton".

    Returns:
        0-d float32 tensor (float64 for float64 inputs), the mean over non-ignored
        positions. When every position is ignored the loss is 0 and both gradients are
        zero (``F.cross_entropy`` returns NaN there; a batch without targets should not
        poison the parameters).
    """
    _check_hidden_weight(hidden, weight)
    _check_chunk(chunk_size)
    if not isinstance(target, Tensor) or target.shape != hidden.shape[:1]:
        raise ValueError(f"target must be a tensor of shape (M,) = ({hidden.shape[0]},), got "
                         f"{tuple(target.shape) if isinstance(target, Tensor) else type(target)}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must be int64 (or int32), got dtype {target.dtype}")
    if target.device != hidden.device:
        raise ValueError(f"target must be on hidden's device {hidden.device}, got {target.device}")
    backend = _resolve_loss_backend(backend, hidden)

    rows = (target != ignore_index).nonzero().squeeze(1)
    real_target = target.index_select(0, rows).long()
    n_items = weight.shape[0]
    if real_target.numel() and (int(real_target.min()) < 0 or int(real_target.max()) >= n_items):
        raise ValueError(f"target ids must lie in [0, {n_items}) or equal ignore_index="
                         f"{ignore_index}; got values in [{int(real_target.min())}, "
                         f"{int(real_target.max())}]")
    real_hidden = hidden.index_select(0, rows).contiguous()
    return _LinearCrossEntropy.apply(real_hidden, weight.contiguous(), real_target, backend,
                                     chunk_size)


# ----------------------------------------------------------------------------------------
# Streaming evaluation
# ----------------------------------------------------------------------------------------

def _eval_chunk(n_rows: int, n_items: int, chunk_size: int | None) -> int:
    return min(n_items, chunk_size or max(256, _EVAL_BLOCK_ELEMENTS // max(n_rows, 1)))


def _check_eval_args(hidden: Tensor, weight: Tensor, exclude: Tensor | None,
                     padding_idx: int | None, chunk_size: int | None) -> None:
    _check_hidden_weight(hidden, weight)
    _check_chunk(chunk_size)
    n_items = weight.shape[0]
    if padding_idx is not None and not (isinstance(padding_idx, int)
                                        and 0 <= padding_idx < n_items):
        raise ValueError(f"padding_idx must be None or an int in [0, {n_items}), "
                         f"got {padding_idx!r}")
    if exclude is not None:
        if not isinstance(exclude, Tensor) or exclude.dim() != 2 \
                or exclude.shape[0] != hidden.shape[0]:
            got = tuple(exclude.shape) if isinstance(exclude, Tensor) else type(exclude)
            raise ValueError(f"exclude must be an (M, L) tensor with M = {hidden.shape[0]}, "
                             f"got {got}")
        if exclude.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"exclude must hold int64 item ids, got dtype {exclude.dtype}")
        if exclude.device != hidden.device:
            raise ValueError(f"exclude must be on hidden's device {hidden.device}, "
                             f"got {exclude.device}")
        if exclude.numel() and int(exclude.max()) >= n_items:
            raise ValueError(f"exclude holds item id {int(exclude.max())} >= n_items = {n_items}")


def _chunk_scores(hidden: Tensor, weight: Tensor, v0: int, v1: int, exclude: Tensor | None,
                  padding_idx: int | None, finite: Tensor) -> Tensor:
    """(M, v1 - v0) scores (hidden's dtype, float32 or float64) of items v0..v1-1 with
    excluded items set to -inf. ``finite`` (0-d bool) is and-ed in place with whether every
    score was finite before the exclusions (checked once per call, without a host sync)."""
    scores = hidden @ weight[v0:v1].to(hidden.dtype).T
    finite &= torch.isfinite(scores).all()
    if padding_idx is not None and v0 <= padding_idx < v1:
        scores[:, padding_idx - v0] = float("-inf")
    if exclude is not None and exclude.shape[1]:
        local = exclude - v0
        inside = (local >= 0) & (local < v1 - v0)
        # amin-scatter: ids inside the chunk write -inf, all others write +inf (no change),
        # so duplicate indices are harmless and the result is deterministic.
        fill = torch.where(inside, float("-inf"), float("inf")).to(scores.dtype)
        scores.scatter_reduce_(1, local.clamp(0, v1 - v0 - 1), fill, reduce="amin")
    return scores


@torch.no_grad()
def streaming_topk(hidden: Tensor, weight: Tensor, k: int, exclude: Tensor | None = None,
                   padding_idx: int | None = None,
                   chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Top-``k`` items per row of ``hidden @ weight.T``, streamed over item chunks.

    Args:
        hidden: (M, D) float row representations.
        weight: (V, D) item embeddings (same dtype as hidden).
        k: number of items to return, 1 <= k <= V.
        exclude: optional (M, L) int64 item ids never returned for that row (e.g. the
            user's history); negative entries are padding and ignored. Pad with
            ``padding_idx`` or -1.
        padding_idx: an item id (e.g. 0, the padding item) never returned for any row.
        chunk_size: items per chunk (default: about 2**24 scores per chunk).

    Returns:
        (scores, ids): (M, k) float32 (float64 for float64 inputs) in descending order, and
        (M, k) int64. Rows with fewer than k admissible items end with score -inf, id -1.

    Raises NonFiniteScoresError if any score is NaN or infinite.
    """
    _check_eval_args(hidden, weight, exclude, padding_idx, chunk_size)
    n_rows, n_items = hidden.shape[0], weight.shape[0]
    if not isinstance(k, int) or not 1 <= k <= n_items:
        raise ValueError(f"k must be an int in [1, n_items = {n_items}], got {k!r}")
    chunk = _eval_chunk(n_rows, n_items, chunk_size)
    h = hidden.to(_compute_dtype(hidden.dtype))
    best_scores = torch.full((n_rows, k), float("-inf"), dtype=h.dtype, device=hidden.device)
    best_ids = torch.full((n_rows, k), -1, dtype=torch.long, device=hidden.device)
    finite = torch.ones((), dtype=torch.bool, device=hidden.device)
    for v0 in range(0, n_items, chunk):
        v1 = min(v0 + chunk, n_items)
        scores = _chunk_scores(h, weight, v0, v1, exclude, padding_idx, finite)
        chunk_scores, chunk_ids = scores.topk(min(k, v1 - v0), dim=1)
        merged_scores = torch.cat([best_scores, chunk_scores], dim=1)
        merged_ids = torch.cat([best_ids, chunk_ids + v0], dim=1)
        best_scores, order = merged_scores.topk(k, dim=1)
        best_ids = merged_ids.gather(1, order)
    _raise_unless_finite(finite)
    best_ids.masked_fill_(best_scores == float("-inf"), -1)
    return best_scores, best_ids


def _raise_unless_finite(finite: Tensor) -> None:
    if not bool(finite):
        raise NonFiniteScoresError("the scores hold NaN or infinite values, so no ranking is "
                                   "defined (a diverged model or corrupt weights)")


@torch.no_grad()
def streaming_rank(hidden: Tensor, weight: Tensor, target: Tensor, exclude: Tensor | None = None,
                   padding_idx: int | None = None, chunk_size: int | None = None) -> Tensor:
    """Where ``target`` ranks per row under ``hidden @ weight.T``, as two counts over the
    other admissible items, taken while streaming over item chunks: ``above``, the items
    scoring strictly higher, and ``tied``, the items scoring exactly the same.

    Under random tie-breaking the 0-based rank is uniform on above..above + tied (expected
    rank above + tied / 2); ``hymoerec.metrics`` turns the counts into expected HR / NDCG,
    so a model whose scores are all equal ranks like chance. Excluded items (``exclude``,
    ``padding_idx``; see :func:`streaming_topk`) are not counted; the target itself is
    always scored, even if it is listed in ``exclude``, and never counted.

    Args:
        hidden: (M, D) float; weight: (V, D); target: (M,) int64 in [0, V).
    Returns:
        (M, 2) int64 [above, tied], each in [0, V).
    Raises:
        NonFiniteScoresError if any score is NaN or infinite.
    """
    _check_eval_args(hidden, weight, exclude, padding_idx, chunk_size)
    n_rows, n_items = hidden.shape[0], weight.shape[0]
    if not isinstance(target, Tensor) or target.shape != (n_rows,):
        raise ValueError(f"target must be a tensor of shape (M,) = ({n_rows},)")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must be int64 item ids, got dtype {target.dtype}")
    if n_rows and (int(target.min()) < 0 or int(target.max()) >= n_items):
        raise ValueError(f"target ids must lie in [0, {n_items})")
    target = target.long()
    chunk = _eval_chunk(n_rows, n_items, chunk_size)
    h = hidden.to(_compute_dtype(hidden.dtype))
    target_score = (h * weight.index_select(0, target).to(h.dtype)).sum(dim=1, keepdim=True)
    finite = torch.isfinite(target_score).all()
    counts = torch.zeros(n_rows, 2, dtype=torch.long, device=hidden.device)
    for v0 in range(0, n_items, chunk):
        v1 = min(v0 + chunk, n_items)
        scores = _chunk_scores(h, weight, v0, v1, exclude, padding_idx, finite)
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
