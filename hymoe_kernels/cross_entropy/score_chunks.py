"""What the fused loss's torch path and the streamed rankings share: blocks of the scores
``hidden @ weight[v0:v1].T`` over item chunks.

Both walk the catalog chunk by chunk and never hold the (rows x items) score matrix: the
checks of their operands, the budget of one score block, the accumulation dtype, and each
row's listed items (seen items, exclusions) scattered into a chunk or given a score offset.
"""
from __future__ import annotations

import torch
from torch import Tensor

# Budget of one block of scores (rows x items), in elements. On the CPU, 2**21 fp32 values
# (8 MiB) per intra-op thread: the block stays in the last-level cache between the GEMM that
# writes it and the passes that read it (the log-sum-exp, the comparisons with the target),
# and it is large enough that the barriers of each block's parallel regions cost little.
# On CUDA, 2**24 (64 MiB) per block.
BLOCK_ELEMENTS_PER_CPU_THREAD = 1 << 21
CUDA_BLOCK_ELEMENTS = 1 << 24


def score_block_elements(device: torch.device) -> int:
    """Scores (rows x items) one block may hold on ``device``: CUDA_BLOCK_ELEMENTS, or
    BLOCK_ELEMENTS_PER_CPU_THREAD per intra-op thread on the CPU."""
    if device.type == "cuda":
        return CUDA_BLOCK_ELEMENTS
    return BLOCK_ELEMENTS_PER_CPU_THREAD * torch.get_num_threads()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of scores of ``dtype`` inputs: float32, or float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def _check_matrix(name: str, value: Tensor) -> None:
    """TypeError / ValueError unless ``value`` is a 2-d floating-point tensor."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {value.dtype}")


def check_hidden_weight(hidden: Tensor, weight: Tensor) -> None:
    """The operands of the scores ``hidden @ weight.T`` (of the loss and of the streamed
    rankings): hidden (M, D) and weight (V >= 1, D), floating point, of one dtype and
    device; else TypeError / ValueError naming them."""
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
