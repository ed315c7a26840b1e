"""Triton kernels of the fused linear + cross-entropy loss (see
:mod:`.lce_dispatch`).

For compacted rows h (N, D), item embeddings W (V, D) and targets t (N,), with scores
z = h @ W.T that are only ever held one (BLOCK_M, BLOCK_V) tile at a time (with HAS_OFFSET,
z + b at each row's listed items: a learned scalar b at ``offset_ptr`` and the rows' items as
a bitset (N, cdiv(V, 8)) uint8, bit v % 8 of byte v // 8, read tile by tile):

* ``_lce_forward_kernel``  grid (cdiv(N, BLOCK_M), S): one row block keeps h in registers
  and streams the W tiles of its item split with an online log-sum-exp, picking the target
  score from the same tiles; writes the split's running max, sum of exp and target score
  (S, N) in fp32 (with HAS_OFFSET also the sum of exp over the listed items), which the host
  merges into lse (N,), the per-row loss (N,) and its derivative in b.
* ``_lce_grad_hidden_kernel`` grid (cdiv(N, BLOCK_M), S): recomputes the tiles of a row
  block over its item split, P = softmax - onehot, and writes the partial P @ W (S, N, D).
* ``_lce_grad_weight_kernel`` grid (cdiv(V, BLOCK_V), S): one item tile keeps W in
  registers, streams the row blocks of its row split in order and writes the partial
  P.T @ h (S, V, D).

S (the split count, :func:`pick_split`) spreads a short grid over more programs; it is 1
when the tiles alone fill the GPU, so partial buffers only exist for small N or V. Every
partial is written by exactly one program with a fixed summation order and the host sums
the splits in a fixed order: no atomics, bit-reproducible gradients.

Dots (device_math's ``mma``) accumulate in fp32. fp32 inputs use "tf32x3" (three TF32
tensor-core products, about fp32 accuracy; "ieee" FMA dots spill registers at these tiles on
sm_90, as benchmarks/gpu/compile_card.py shows) unless PyTorch's fp32 matmuls may use TF32
(:func:`tf32_allowed`), then "tf32" (constexpr ALLOW_TF32). bf16/fp16 inputs multiply in
their own type (the P tile is cast to it before the second dot, as in flash attention).

Kernel arguments are plain pointers, ints and constexprs; tile shapes come from
``LCE_CONFIGS`` through the deterministic :func:`pick_config`. The host functions launch on
the inputs' CUDA device.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..device_math import mma
from ..kernel_launch import launch_params, on_device_of, pick_width_config


class LceConfig(NamedTuple):
    """Tiles of the three kernels for a padded width BLOCK_D <= max_block_d and fp32 (or
    16-bit) inputs; BLOCK_M, BLOCK_V, num_warps and num_stages are launch parameters."""
    max_block_d: int
    fp32: bool
    BLOCK_M: int       # rows per tile
    BLOCK_V: int       # items per tile
    num_warps: int
    num_stages: int


# h / W tiles of BLOCK_D columns live in registers: each config is the widest that compiles
# for sm_90 without spills (benchmarks/results/h200_resource_card.md); fp32's tf32x3 dots
# hold more registers, and past D = 64 they spill.
LCE_CONFIGS = (
    LceConfig(max_block_d=128, fp32=False, BLOCK_M=64, BLOCK_V=64, num_warps=4, num_stages=2),
    LceConfig(max_block_d=256, fp32=False, BLOCK_M=64, BLOCK_V=32, num_warps=4, num_stages=2),
    LceConfig(max_block_d=64, fp32=True, BLOCK_M=32, BLOCK_V=32, num_warps=4, num_stages=2),
)
# Widest D the kernels take per input dtype.
MAX_BLOCK_D = {dtype: max(config.max_block_d for config in LCE_CONFIGS
                          if config.fp32 == (dtype == torch.float32))
               for dtype in (torch.bfloat16, torch.float16, torch.float32)}
# Programs a launch aims for per streaming multiprocessor, and the most splits of the
# streamed dimension used to get there.
PROGRAMS_PER_SM = 4
MAX_SPLIT = 16
# Programs aimed for when the kernels run in the CPU interpreter (small, so tiny test
# shapes exercise the splitting).
INTERPRETER_PROGRAMS = 8


def pick_config(block_d: int, fp32: bool) -> LceConfig:
    """The LCE_CONFIGS entry for a feature width padded to ``block_d`` (a power of 2,
    within MAX_BLOCK_D) and fp32 or 16-bit inputs."""
    return pick_width_config(LCE_CONFIGS, block_d, fp32)


def tf32_allowed() -> bool:
    """Whether PyTorch's fp32 CUDA matmuls may use TF32: the ``fp32_precision`` API where
    it exists (torch >= 2.9, where reading the legacy ``allow_tf32`` warns, and raises once
    the new API has been used), else ``allow_tf32``."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if precision is not None:
        return precision == "tf32"
    return torch.backends.cuda.matmul.allow_tf32


def triton_supports(dim: int, dtype: torch.dtype) -> bool:
    """Whether the kernels take hidden states of width ``dim`` in ``dtype``."""
    return dtype in MAX_BLOCK_D and max(16, triton.next_power_of_2(dim)) <= MAX_BLOCK_D[dtype]


def pick_split(n_tiles: int, n_streamed_tiles: int, target_programs: int) -> tuple[int, int]:
    """(S, streamed tiles per split): split the streamed dimension so that n_tiles * S
    reaches target_programs, with at most MAX_SPLIT splits of >= 1 tile and none empty."""
    wanted = min(MAX_SPLIT, n_streamed_tiles, max(1, triton.cdiv(target_programs, n_tiles)))
    tiles_per_split = triton.cdiv(n_streamed_tiles, wanted)
    return triton.cdiv(n_streamed_tiles, tiles_per_split), tiles_per_split


@triton.jit
def _listed_tile(bits_ptr, rows, items, row_ok, item_ok, n_bytes):
    """(BLOCK_M, BLOCK_V) fp32: 1 where item ``items[j]`` is set in row ``rows[i]``'s bitset
    (a uint8 row of n_bytes bytes), else 0."""
    byte = tl.load(bits_ptr + rows.to(tl.int64)[:, None] * n_bytes + (items >> 3)[None, :],
                   mask=row_ok[:, None] & item_ok[None, :], other=0)
    return ((byte.to(tl.int32) >> (items & 7)[None, :]) & 1).to(tl.float32)


@triton.jit
def _lce_forward_kernel(h_ptr, w_ptr, target_ptr, bits_ptr, offset_ptr, part_max_ptr,
                        part_sum_ptr, part_target_ptr, part_listed_ptr, n_rows, n_items, dim,
                        n_bytes,
                        items_per_split, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                        BLOCK_D: tl.constexpr, ALLOW_TF32: tl.constexpr,
                        HAS_OFFSET: tl.constexpr):
    PRECISION: tl.constexpr = "tf32" if ALLOW_TF32 else "tf32x3"
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    row_ok = rows < n_rows
    feats = tl.arange(0, BLOCK_D)
    feat_ok = feats < dim
    h = tl.load(h_ptr + rows.to(tl.int64)[:, None] * dim + feats[None, :],
                mask=row_ok[:, None] & feat_ok[None, :], other=0.0)
    target = tl.load(target_ptr + rows, mask=row_ok, other=-1)
    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_M], tl.float32)
    listed_sum = tl.zeros([BLOCK_M], tl.float32)   # sum of exp over listed items (HAS_OFFSET)
    target_score = tl.zeros([BLOCK_M], tl.float32)
    v_start = split * items_per_split
    v_end = tl.minimum(v_start + items_per_split, n_items)
    for v0 in range(v_start, v_end, BLOCK_V):
        items = v0 + tl.arange(0, BLOCK_V)
        item_ok = items < v_end
        w = tl.load(w_ptr + items.to(tl.int64)[:, None] * dim + feats[None, :],
                    mask=item_ok[:, None] & feat_ok[None, :], other=0.0)
        scores = mma(h, tl.trans(w), None, PRECISION)
        if HAS_OFFSET:
            listed = _listed_tile(bits_ptr, rows, items, row_ok, item_ok, n_bytes)
            scores += tl.load(offset_ptr) * listed
        scores = tl.where(item_ok[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        rescale = tl.exp(running_max - new_max)
        exp_scores = tl.exp(scores - new_max[:, None])
        running_sum = running_sum * rescale + tl.sum(exp_scores, axis=1)
        if HAS_OFFSET:
            listed_sum = listed_sum * rescale + tl.sum(exp_scores * listed, axis=1)
        running_max = new_max
        is_target = items[None, :] == target[:, None]
        target_score += tl.sum(tl.where(is_target, scores, 0.0), axis=1)
    out = split * n_rows + rows
    tl.store(part_max_ptr + out, running_max, mask=row_ok)
    tl.store(part_sum_ptr + out, running_sum, mask=row_ok)
    tl.store(part_target_ptr + out, target_score, mask=row_ok)
    if HAS_OFFSET:
        tl.store(part_listed_ptr + out, listed_sum, mask=row_ok)


@triton.jit
def _grad_logits_tile(h, w, target, lse, rows, items, n_rows, v_end, bits_ptr, offset_ptr,
                      n_bytes, PRECISION: tl.constexpr, HAS_OFFSET: tl.constexpr):
    """softmax - onehot of one (BLOCK_M, BLOCK_V) tile whose scores are h @ w.T (plus the
    offset at the rows' listed items with HAS_OFFSET), zero outside the valid rows/items."""
    scores = mma(h, tl.trans(w), None, PRECISION)
    if HAS_OFFSET:
        scores += tl.load(offset_ptr) * _listed_tile(bits_ptr, rows, items, rows < n_rows,
                                                     items < v_end, n_bytes)
    probs = tl.exp(scores - lse[:, None])
    probs = probs - tl.where(items[None, :] == target[:, None], 1.0, 0.0)
    return tl.where((rows < n_rows)[:, None] & (items < v_end)[None, :], probs, 0.0)


@triton.jit
def _lce_grad_hidden_kernel(h_ptr, w_ptr, target_ptr, lse_ptr, bits_ptr, offset_ptr,
                            part_grad_h_ptr, n_rows, n_items, dim, n_bytes,
                            items_per_split, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                            BLOCK_D: tl.constexpr, ALLOW_TF32: tl.constexpr,
                            HAS_OFFSET: tl.constexpr):
    PRECISION: tl.constexpr = "tf32" if ALLOW_TF32 else "tf32x3"
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    row_ok = rows < n_rows
    feats = tl.arange(0, BLOCK_D)
    feat_ok = feats < dim
    h_offsets = rows.to(tl.int64)[:, None] * dim + feats[None, :]
    h_mask = row_ok[:, None] & feat_ok[None, :]
    h = tl.load(h_ptr + h_offsets, mask=h_mask, other=0.0)
    target = tl.load(target_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    v_start = split * items_per_split
    v_end = tl.minimum(v_start + items_per_split, n_items)
    for v0 in range(v_start, v_end, BLOCK_V):
        items = v0 + tl.arange(0, BLOCK_V)
        item_ok = items < v_end
        w = tl.load(w_ptr + items.to(tl.int64)[:, None] * dim + feats[None, :],
                    mask=item_ok[:, None] & feat_ok[None, :], other=0.0)
        probs = _grad_logits_tile(h, w, target, lse, rows, items, n_rows, v_end, bits_ptr,
                                  offset_ptr, n_bytes, PRECISION, HAS_OFFSET)
        acc += mma(probs.to(w.dtype), w, None, PRECISION)
    part_offsets = split.to(tl.int64) * n_rows * dim + h_offsets
    tl.store(part_grad_h_ptr + part_offsets, acc, mask=h_mask)


@triton.jit
def _lce_grad_weight_kernel(h_ptr, w_ptr, target_ptr, lse_ptr, bits_ptr, offset_ptr,
                            part_grad_w_ptr, n_rows, n_items, dim, n_bytes, rows_per_split,
                            BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                            BLOCK_D: tl.constexpr, ALLOW_TF32: tl.constexpr,
                            HAS_OFFSET: tl.constexpr):
    PRECISION: tl.constexpr = "tf32" if ALLOW_TF32 else "tf32x3"
    items = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    split = tl.program_id(1)
    item_ok = items < n_items
    feats = tl.arange(0, BLOCK_D)
    feat_ok = feats < dim
    w_offsets = items.to(tl.int64)[:, None] * dim + feats[None, :]
    w_mask = item_ok[:, None] & feat_ok[None, :]
    w = tl.load(w_ptr + w_offsets, mask=w_mask, other=0.0)
    acc = tl.zeros([BLOCK_V, BLOCK_D], tl.float32)
    r_start = split * rows_per_split
    r_end = tl.minimum(r_start + rows_per_split, n_rows)
    for r0 in range(r_start, r_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < r_end
        h = tl.load(h_ptr + rows.to(tl.int64)[:, None] * dim + feats[None, :],
                    mask=row_ok[:, None] & feat_ok[None, :], other=0.0)
        target = tl.load(target_ptr + rows, mask=row_ok, other=-1)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        probs = _grad_logits_tile(h, w, target, lse, rows, items, r_end, n_items, bits_ptr,
                                  offset_ptr, n_bytes, PRECISION, HAS_OFFSET)
        acc += mma(tl.trans(probs.to(h.dtype)), h, None, PRECISION)
    part_offsets = split.to(tl.int64) * n_items * dim + w_offsets
    tl.store(part_grad_w_ptr + part_offsets, acc, mask=w_mask)


def _launch_setup(hidden: Tensor) -> tuple[int, LceConfig, bool, int]:
    """(BLOCK_D, config, ALLOW_TF32, target program count) for a launch on hidden."""
    dim = hidden.shape[1]
    block_d = max(16, triton.next_power_of_2(dim))
    if not triton_supports(dim, hidden.dtype):
        raise ValueError(f"the Triton linear_cross_entropy takes D <= "
                         f"{MAX_BLOCK_D.get(hidden.dtype)} in {hidden.dtype}, got D = {dim}; "
                         f"use backend='torch'")
    allow_tf32 = hidden.dtype == torch.float32 and tf32_allowed()
    if hidden.is_cuda:
        sm_count = torch.cuda.get_device_properties(hidden.device).multi_processor_count
        target_programs = PROGRAMS_PER_SM * sm_count
    else:
        target_programs = INTERPRETER_PROGRAMS
    return block_d, pick_config(block_d, hidden.dtype == torch.float32), allow_tf32, target_programs


def listed_bitset(ids: Tensor, n_items: int) -> Tensor:
    """(N, cdiv(n_items, 8)) uint8 bitset of each row's items: bit v % 8 of byte v // 8 is
    item v. ``ids`` (N, L) int64 are :func:`~.score_chunks.distinct_items`
    (each item at most once a row, -1 = none)."""
    present = ids.clamp(min=0)
    bits = torch.zeros(ids.shape[0], triton.cdiv(n_items, 8), dtype=torch.int32,
                       device=ids.device)
    bits.scatter_add_(1, present >> 3, torch.where(ids >= 0, 1 << (present & 7), 0)
                      .to(torch.int32))
    return bits.to(torch.uint8)


def _offset_args(hidden: Tensor, seen_bits: Tensor | None,
                 offset: Tensor | None) -> tuple[Tensor, Tensor, int]:
    """(bits, offset (1,) fp32, bytes per row) kernel arguments; placeholders (never read)
    without an offset."""
    if seen_bits is None:
        return hidden, hidden, 0
    return seen_bits, offset.detach().float().reshape(1), seen_bits.shape[1]


def triton_lce_forward(hidden: Tensor, weight: Tensor, target: Tensor,
                       seen_bits: Tensor | None = None,
                       offset: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """(lse, row_loss, row_loss_grad_offset), float32 (N,), for contiguous hidden (N, D),
    weight (V, D) and int64 target (N,) in [0, V). With ``seen_bits`` (:func:`listed_bitset`,
    (N, cdiv(V, 8)) uint8) each row's listed items score ``offset`` (0-d float) more, and the
    third is d row_loss / d offset = the row's probability on its listed items - [its target
    is listed]; else None."""
    n_rows, dim = hidden.shape
    n_items = weight.shape[0]
    block_d, config, allow_tf32, programs = _launch_setup(hidden)
    row_tiles = triton.cdiv(n_rows, config.BLOCK_M)
    n_split, tiles_per_split = pick_split(row_tiles, triton.cdiv(n_items, config.BLOCK_V),
                                          programs)
    bits, offset_arg, n_bytes = _offset_args(hidden, seen_bits, offset)
    with on_device_of(hidden):
        part_max, part_sum, part_target, part_listed = torch.empty(
            4, n_split, n_rows, dtype=torch.float32, device=hidden.device)
        _lce_forward_kernel[(row_tiles, n_split)](
            hidden, weight, target, bits, offset_arg, part_max, part_sum, part_target,
            part_listed, n_rows, n_items, dim, n_bytes, tiles_per_split * config.BLOCK_V,
            BLOCK_D=block_d, ALLOW_TF32=allow_tf32, HAS_OFFSET=seen_bits is not None,
            **launch_params(config))
        row_max = part_max.amax(dim=0)
        lse = row_max + (part_sum * torch.exp(part_max - row_max)).sum(dim=0).log()
        row_loss = lse - part_target.sum(dim=0)
        if seen_bits is None:
            return lse, row_loss, None
        listed_prob = (part_listed * torch.exp(part_max - lse)).sum(dim=0)
        target_bits = seen_bits.gather(1, (target >> 3)[:, None]).squeeze(1).to(torch.int32)
        target_listed = ((target_bits >> (target & 7).to(torch.int32)) & 1).to(torch.float32)
        return lse, row_loss, listed_prob - target_listed


def triton_lce_backward(hidden: Tensor, weight: Tensor, target: Tensor, lse: Tensor,
                        scale: Tensor, seen_bits: Tensor | None = None,
                        offset: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(grad_hidden (N, D), grad_weight (V, D)) in the inputs' dtype, of scale * sum of the
    per-row losses; ``lse`` float32 (N,) from the forward (with the same ``seen_bits`` and
    ``offset``), ``scale`` a float32 0-d tensor."""
    n_rows, dim = hidden.shape
    n_items = weight.shape[0]
    block_d, config, allow_tf32, programs = _launch_setup(hidden)
    meta = dict(BLOCK_D=block_d, ALLOW_TF32=allow_tf32, HAS_OFFSET=seen_bits is not None,
                **launch_params(config))
    row_tiles = triton.cdiv(n_rows, config.BLOCK_M)
    item_tiles = triton.cdiv(n_items, config.BLOCK_V)
    bits, offset_arg, n_bytes = _offset_args(hidden, seen_bits, offset)
    with on_device_of(hidden):
        n_split, tiles_per_split = pick_split(row_tiles, item_tiles, programs)
        part_grad_hidden = torch.empty(n_split, n_rows, dim, dtype=torch.float32,
                                       device=hidden.device)
        _lce_grad_hidden_kernel[(row_tiles, n_split)](
            hidden, weight, target, lse, bits, offset_arg, part_grad_hidden, n_rows, n_items,
            dim, n_bytes, tiles_per_split * config.BLOCK_V, **meta)

        n_split, tiles_per_split = pick_split(item_tiles, row_tiles, programs)
        part_grad_weight = torch.empty(n_split, n_items, dim, dtype=torch.float32,
                                       device=hidden.device)
        _lce_grad_weight_kernel[(item_tiles, n_split)](
            hidden, weight, target, lse, bits, offset_arg, part_grad_weight, n_rows, n_items,
            dim, n_bytes, tiles_per_split * config.BLOCK_M, **meta)
        grad_hidden = _sum_splits(part_grad_hidden).mul_(scale).to(hidden.dtype)
        grad_weight = _sum_splits(part_grad_weight).mul_(scale).to(weight.dtype)
        return grad_hidden, grad_weight


def _sum_splits(partials: Tensor) -> Tensor:
    """Sum of (S, ...) partials over S in a fixed order; no copy when S = 1."""
    return partials[0] if partials.shape[0] == 1 else partials.sum(dim=0)
