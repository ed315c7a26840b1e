"""Combine y = y_dense + alpha * sum_j g_j f_j(x), fused into a GEMM epilogue, and its backward.

The forward combine is not a separate pass: :func:`combine_gathered_rows` is called in the
epilogue of the dense FFN's down-projection (:func:`.stage3_expert_gemms.dense_down_and_combine`,
a :func:`.stage3_expert_gemms.row_gemm`), which for
each token row gathers the k expert outputs from the expert-sorted rows through
``slot_row`` and adds them, so y is written exactly once and no float atomics are used.
The same epilogue (unit coefficients) sums the k expert input-gradients into dx.

Backward of the gates and of alpha: :func:`gate_grads` computes, per token slot,
r_nj = <dy_n, f_nj> (float32), returns dgates = alpha * r and the per-block partial sums of
sum_j g_nj r_nj whose total is d loss / d alpha.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..backend import INTERPRETING
from ..kernel_launch import launch_params


class GateGradConfig(NamedTuple):
    """Launch parameters of ``_gate_grad_kernel``."""
    BLOCK_T: int       # tokens per program
    BLOCK_D: int       # columns per step
    num_warps: int


GATE_GRAD_CONFIGS = (
    GateGradConfig(BLOCK_T=64, BLOCK_D=32, num_warps=4),
    GateGradConfig(BLOCK_T=16, BLOCK_D=32, num_warps=2),
)


@triton.jit
def combine_gathered_rows(acc, token_rows, row_ok, cols, col_ok, src_ptr, stride_sm, stride_sn,
                          slot_row_ptr, gates_ptr, alpha_ptr, TOP_K: tl.constexpr,
                          GATED: tl.constexpr):
    """acc (BLOCK_M, BLOCK_N) f32 for token rows ``token_rows`` and columns ``cols`` (int64):
    returns acc + sum_j c_j src[slot_row[token*TOP_K + j], cols], c_j = alpha*gates[slot]
    when GATED else 1."""
    if GATED:
        alpha = tl.load(alpha_ptr)
    tile_ok = row_ok[:, None] & col_ok[None, :]
    for j in range(TOP_K):  # a loop, not unrolled: one gathered tile live at a time
        slots = token_rows * TOP_K + j
        src_rows = tl.load(slot_row_ptr + slots, mask=row_ok, other=0).to(tl.int64)
        vals = tl.load(src_ptr + src_rows[:, None] * stride_sm + cols[None, :] * stride_sn,
                       mask=tile_ok, other=0.0).to(tl.float32)
        if GATED:
            coef = alpha * tl.load(gates_ptr + slots, mask=row_ok, other=0.0)
            vals = vals * coef[:, None]
        acc += vals
    return acc


@triton.jit
def _gate_grad_kernel(
    dy_ptr, stride_dym, stride_dyn,
    src_ptr, stride_sm, stride_sn,
    slot_row_ptr, gates_ptr, alpha_ptr, dgates_ptr, dalpha_part_ptr,
    num_tokens, D,
    TOP_K: tl.constexpr, K_POW2: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    tokens = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = tokens < num_tokens
    tokens64 = tokens.to(tl.int64)
    ranks = tl.arange(0, K_POW2)
    dots = tl.zeros((BLOCK_T, K_POW2), dtype=tl.float32)
    for j in range(TOP_K):  # a loop, not unrolled: one gathered tile live at a time
        src_rows = tl.load(slot_row_ptr + tokens64 * TOP_K + j, mask=tok_ok, other=0)
        src_rows = src_rows.to(tl.int64)
        dot = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
            tile_ok = tok_ok[:, None] & (cols < D)[None, :]
            dy = tl.load(dy_ptr + tokens64[:, None] * stride_dym + cols[None, :] * stride_dyn,
                         mask=tile_ok, other=0.0).to(tl.float32)
            f = tl.load(src_ptr + src_rows[:, None] * stride_sm + cols[None, :] * stride_sn,
                        mask=tile_ok, other=0.0).to(tl.float32)
            dot += tl.sum(dy * f, axis=1)
        dots = tl.where(ranks[None, :] == j, dot[:, None], dots)
    slot_ok = tok_ok[:, None] & (ranks < TOP_K)[None, :]
    slots = tokens64[:, None] * TOP_K + ranks[None, :]
    gates = tl.load(gates_ptr + slots, mask=slot_ok, other=0.0)
    tl.store(dgates_ptr + slots, dots * tl.load(alpha_ptr), mask=slot_ok)
    tl.store(dalpha_part_ptr + pid, tl.sum(tl.sum(gates * dots, axis=1), axis=0))


def pick_gate_grad_config(num_tokens: int, D: int) -> GateGradConfig:
    """Config from :data:`GATE_GRAD_CONFIGS` for ``num_tokens`` tokens of width ``D``."""
    big = INTERPRETING or (num_tokens >= 1024 and D >= 64)
    return GATE_GRAD_CONFIGS[0] if big else GATE_GRAD_CONFIGS[1]


def gate_grads(dy: Tensor, expert_out: Tensor, slot_row: Tensor, gates: Tensor,
               alpha: Tensor, config: GateGradConfig | None = None
               ) -> tuple[Tensor, Tensor]:
    """Backward of the combine w.r.t. the gates and alpha.

    dy (N, D); expert_out (P, D) expert-sorted rows f; slot_row (N*k,) int32; gates (N, k)
    f32; alpha (1,) f32. Returns dgates (N, k) f32 = alpha * <dy_n, f_nj> and dalpha (1,) f32
    = sum_nj gates_nj <dy_n, f_nj> (per-block partials summed in a fixed order).
    config: one of :data:`GATE_GRAD_CONFIGS` (default :func:`pick_gate_grad_config`).
    """
    num_tokens, top_k = gates.shape
    D = dy.shape[1]
    config = config or pick_gate_grad_config(num_tokens, D)
    num_blocks = triton.cdiv(num_tokens, config.BLOCK_T)
    dgates = torch.empty(num_tokens, top_k, device=dy.device, dtype=torch.float32)
    dalpha_part = torch.zeros(max(num_blocks, 1), device=dy.device, dtype=torch.float32)
    if num_blocks > 0:
        _gate_grad_kernel[(num_blocks,)](
            dy, dy.stride(0), dy.stride(1), expert_out, expert_out.stride(0), expert_out.stride(1),
            slot_row, gates, alpha, dgates, dalpha_part, num_tokens, D,
            TOP_K=top_k, K_POW2=triton.next_power_of_2(top_k), **launch_params(config),
        )
    return dgates, dalpha_part.sum().reshape(1)
