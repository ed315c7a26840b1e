"""Grouped GEMMs over expert-sorted token rows, with fused gathers and epilogues.

Two kernel templates cover every matrix product of the layer, forward and backward:

* :func:`row_gemm` -- ``out[m] = epilogue(prologue(A)[m] @ W[g])``, one output row per input
  row. With ``routing`` the rows are the padded, expert-sorted slot layout built by
  :mod:`.stage2_permutation` (group g = expert of the tile; tiles past the last group exit
  early) and A rows may be *gathered* from token rows through the permutation (no permuted
  copy of x is ever written) and scaled by ``alpha * gate``. Prologue: optional exact GELU
  on A.
  Epilogue: bias, GELU'(pre) multiply (backward), residual add, and the combine gather of
  :mod:`.stage4_combine`. One launch covers all experts; padding rows are written as zeros.
* :func:`weight_grad` -- ``dW[g] = prologue(A_g)^T @ prologue(B_g)`` and ``db[g] = sum_rows B_g``
  reduced over the rows of each group, split into a shape-determined number of row chunks
  whose fp32 partials are summed afterwards (deterministic: no atomics).

The layer's forward calls them by the stage they compute: :func:`linear` (the router's and
the dense FFN's first layer), :func:`expert_up`, :func:`expert_down` and
:func:`dense_down_and_combine` (the dense down-projection with the combine epilogue).

Dots take operands in the weights' dtype and accumulate in fp32. fp32 operands use
``input_precision="ieee"`` (true fp32, not tf32) so fp32 results match PyTorch to ~1e-6;
bf16/fp16 use the tensor cores. Row and column indices are int64 before they multiply a stride
(a column-major input or transposed weight beyond 2^31 elements stays addressable).
Block configs are fixed tuples picked by a deterministic function of the shapes (no autotune).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..backend import INTERPRETING
from ..device_math import cast_to, dot_precision, gelu, gelu_and_grad, mma
from ..kernel_launch import MAX_PARTIAL_ELEMENTS, launch_params
from .stage2_permutation import GROUP_PAD, Routing
from .stage4_combine import combine_gathered_rows


class RowGemmConfig(NamedTuple):
    """Launch parameters of ``_row_gemm_kernel``: a (BLOCK_M, BLOCK_N) output tile,
    reducing BLOCK_K columns of A a step."""
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int
    num_stages: int


class WeightGradConfig(NamedTuple):
    """Launch parameters of ``_weight_grad_kernel``: a (BLOCK_K, BLOCK_N) tile of dW,
    reducing BLOCK_R rows a step."""
    BLOCK_K: int
    BLOCK_N: int
    BLOCK_R: int
    num_warps: int
    num_stages: int


# Each compiles for sm_90 with no register spills under Triton 3.6 and 3.9 in every variant
# the host launches (benchmarks/results/h200_resource_card.md). With 2 stages instead of 3
# (and 8 warps for the 64x64 row tile) ptxas spills a few values rather than exceed 72-96
# registers, mostly in fp32 FMA ("ieee") variants.
ROW_GEMM_CONFIGS = (
    RowGemmConfig(BLOCK_M=64, BLOCK_N=128, BLOCK_K=16, num_warps=8, num_stages=2),
    RowGemmConfig(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),
    RowGemmConfig(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),
    RowGemmConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=3),
)
WEIGHT_GRAD_CONFIGS = (
    WeightGradConfig(BLOCK_K=64, BLOCK_N=64, BLOCK_R=32, num_warps=8, num_stages=3),
    WeightGradConfig(BLOCK_K=32, BLOCK_N=64, BLOCK_R=16, num_warps=4, num_stages=2),
    WeightGradConfig(BLOCK_K=16, BLOCK_N=32, BLOCK_R=16, num_warps=2, num_stages=2),
)
# Every row-GEMM tile of a grouped GEMM lies inside one expert's group: BLOCK_M divides the
# groups' padding.
assert all(GROUP_PAD % cfg.BLOCK_M == 0 for cfg in ROW_GEMM_CONFIGS)
# Enough programs to fill a large GPU; weight-grad row splits aim for this many programs.
TARGET_PROGRAMS = 264


@triton.jit
def _row_gemm_kernel(
    a_ptr, stride_am, stride_ak,
    w_ptr, stride_wg, stride_wk, stride_wn,
    bias_ptr, stride_bias_g, stride_bias_n,
    out_ptr, stride_om, stride_on,
    pre_ptr, stride_pm, stride_pn,
    res_ptr, stride_rm, stride_rn,
    src_ptr, stride_sm, stride_sn,
    row_slot_ptr, slot_row_ptr, group_start_ptr, group_count_ptr, gates_ptr, alpha_ptr,
    M, N, K, num_groups,
    TOP_K: tl.constexpr, GROUPED: tl.constexpr, A_GATHER: tl.constexpr,
    A_SCALE: tl.constexpr, A_GELU: tl.constexpr, HAS_BIAS: tl.constexpr,
    EPI_GELU_GRAD: tl.constexpr, HAS_RESIDUAL: tl.constexpr, COMBINE: tl.constexpr,
    E_POW2: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    row0 = pid_m * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    if GROUPED:
        groups = tl.arange(0, E_POW2)
        ends = tl.load(group_start_ptr + 1 + groups, mask=groups < num_groups, other=2147483647)
        group = tl.sum((ends <= row0).to(tl.int32), axis=0)
        if group >= num_groups:  # past the last group: rows are padding, written as zeros
            cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
            tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_on,
                     tl.zeros((BLOCK_M, BLOCK_N), dtype=out_ptr.dtype.element_ty),
                     mask=(rows < M)[:, None] & (cols < N)[None, :])
            return
        row_ok = rows < tl.load(group_start_ptr + group) + tl.load(group_count_ptr + group)
        store_ok = rows < M
    else:
        group = 0
        row_ok = rows < M
        store_ok = row_ok
    if A_GATHER:
        slots = tl.load(row_slot_ptr + rows, mask=row_ok, other=0)
        a_rows = (slots // TOP_K).to(tl.int64)
        if A_SCALE:
            scale = tl.load(gates_ptr + slots, mask=row_ok, other=0.0) * tl.load(alpha_ptr)
    else:
        a_rows = rows.to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    col_ok = cols < N
    w_base = w_ptr + group.to(tl.int64) * stride_wg
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_ok = ks < K
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if A_GELU:
            a = gelu(a.to(tl.float32))
        if A_SCALE:
            a = a.to(tl.float32) * scale[:, None]
        w = tl.load(w_base + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = mma(cast_to(a, w.dtype), w, acc, DOT_PRECISION)
    out_rows = rows.to(tl.int64)
    tile_ok = row_ok[:, None] & col_ok[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + group * stride_bias_g + cols * stride_bias_n, mask=col_ok,
                       other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if EPI_GELU_GRAD:
        pre = tl.load(pre_ptr + out_rows[:, None] * stride_pm + cols[None, :] * stride_pn,
                      mask=tile_ok, other=0.0)
        acc *= gelu_and_grad(pre.to(tl.float32))[1]
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + out_rows[:, None] * stride_rm + cols[None, :] * stride_rn,
                       mask=tile_ok, other=0.0).to(tl.float32)
    if COMBINE != 0:
        acc = combine_gathered_rows(acc, out_rows, row_ok, cols, col_ok, src_ptr, stride_sm,
                                    stride_sn, slot_row_ptr, gates_ptr, alpha_ptr, TOP_K,
                                    COMBINE == 1)
    if GROUPED:
        acc = tl.where(row_ok[:, None], acc, 0.0)
    tl.store(out_ptr + out_rows[:, None] * stride_om + cols[None, :] * stride_on,
             cast_to(acc, out_ptr.dtype.element_ty), mask=store_ok[:, None] & col_ok[None, :])


@triton.jit
def _weight_grad_kernel(
    a_ptr, stride_am, stride_ak,
    b_ptr, stride_bm, stride_bn,
    dw_ptr, db_ptr,
    row_slot_ptr, group_start_ptr, group_count_ptr, gates_ptr, alpha_ptr,
    M, K, N, num_groups, num_splits,
    TOP_K: tl.constexpr, GROUPED: tl.constexpr, A_GATHER: tl.constexpr,
    A_GELU: tl.constexpr, B_GATHER: tl.constexpr, B_SCALE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_n = tl.program_id(2)
    group = pid // num_splits
    split = pid % num_splits
    if GROUPED:
        start = tl.load(group_start_ptr + group)
        count = tl.load(group_count_ptr + group)
    else:
        start = 0
        count = M
    chunk = tl.cdiv(tl.cdiv(count, num_splits), BLOCK_R) * BLOCK_R
    lo = start + split * chunk
    hi = tl.minimum(lo + chunk, start + count)
    ks = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    k_ok = ks < K
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    col_ok = cols < N
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(lo, hi, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < hi
        if A_GATHER or B_GATHER:
            slots = tl.load(row_slot_ptr + rows, mask=row_ok, other=0)
            tokens = (slots // TOP_K).to(tl.int64)
        if A_GATHER:
            a_rows = tokens
        else:
            a_rows = rows.to(tl.int64)
        if B_GATHER:
            b_rows = tokens
        else:
            b_rows = rows.to(tl.int64)
        a_t = tl.load(a_ptr + a_rows[None, :] * stride_am + ks[:, None] * stride_ak,
                      mask=k_ok[:, None] & row_ok[None, :], other=0.0)
        if A_GELU:
            a_t = cast_to(gelu(a_t.to(tl.float32)), a_ptr.dtype.element_ty)
        b = tl.load(b_ptr + b_rows[:, None] * stride_bm + cols[None, :] * stride_bn,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if B_SCALE:
            gate = tl.load(gates_ptr + slots, mask=row_ok, other=0.0) * tl.load(alpha_ptr)
            b = b.to(tl.float32) * gate[:, None]
        db_acc += tl.sum(b.to(tl.float32), axis=0)
        acc = mma(a_t, cast_to(b, a_ptr.dtype.element_ty), acc, DOT_PRECISION)
    out = pid.to(tl.int64) * K * N
    tl.store(dw_ptr + out + ks[:, None] * N + cols[None, :], acc,
             mask=k_ok[:, None] & col_ok[None, :])
    if pid_k == 0:
        tl.store(db_ptr + pid.to(tl.int64) * N + cols, db_acc, mask=col_ok)


def pick_row_gemm_config(rows: int, n: int, k: int) -> RowGemmConfig:
    """Config from :data:`ROW_GEMM_CONFIGS` for ``rows`` x ``n`` outputs reducing over ``k``."""
    if INTERPRETING or rows >= 4096 and n >= 128 and k >= 64:
        return ROW_GEMM_CONFIGS[0]
    if rows >= 1024 and n >= 64:
        return ROW_GEMM_CONFIGS[1]
    if n >= 64 and k >= 32:
        return ROW_GEMM_CONFIGS[2]
    return ROW_GEMM_CONFIGS[3]


def pick_weight_grad_config(k: int, n: int) -> WeightGradConfig:
    """Config from :data:`WEIGHT_GRAD_CONFIGS` for a (k, n) weight gradient."""
    if INTERPRETING or k >= 64 and n >= 64:
        return WEIGHT_GRAD_CONFIGS[0]
    if k >= 32 and n >= 64:
        return WEIGHT_GRAD_CONFIGS[1]
    return WEIGHT_GRAD_CONFIGS[2]


def _strides2(t: Tensor | None) -> tuple[int, int]:
    return (0, 0) if t is None else (t.stride(0), t.stride(1))


def row_gemm(a: Tensor, w: Tensor, bias: Tensor | None = None, *, routing: Routing | None = None,
             gather: bool = False, gates: Tensor | None = None, alpha: Tensor | None = None,
             a_gelu: bool = False, gelu_grad_of: Tensor | None = None,
             residual: Tensor | None = None, combine_src: Tensor | None = None,
             combine_gated: bool = False, out_dtype: torch.dtype | None = None,
             config: RowGemmConfig | None = None) -> Tensor:
    """``out = epilogue(prologue(A) @ W)`` row by row; see the module docstring.

    w: (K, N) for a plain GEMM over the M rows of a, or (E, K, N) for a grouped GEMM over the
    padded expert-sorted rows of ``routing`` (any strides: pass ``w.transpose(-1, -2)`` for W^T).
    a: (M, K); with ``gather`` the token rows (N_tok, K), row r reading token row_slot[r] // top_k,
    scaled by ``alpha * gates[slot]`` when ``gates`` (N_tok*top_k,) f32 and ``alpha`` (1,) f32
    are given. a_gelu: apply exact GELU to A. bias: (N,) or (E, N).
    Epilogue, in order: + bias; * GELU'(gelu_grad_of) (rows, N); + residual (rows, N);
    with ``combine_src`` (P, N): + sum_j c_j combine_src[slot_row[m*top_k + j]] for token row
    m, c_j = alpha * gates[m*top_k + j] if ``combine_gated`` else 1.
    config: one of :data:`ROW_GEMM_CONFIGS` (default :func:`pick_row_gemm_config`).
    Returns out (rows, N) in ``out_dtype`` (default w's dtype); with a grouped GEMM the rows
    of groups' padding are zeros.
    """
    grouped = w.dim() == 3
    if (grouped or gather or combine_src is not None) and routing is None:
        raise ValueError("row_gemm: routing is required for grouped, gathered or combined GEMMs")
    if grouped:
        num_groups, K, N = w.shape
        M = routing.row_slot.shape[0]
        w_strides = w.stride()
    else:
        num_groups, (K, N), M = 1, w.shape, a.shape[0]
        w_strides = (0,) + w.stride()
    if a.shape[1] != K:
        raise ValueError(f"row_gemm: a has {a.shape[1]} columns, w expects K={K}")
    out = torch.empty(M, N, device=a.device, dtype=out_dtype or w.dtype)
    if M == 0 or N == 0:
        return out
    config = config or pick_row_gemm_config(M, N, K)
    unused = out  # placeholder pointer for operands a variant does not read
    layout = routing or Routing(unused, unused, unused, unused, 1)
    grid = (triton.cdiv(M, config.BLOCK_M), triton.cdiv(N, config.BLOCK_N))
    _row_gemm_kernel[grid](
        a, a.stride(0), a.stride(1),
        w, *w_strides,
        unused if bias is None else bias, 0 if bias is None or bias.dim() == 1 else bias.stride(0),
        0 if bias is None else bias.stride(-1),
        out, out.stride(0), out.stride(1),
        unused if gelu_grad_of is None else gelu_grad_of, *_strides2(gelu_grad_of),
        unused if residual is None else residual, *_strides2(residual),
        unused if combine_src is None else combine_src, *_strides2(combine_src),
        layout.row_slot, layout.slot_row, layout.group_start, layout.group_count,
        unused if gates is None else gates, unused if alpha is None else alpha,
        M, N, K, num_groups,
        TOP_K=layout.top_k, GROUPED=grouped, A_GATHER=gather, A_SCALE=gather and gates is not None,
        A_GELU=a_gelu, HAS_BIAS=bias is not None, EPI_GELU_GRAD=gelu_grad_of is not None,
        HAS_RESIDUAL=residual is not None,
        COMBINE=0 if combine_src is None else (1 if combine_gated else 2),
        E_POW2=triton.next_power_of_2(num_groups), DOT_PRECISION=dot_precision(w.dtype),
        **launch_params(config),
    )
    return out


def linear(a: Tensor, w: Tensor, bias: Tensor) -> Tensor:
    """a @ w + bias, one row per token: a (N, K), w (K, N_out), bias (N_out,). Returns
    (N, N_out) in w's dtype (the pre-activation of the router's or the dense FFN's first
    layer)."""
    return row_gemm(a, w, bias)


def expert_up(x: Tensor, w1: Tensor, b1: Tensor, routing: Routing) -> Tensor:
    """The experts' up-projection in the expert-sorted layout: row r (slot s, expert e) is
    x[s // top_k] @ w1[e] + b1[e], the token rows gathered through ``routing`` (no permuted
    copy of x). x (N, D); w1 (E, D, F), b1 (E, F). Returns the pre-activation (P, F) in w1's
    dtype, P = len(routing.row_slot), padding rows zero."""
    return row_gemm(x, w1, b1, routing=routing, gather=True)


def expert_down(hidden: Tensor, w2: Tensor, b2: Tensor, routing: Routing) -> Tensor:
    """The experts' outputs f_e = gelu(hidden) @ w2[e] + b2[e] row by row of the
    expert-sorted layout: hidden (P, F) from :func:`expert_up`; w2 (E, F, D), b2 (E, D).
    Returns (P, D) in w2's dtype, padding rows zero."""
    return row_gemm(hidden, w2, b2, routing=routing, a_gelu=True)


def dense_down_and_combine(hidden: Tensor, w2: Tensor, b2: Tensor, expert_out: Tensor,
                           routing: Routing, gates: Tensor, alpha: Tensor,
                           out_dtype: torch.dtype) -> Tensor:
    """The layer's output, written once: the dense FFN's down-projection
    gelu(hidden) @ w2 + b2 with the combine in its epilogue, + alpha * sum_j gates[n, j] *
    expert_out[slot_row[n * top_k + j]] for token n. hidden (N, F) the dense FFN's
    pre-activation; w2 (F, D), b2 (D,); expert_out (P, D) from :func:`expert_down`; gates
    (N, top_k) float32; alpha (1,) float32. Returns y (N, D) in ``out_dtype``."""
    return row_gemm(hidden, w2, b2, a_gelu=True, routing=routing, gates=gates, alpha=alpha,
                    combine_src=expert_out, combine_gated=True, out_dtype=out_dtype)


def weight_grad(a: Tensor, b: Tensor, *, routing: Routing | None = None,
                a_gather: bool = False, a_gelu: bool = False, b_gather: bool = False,
                gates: Tensor | None = None, alpha: Tensor | None = None,
                config: WeightGradConfig | None = None) -> tuple[Tensor, Tensor]:
    """Weight and bias gradients ``dW = A^T @ B``, ``db = sum_rows B``, per group.

    a: (M, K), b: (M, N) row-aligned, or with ``routing`` the padded expert-sorted rows (P, .)
    of its E groups;
    a_gather / b_gather: read token row row_slot[r] // top_k of a (N_tok, K) / b (N_tok, N)
    instead of row r; with ``gates`` (N_tok*top_k,) f32 and ``alpha`` (1,) f32 the B rows are
    scaled by alpha * gates[slot]. a_gelu: use GELU(A). config: one of
    :data:`WEIGHT_GRAD_CONFIGS` (default :func:`pick_weight_grad_config`). Returns dW (K, N)
    or (E, K, N) and db (N,) or (E, N) as float32; the dot runs in a's dtype.
    """
    grouped = routing is not None
    num_groups = routing.group_count.shape[0] if grouped else 1
    K, N = a.shape[1], b.shape[1]
    M = routing.row_slot.shape[0] if grouped else a.shape[0]
    config = config or pick_weight_grad_config(K, N)
    tiles = num_groups * triton.cdiv(K, config.BLOCK_K) * triton.cdiv(N, config.BLOCK_N)
    rows_per_group = (routing.slot_row.shape[0] // num_groups) if grouped else M
    num_splits = max(1, min(triton.cdiv(TARGET_PROGRAMS, tiles),
                            rows_per_group // (4 * config.BLOCK_R),
                            MAX_PARTIAL_ELEMENTS // max(1, num_groups * K * N)))
    dw = torch.empty(num_splits * num_groups, K, N, device=a.device, dtype=torch.float32)
    db = torch.empty(num_splits * num_groups, N, device=a.device, dtype=torch.float32)
    layout = routing or Routing(dw, dw, dw, dw, 1)
    grid = (num_splits * num_groups, triton.cdiv(K, config.BLOCK_K),
            triton.cdiv(N, config.BLOCK_N))
    _weight_grad_kernel[grid](
        a, a.stride(0), a.stride(1), b, b.stride(0), b.stride(1), dw, db,
        layout.row_slot, layout.group_start, layout.group_count,
        dw if gates is None else gates, dw if alpha is None else alpha,
        M, K, N, num_groups, num_splits,
        TOP_K=layout.top_k, GROUPED=grouped, A_GATHER=a_gather, A_GELU=a_gelu,
        B_GATHER=b_gather, B_SCALE=gates is not None,
        DOT_PRECISION=dot_precision(a.dtype), **launch_params(config),
    )
    # splits are the leading index of each group's partials: program id = group * splits + split
    dw = dw.view(num_groups, num_splits, K, N).sum(1)
    db = db.view(num_groups, num_splits, N).sum(1)
    if not grouped:
        dw, db = dw[0], db[0]
    return dw, db
