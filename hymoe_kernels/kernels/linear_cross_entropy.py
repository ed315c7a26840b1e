"""Triton kernels of the fused linear + cross-entropy loss (see :mod:`hymoe_kernels.loss`).

For compacted rows h (N, D), item embeddings W (V, D) and targets t (N,), with scores
z = h @ W.T that are only ever held one (BLOCK_M, BLOCK_V) tile at a time:

* ``_lce_forward_kernel``  grid (cdiv(N, BLOCK_M),): one row block keeps h in registers,
  streams W in BLOCK_V tiles with an online log-sum-exp and picks the target score
  from the same tile; writes lse (N,) and the per-row loss lse - z_t (N,) in fp32.
* ``_lce_grad_hidden_kernel`` grid (cdiv(N, BLOCK_M),): recomputes the tiles of a row
  block, P = softmax - onehot, and accumulates dh = scale * P @ W.
* ``_lce_grad_weight_kernel`` grid (cdiv(V, BLOCK_V),): one item tile keeps W in
  registers, streams all row blocks in order and accumulates dW = scale * P.T @ h. Each
  dW tile is written by exactly one program with a fixed summation order: no atomics,
  bit-reproducible.

Dots accumulate in fp32. fp32 inputs use input_precision="ieee" (exact fp32, like torch's
default ``allow_tf32 = False``) unless ``torch.backends.cuda.matmul.allow_tf32`` is set, then
"tf32" (constexpr ALLOW_TF32). bf16/fp16 inputs multiply in their own type (the P tile is
cast to it before the second dot, as in flash attention).

Kernel arguments are plain pointers, ints and constexprs; tile shapes come from
``LCE_CONFIGS`` through the deterministic :func:`pick_config`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# (BLOCK_M rows, BLOCK_V items, num_warps, num_stages); pick_config chooses by BLOCK_D.
LCE_CONFIGS = (
    (64, 64, 4, 2),
    (64, 32, 4, 2),
)
# Widest D the kernels take: h / W tiles of BLOCK_D columns live in registers.
MAX_BLOCK_D = 256


def pick_config(block_d: int) -> tuple[int, int, int, int]:
    """The LCE_CONFIGS entry for a feature width padded to ``block_d`` (a power of 2)."""
    if block_d <= 128:
        return LCE_CONFIGS[0]
    return LCE_CONFIGS[1]


@triton.jit
def _dot(a, b, ALLOW_TF32: tl.constexpr):
    if ALLOW_TF32:
        product = tl.dot(a, b, input_precision="tf32")
    else:
        product = tl.dot(a, b, input_precision="ieee")
    return product


@triton.jit
def _lce_forward_kernel(h_ptr, w_ptr, target_ptr, lse_ptr, row_loss_ptr, n_rows, n_items, dim,
                        BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                        ALLOW_TF32: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    feats = tl.arange(0, BLOCK_D)
    feat_ok = feats < dim
    h = tl.load(h_ptr + rows.to(tl.int64)[:, None] * dim + feats[None, :],
                mask=row_ok[:, None] & feat_ok[None, :], other=0.0)
    target = tl.load(target_ptr + rows, mask=row_ok, other=-1)
    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_M], tl.float32)
    target_score = tl.zeros([BLOCK_M], tl.float32)
    for v0 in range(0, n_items, BLOCK_V):
        items = v0 + tl.arange(0, BLOCK_V)
        item_ok = items < n_items
        w = tl.load(w_ptr + items.to(tl.int64)[:, None] * dim + feats[None, :],
                    mask=item_ok[:, None] & feat_ok[None, :], other=0.0)
        scores = _dot(h, tl.trans(w), ALLOW_TF32)
        scores = tl.where(item_ok[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) \
            + tl.sum(tl.exp(scores - new_max[:, None]), axis=1)
        running_max = new_max
        is_target = items[None, :] == target[:, None]
        target_score += tl.sum(tl.where(is_target, scores, 0.0), axis=1)
    lse = running_max + tl.log(running_sum)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(row_loss_ptr + rows, lse - target_score, mask=row_ok)


@triton.jit
def _lce_grad_hidden_kernel(h_ptr, w_ptr, target_ptr, lse_ptr, scale_ptr, grad_h_ptr,
                            n_rows, n_items, dim,
                            BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                            BLOCK_D: tl.constexpr, ALLOW_TF32: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    feats = tl.arange(0, BLOCK_D)
    feat_ok = feats < dim
    h_offsets = rows.to(tl.int64)[:, None] * dim + feats[None, :]
    h_mask = row_ok[:, None] & feat_ok[None, :]
    h = tl.load(h_ptr + h_offsets, mask=h_mask, other=0.0)
    target = tl.load(target_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for v0 in range(0, n_items, BLOCK_V):
        items = v0 + tl.arange(0, BLOCK_V)
        item_ok = items < n_items
        w = tl.load(w_ptr + items.to(tl.int64)[:, None] * dim + feats[None, :],
                    mask=item_ok[:, None] & feat_ok[None, :], other=0.0)
        scores = _dot(h, tl.trans(w), ALLOW_TF32)
        probs = tl.exp(scores - lse[:, None])
        probs = probs - tl.where(items[None, :] == target[:, None], 1.0, 0.0)
        probs = tl.where(row_ok[:, None] & item_ok[None, :], probs, 0.0)
        acc += _dot(probs.to(w.dtype), w, ALLOW_TF32)
    scale = tl.load(scale_ptr)
    tl.store(grad_h_ptr + h_offsets, (acc * scale).to(grad_h_ptr.dtype.element_ty), mask=h_mask)


@triton.jit
def _lce_grad_weight_kernel(h_ptr, w_ptr, target_ptr, lse_ptr, scale_ptr, grad_w_ptr,
                            n_rows, n_items, dim,
                            BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                            BLOCK_D: tl.constexpr, ALLOW_TF32: tl.constexpr):
    items = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    item_ok = items < n_items
    feats = tl.arange(0, BLOCK_D)
    feat_ok = feats < dim
    w_offsets = items.to(tl.int64)[:, None] * dim + feats[None, :]
    w_mask = item_ok[:, None] & feat_ok[None, :]
    w = tl.load(w_ptr + w_offsets, mask=w_mask, other=0.0)
    acc = tl.zeros([BLOCK_V, BLOCK_D], tl.float32)
    for r0 in range(0, n_rows, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        h = tl.load(h_ptr + rows.to(tl.int64)[:, None] * dim + feats[None, :],
                    mask=row_ok[:, None] & feat_ok[None, :], other=0.0)
        target = tl.load(target_ptr + rows, mask=row_ok, other=-1)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        scores = _dot(h, tl.trans(w), ALLOW_TF32)
        probs = tl.exp(scores - lse[:, None])
        probs = probs - tl.where(items[None, :] == target[:, None], 1.0, 0.0)
        probs = tl.where(row_ok[:, None] & item_ok[None, :], probs, 0.0)
        acc += _dot(tl.trans(probs.to(h.dtype)), h, ALLOW_TF32)
    scale = tl.load(scale_ptr)
    tl.store(grad_w_ptr + w_offsets, (acc * scale).to(grad_w_ptr.dtype.element_ty), mask=w_mask)


def _launch_params(hidden: Tensor) -> tuple[int, tuple[int, int, int, int], bool]:
    dim = hidden.shape[1]
    block_d = max(16, triton.next_power_of_2(dim))
    if block_d > MAX_BLOCK_D:
        raise ValueError(f"the Triton linear_cross_entropy takes D <= {MAX_BLOCK_D}, got "
                         f"D = {dim}; use backend='torch'")
    allow_tf32 = hidden.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return block_d, pick_config(block_d), allow_tf32


def triton_lce_forward(hidden: Tensor, weight: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(lse, row_loss), both float32 (N,), for contiguous hidden (N, D), weight (V, D) and
    int64 target (N,) in [0, V)."""
    n_rows, dim = hidden.shape
    n_items = weight.shape[0]
    block_d, (block_m, block_v, num_warps, num_stages), allow_tf32 = _launch_params(hidden)
    lse = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    row_loss = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    _lce_forward_kernel[(triton.cdiv(n_rows, block_m),)](
        hidden, weight, target, lse, row_loss, n_rows, n_items, dim,
        BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_D=block_d, ALLOW_TF32=allow_tf32,
        num_warps=num_warps, num_stages=num_stages)
    return lse, row_loss


def triton_lce_backward(hidden: Tensor, weight: Tensor, target: Tensor, lse: Tensor,
                        scale: Tensor) -> tuple[Tensor, Tensor]:
    """(grad_hidden (N, D), grad_weight (V, D)) in the inputs' dtype, of scale * sum of the
    per-row losses; ``scale`` is a float32 0-d tensor on the inputs' device."""
    n_rows, dim = hidden.shape
    n_items = weight.shape[0]
    block_d, (block_m, block_v, num_warps, num_stages), allow_tf32 = _launch_params(hidden)
    scale = scale.reshape(1).contiguous()
    grad_hidden = torch.empty_like(hidden)
    grad_weight = torch.empty_like(weight)
    meta = dict(BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_D=block_d, ALLOW_TF32=allow_tf32,
                num_warps=num_warps, num_stages=num_stages)
    _lce_grad_hidden_kernel[(triton.cdiv(n_rows, block_m),)](
        hidden, weight, target, lse, scale, grad_hidden, n_rows, n_items, dim, **meta)
    _lce_grad_weight_kernel[(triton.cdiv(n_items, block_v),)](
        hidden, weight, target, lse, scale, grad_weight, n_rows, n_items, dim, **meta)
    return grad_hidden, grad_weight
