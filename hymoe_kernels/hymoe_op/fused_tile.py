"""Fused token-tile HyMoE for small model widths (recommender layers: D <= 128 in bf16/fp16,
D <= 64 in fp32; see :func:`fused_tile_supported`).

At such widths the layer is bound by memory traffic and kernel launches, not by FLOPs, so
this path keeps everything a tile of BLOCK_M tokens needs on chip, from the router to the
combine, and evaluates *every* expert on the tile (with E small that costs less than
permuting tokens), zeroing the gates of the experts a token did not choose:

* forward  -- one kernel: router logits (two linear layers, GELU), top-k, softmax over the
  kept logits, per-tile partial sums of the full router softmax and of the slot counts,
  dense FFN + alpha * gated expert FFNs (looping over F in chunks), y written once;
* backward -- two kernels: a token-tile kernel that recomputes the forward and writes dx,
  the router-logit gradient, the scaled gates and per-tile partials of d alpha; then a
  weight-gradient kernel, one program per (FFN, hidden chunk, token split), that writes
  per-split partial weight gradients, summed over the splits afterwards.

Every reduction is a fixed-order sum of partials (no float atomics), so results are
bitwise reproducible. Block configurations are module-level tuples picked by model width.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..device_math import (cast_to, fp16_range_scale, gelu_and_grad, mma, top_k_step,
                           without_nan)
from ..kernel_launch import MAX_PARTIAL_ELEMENTS, launch_params, pick_width_config
from ..weights import HyMoEWeights, check_kernel_inputs

MAX_FUSED_D = {torch.float32: 64, torch.bfloat16: 128, torch.float16: 128}   # see TileConfig
MAX_FUSED_E = 16           # selected experts are kept as a bitmask in one int32 per token
MAX_FUSED_H = 4096         # router hidden width (looped in chunks, bounded for compile size)


class TileConfig(NamedTuple):
    """Block sizes of one kernel for next_pow2(D) <= max_block_d and fp32 (or 16-bit) inputs
    (the upper-case fields and num_warps / num_stages are the kernel's launch parameters).

    Chosen so that every config compiles for sm_90 without register spills under Triton 3.6
    and 3.9 (and, where registers allow, with BLOCK_M = 64 so the token-side dots run on
    warpgroup MMA); see
    benchmarks/results/h200_resource_card.md. Both backward kernels spill at every tile shape
    tried at BLOCK_D = 256 (16-bit) and at BLOCK_D = 128 (fp32, whose dots run as three TF32
    products), hence MAX_FUSED_D.
    """

    max_block_d: int
    fp32: bool
    BLOCK_M: int      # tokens per tile
    BLOCK_F: int      # FFN hidden (and router hidden) chunk
    num_warps: int
    num_stages: int


FORWARD_CONFIGS = (
    TileConfig(max_block_d=64, fp32=False, BLOCK_M=64, BLOCK_F=64, num_warps=4, num_stages=1),
    TileConfig(max_block_d=128, fp32=False, BLOCK_M=64, BLOCK_F=32, num_warps=8, num_stages=2),
    TileConfig(max_block_d=64, fp32=True, BLOCK_M=64, BLOCK_F=32, num_warps=8, num_stages=1),
)
BACKWARD_TOKEN_CONFIGS = (
    TileConfig(max_block_d=64, fp32=False, BLOCK_M=64, BLOCK_F=32, num_warps=8, num_stages=2),
    TileConfig(max_block_d=128, fp32=False, BLOCK_M=64, BLOCK_F=32, num_warps=8, num_stages=2),
    TileConfig(max_block_d=32, fp32=True, BLOCK_M=64, BLOCK_F=16, num_warps=4, num_stages=1),
    TileConfig(max_block_d=64, fp32=True, BLOCK_M=32, BLOCK_F=16, num_warps=4, num_stages=1),
)
WEIGHT_GRAD_CONFIGS = (
    TileConfig(max_block_d=64, fp32=False, BLOCK_M=64, BLOCK_F=32, num_warps=8, num_stages=2),
    TileConfig(max_block_d=128, fp32=False, BLOCK_M=32, BLOCK_F=32, num_warps=4, num_stages=2),
    TileConfig(max_block_d=64, fp32=True, BLOCK_M=16, BLOCK_F=16, num_warps=4, num_stages=1),
)
WEIGHT_GRAD_MAX_SPLITS = 32        # token splits of the weight-gradient pass
WEIGHT_GRAD_MIN_SPLIT_TOKENS = 1024


def block_d_for(D: int) -> int:
    """Register width of a token row: next power of two >= D, at least 16 (tl.dot minimum)."""
    return max(16, triton.next_power_of_2(D))


def block_e_for(E: int) -> int:
    """Register width of the router logits: next power of two >= E, at least 16."""
    return max(16, triton.next_power_of_2(E))


def pick_config(configs: tuple[TileConfig, ...], D: int, dtype: torch.dtype) -> TileConfig:
    """The first config of ``configs`` for ``dtype`` whose max_block_d covers D."""
    config = pick_width_config(configs, block_d_for(D), dtype == torch.float32)
    if config is not None:
        return config
    raise ValueError(f"D={D} is wider than the fused tile path supports for {dtype} "
                     f"({MAX_FUSED_D[dtype]})")


def fused_tile_supported(D: int, F: int, E: int, H: int, top_k: int, dtype: torch.dtype) -> bool:
    """Whether the fused token-tile path handles these sizes for inputs of ``dtype`` (any N)."""
    return (dtype in MAX_FUSED_D and 1 <= D <= MAX_FUSED_D[dtype] and F >= 1
            and 1 <= E <= MAX_FUSED_E and 1 <= H <= MAX_FUSED_H and 1 <= top_k <= E)


# --------------------------------------------------------------------------------------
# Tile device functions
# --------------------------------------------------------------------------------------

# fp32 operands: "tf32x3" (three TF32 tensor-core products: hi*hi + hi*lo + lo*hi, the
# dropped lo*lo term is ~2^-22 relative, so about fp32 accuracy). "ieee" lowers to FMA dots
# that hold whole K = BLOCK_D rows per thread and spill at BLOCK_D >= 64 on sm_90
# (benchmarks/gpu/compile_card.py shows the spills).
FP32_DOT_PRECISION = tl.constexpr("tf32x3")


@triton.jit
def _router_logits(x, rw1_ptr, rb1_ptr, rw2_ptr, rb2_ptr, offs_d, d_ok, offs_e, e_ok, H, E,
                   BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr):
    """Router logits (BLOCK_M, BLOCK_E) fp32 of the tile x (BLOCK_M, BLOCK_D); columns >= E
    are -inf. The second layer runs in fp32 so routing matches an fp32 evaluation."""
    logits = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_ok = offs_h < H
        w1 = tl.load(rw1_ptr + offs_d[:, None] * H + offs_h[None, :],
                     mask=d_ok[:, None] & h_ok[None, :], other=0.0).to(x.dtype)
        pre = mma(x, w1, None, FP32_DOT_PRECISION)
        pre += tl.load(rb1_ptr + offs_h, mask=h_ok, other=0.0).to(tl.float32)[None, :]
        hidden = gelu_and_grad(pre)[0]
        w2 = tl.load(rw2_ptr + offs_h[:, None] * E + offs_e[None, :],
                     mask=h_ok[:, None] & e_ok[None, :], other=0.0).to(tl.float32)
        logits += mma(hidden, w2, None, FP32_DOT_PRECISION)
    logits += tl.load(rb2_ptr + offs_e, mask=e_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(e_ok[None, :], logits, float("-inf"))


@triton.jit
def _softmaxes(logits, selected):
    """Full softmax over the valid logits and softmax over the selected ones, (BLOCK_M, BLOCK_E).
    A row with NaN logits gets NaN probabilities (and NaN gates if it selected one)."""
    row_max = tl.max(without_nan(logits), axis=1)
    exps = tl.exp(logits - row_max[:, None])
    probs = exps / tl.sum(exps, axis=1)[:, None]
    kept = tl.where(selected, exps, 0.0)
    kept_sum = tl.sum(kept, axis=1)
    gates = kept / tl.where(kept_sum > 0.0, kept_sum, 1.0)[:, None]   # 0 on rows past N
    return probs, gates


@triton.jit
def _top_k_mask(logits, offs_e, e_ok, TOP_K: tl.constexpr, BLOCK_E: tl.constexpr):
    """Bool (BLOCK_M, BLOCK_E): the TOP_K largest valid logits per row (lowest index on ties,
    NaN below every number: see top_k_step)."""
    selected = offs_e[None, :] < 0
    for _ in tl.static_range(TOP_K):
        first = top_k_step(logits, selected | ~e_ok[None, :], offs_e, BLOCK_E)[1]
        selected = selected | (offs_e[None, :] == first[:, None])
    return selected


@triton.jit
def _ffn_forward_into(acc, x, w1_ptr, b1_ptr, w2_ptr, b2_ptr, scale, offs_d, d_ok, D, F,
                      BLOCK_F: tl.constexpr):
    """acc += scale[:, None] * (gelu(x @ w1 + b1) @ w2 + b2), hidden width F in chunks.
    w1 (D, F), w2 (F, D) row-major; x (BLOCK_M, BLOCK_D) in the compute dtype."""
    for f0 in range(0, F, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        f_ok = offs_f < F
        w1 = tl.load(w1_ptr + offs_d[:, None] * F + offs_f[None, :],
                     mask=d_ok[:, None] & f_ok[None, :], other=0.0)
        pre = mma(x, w1, None, FP32_DOT_PRECISION)
        pre += tl.load(b1_ptr + offs_f, mask=f_ok, other=0.0).to(tl.float32)[None, :]
        hidden = gelu_and_grad(pre)[0]
        w2 = tl.load(w2_ptr + offs_f[:, None] * D + offs_d[None, :],
                     mask=f_ok[:, None] & d_ok[None, :], other=0.0)
        acc += mma(cast_to(hidden * scale[:, None], x.dtype), w2, None, FP32_DOT_PRECISION)
    b2 = tl.load(b2_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    return acc + scale[:, None] * b2[None, :]


@triton.jit
def _ffn_input_grad_into(dx, x, dy, w1_ptr, b1_ptr, w2_ptr, b2_ptr, scale, offs_d, d_ok, D, F,
                         BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, WANT_DY_DOT_F: tl.constexpr):
    """For out = scale * ffn(x): dx += d out/d x applied to dy, and (if WANT_DY_DOT_F) the
    per-token dy . ffn(x) (BLOCK_M,) fp32, the gradient of the unscaled output's weight."""
    dy_dot_f = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        f_ok = offs_f < F
        w1 = tl.load(w1_ptr + offs_d[:, None] * F + offs_f[None, :],
                     mask=d_ok[:, None] & f_ok[None, :], other=0.0)
        pre = mma(x, w1, None, FP32_DOT_PRECISION)
        pre += tl.load(b1_ptr + offs_f, mask=f_ok, other=0.0).to(tl.float32)[None, :]
        hidden, hidden_grad = gelu_and_grad(pre)
        w2 = tl.load(w2_ptr + offs_f[:, None] * D + offs_d[None, :],
                     mask=f_ok[:, None] & d_ok[None, :], other=0.0)
        dhidden = mma(dy, tl.trans(w2), None, FP32_DOT_PRECISION)    # (BLOCK_M, BLOCK_F)
        if WANT_DY_DOT_F:
            dy_dot_f += tl.sum(hidden * dhidden, axis=1)
        dpre = dhidden * scale[:, None] * hidden_grad
        dx += mma(cast_to(dpre, x.dtype), tl.trans(w1), None, FP32_DOT_PRECISION)
    if WANT_DY_DOT_F:
        b2 = tl.load(b2_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        dy_dot_f += tl.sum(dy.to(tl.float32) * b2[None, :], axis=1)
    return dx, dy_dot_f


@triton.jit
def _load_alpha(alpha_param_ptr, ramp_ptr):
    """alpha = sigmoid(alpha_param) * ramp, an fp32 scalar."""
    return tl.sigmoid(tl.load(alpha_param_ptr).to(tl.float32)) * tl.load(ramp_ptr).to(tl.float32)


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------

@triton.jit
def fused_tile_forward_kernel(
    x_ptr, mask_ptr,
    rw1_ptr, rb1_ptr, rw2_ptr, rb2_ptr, ew1_ptr, eb1_ptr, ew2_ptr, eb2_ptr,
    dw1_ptr, db1_ptr, dw2_ptr, db2_ptr, alpha_param_ptr, ramp_ptr,
    y_ptr, selected_bits_ptr, prob_partial_ptr, load_partial_ptr,
    N, D, F, H, E, stride_xm, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
    BLOCK_E: tl.constexpr, TOP_K: tl.constexpr, HAS_MASK: tl.constexpr,
):
    """One tile of BLOCK_M tokens: y = dense(x) + alpha * sum_e gate_e expert_e(x).
    Writes y (N, D), the selected-expert bitmask (N,) int32 and this tile's partials
    prob_partial[tile] (E,) fp32 and load_partial[tile] (E,) int32 over real tokens."""
    tile = tl.program_id(0)
    rows = tile.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_e = tl.arange(0, BLOCK_E)
    e_ok = offs_e < E
    x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    logits = _router_logits(x, rw1_ptr, rb1_ptr, rw2_ptr, rb2_ptr, offs_d, d_ok, offs_e, e_ok,
                            H, E, BLOCK_M, BLOCK_F, BLOCK_E)
    selected = _top_k_mask(logits, offs_e, e_ok, TOP_K, BLOCK_E)
    probs, gates = _softmaxes(logits, selected)
    bits = tl.sum(tl.where(selected, 1 << offs_e[None, :], 0), axis=1)
    tl.store(selected_bits_ptr + rows, bits, mask=row_ok)

    real = row_ok
    if HAS_MASK:
        real = real & (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0)
    tile_e = tile.to(tl.int64) * E + offs_e
    tl.store(prob_partial_ptr + tile_e, tl.sum(tl.where(real[:, None], probs, 0.0), axis=0),
             mask=e_ok)
    tl.store(load_partial_ptr + tile_e,
             tl.sum((selected & real[:, None]).to(tl.int32), axis=0), mask=e_ok)

    alpha = _load_alpha(alpha_param_ptr, ramp_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    acc = _ffn_forward_into(acc, x, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr,
                            tl.full((BLOCK_M,), 1.0, tl.float32), offs_d, d_ok, D, F, BLOCK_F)
    for e in range(0, E):
        is_e = offs_e[None, :] == e
        if tl.sum((selected & is_e).to(tl.int32)) > 0:
            scale = alpha * tl.sum(tl.where(is_e, gates, 0.0), axis=1)
            e64 = tl.full((), 0, tl.int64) + e
            acc = _ffn_forward_into(acc, x, ew1_ptr + e64 * D * F, eb1_ptr + e64 * F,
                                    ew2_ptr + e64 * F * D, eb2_ptr + e64 * D,
                                    scale, offs_d, d_ok, D, F, BLOCK_F)
    tl.store(y_ptr + rows[:, None] * stride_ym + offs_d[None, :],
             cast_to(acc, y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def fused_tile_backward_token_kernel(
    x_ptr, mask_ptr, dy_ptr, dprob_sum_ptr, selected_bits_ptr,
    rw1_ptr, rb1_ptr, rw2_ptr, rb2_ptr, ew1_ptr, eb1_ptr, ew2_ptr, eb2_ptr,
    dw1_ptr, db1_ptr, dw2_ptr, db2_ptr, alpha_param_ptr, ramp_ptr,
    dx_ptr, dlogits_ptr, gate_scale_ptr, dalpha_partial_ptr,
    N, D, F, H, E, stride_xm, stride_dym, stride_dxm,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
    BLOCK_E: tl.constexpr, HAS_MASK: tl.constexpr,
):
    """Recompute one token tile and write dx (N, D), the router-logit gradient (N, E) fp32
    (fp16 would flush its small values, see fp16_range_scale), alpha * gates (N, E) fp32
    for the weight-gradient pass, and this tile's partial of d loss / d alpha (fp32)."""
    tile = tl.program_id(0)
    rows = tile.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_e = tl.arange(0, BLOCK_E)
    e_ok = offs_e < E
    tile_mask = row_ok[:, None] & d_ok[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_d[None, :], mask=tile_mask, other=0.0)
    dy = tl.load(dy_ptr + rows[:, None] * stride_dym + offs_d[None, :], mask=tile_mask,
                 other=0.0)

    logits = _router_logits(x, rw1_ptr, rb1_ptr, rw2_ptr, rb2_ptr, offs_d, d_ok, offs_e, e_ok,
                            H, E, BLOCK_M, BLOCK_F, BLOCK_E)
    bits = tl.load(selected_bits_ptr + rows, mask=row_ok, other=0)
    selected = ((bits[:, None] >> offs_e[None, :]) & 1) != 0
    probs, gates = _softmaxes(logits, selected)
    alpha = _load_alpha(alpha_param_ptr, ramp_ptr)

    dx = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    dx = _ffn_input_grad_into(dx, x, dy, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr,
                                 tl.full((BLOCK_M,), 1.0, tl.float32), offs_d, d_ok, D, F,
                                 BLOCK_M, BLOCK_F, False)[0]
    dy_dot_f_all = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)   # dy . expert_e(x)
    for e in range(0, E):
        is_e = offs_e[None, :] == e
        if tl.sum((selected & is_e).to(tl.int32)) > 0:
            scale = alpha * tl.sum(tl.where(is_e, gates, 0.0), axis=1)
            e64 = tl.full((), 0, tl.int64) + e
            dx, dy_dot_f = _ffn_input_grad_into(dx, x, dy, ew1_ptr + e64 * D * F,
                                                eb1_ptr + e64 * F, ew2_ptr + e64 * F * D,
                                                eb2_ptr + e64 * D, scale, offs_d, d_ok, D, F,
                                                BLOCK_M, BLOCK_F, True)
            dy_dot_f_all = tl.where(is_e, dy_dot_f[:, None], dy_dot_f_all)

    # d alpha = sum_t dy_t . y_moe_t = sum_t sum_e gate_e (dy_t . expert_e(x_t))
    dalpha_rows = tl.sum(gates * dy_dot_f_all, axis=1)
    tl.store(dalpha_partial_ptr + tile, tl.sum(tl.where(row_ok, dalpha_rows, 0.0), axis=0))
    dgates = alpha * dy_dot_f_all

    # d logits: through the kept-softmax gates, and through the full softmax into prob_sum
    dlogits = gates * (dgates - tl.sum(gates * dgates, axis=1)[:, None])
    dprob = tl.load(dprob_sum_ptr + offs_e, mask=e_ok, other=0.0).to(tl.float32)
    real = row_ok
    if HAS_MASK:
        real = real & (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0)
    dlogits += tl.where(real[:, None],
                        probs * (dprob[None, :] - tl.sum(probs * dprob[None, :], axis=1)[:, None]),
                        0.0)
    row_e = rows[:, None] * E + offs_e[None, :]
    store_e = row_ok[:, None] & e_ok[None, :]
    tl.store(dlogits_ptr + row_e, dlogits, mask=store_e)
    tl.store(gate_scale_ptr + row_e, alpha * gates, mask=store_e)

    # router backward into dx (the router's weight gradients come from the weight pass)
    for h0 in range(0, H, BLOCK_F):
        offs_h = h0 + tl.arange(0, BLOCK_F)
        h_ok = offs_h < H
        w1 = tl.load(rw1_ptr + offs_d[:, None] * H + offs_h[None, :],
                     mask=d_ok[:, None] & h_ok[None, :], other=0.0).to(x.dtype)
        pre = mma(x, w1, None, FP32_DOT_PRECISION)
        pre += tl.load(rb1_ptr + offs_h, mask=h_ok, other=0.0).to(tl.float32)[None, :]
        hidden_grad = gelu_and_grad(pre)[1]
        w2 = tl.load(rw2_ptr + offs_h[:, None] * E + offs_e[None, :],
                     mask=h_ok[:, None] & e_ok[None, :], other=0.0).to(tl.float32)
        dpre = mma(dlogits, tl.trans(w2), None, FP32_DOT_PRECISION) * hidden_grad
        dx += mma(cast_to(dpre, x.dtype), tl.trans(w1), None, FP32_DOT_PRECISION)
    tl.store(dx_ptr + rows[:, None] * stride_dxm + offs_d[None, :],
             cast_to(dx, dx_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def fused_tile_weight_grad_kernel(
    x_ptr, dy_ptr, dlogits_ptr, gate_scale_ptr,
    rw1_ptr, rb1_ptr, rw2_ptr, ew1_ptr, eb1_ptr, ew2_ptr, dw1_ptr, db1_ptr, dw2_ptr,
    partial_ptr,
    N, D, F, H, E, stride_xm, stride_dym, tokens_per_split, split_stride,
    off_rw1, off_rb1, off_rw2, off_rb2, off_ew1, off_eb1, off_ew2, off_eb2,
    off_dw1, off_db1, off_dw2, off_db2,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    """Partial weight gradients of one FFN over one token split, for one hidden chunk.

    Program (ffn, chunk, split): ffn < E is expert ffn (output gradient dy scaled by
    alpha * gate), ffn == E the dense FFN (dy), ffn == E + 1 the router (d logits, hidden
    width H, output width E). Writes d w1[:, chunk], d b1[chunk], d w2[chunk, :] and, from
    chunk 0, d b2 into partial[split] (fp32) at the regions named by the off_* arguments.
    """
    ffn = tl.program_id(0)
    chunk = tl.program_id(1)
    split = tl.program_id(2)
    ffn64 = ffn.to(tl.int64)
    is_router = ffn == E + 1
    if ffn < E:
        w1_ptr = ew1_ptr + ffn64 * D * F
        b1_ptr = eb1_ptr + ffn64 * F
        w2_ptr = ew2_ptr + ffn64 * F * D
        hidden_width = F + ffn * 0
        out_width = D + ffn * 0
        scale_col = ffn
        region_w1 = off_ew1 + ffn64 * D * F
        region_b1 = off_eb1 + ffn64 * F
        region_w2 = off_ew2 + ffn64 * F * D
        region_b2 = off_eb2 + ffn64 * D
    elif ffn == E:
        w1_ptr = dw1_ptr
        b1_ptr = db1_ptr
        w2_ptr = dw2_ptr
        hidden_width = F + ffn * 0
        out_width = D + ffn * 0
        scale_col = ffn * 0 - 1
        region_w1 = off_dw1 + ffn64 * 0
        region_b1 = off_db1 + ffn64 * 0
        region_w2 = off_dw2 + ffn64 * 0
        region_b2 = off_db2 + ffn64 * 0
    else:
        w1_ptr = rw1_ptr
        b1_ptr = rb1_ptr
        w2_ptr = rw2_ptr
        hidden_width = H + ffn * 0
        out_width = E + ffn * 0
        scale_col = ffn * 0 - 1
        region_w1 = off_rw1 + ffn64 * 0
        region_b1 = off_rb1 + ffn64 * 0
        region_w2 = off_rw2 + ffn64 * 0
        region_b2 = off_rb2 + ffn64 * 0

    f0 = chunk * BLOCK_F
    if f0 < hidden_width:
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        offs_f = f0 + tl.arange(0, BLOCK_F)
        f_ok = offs_f < hidden_width
        offs_o = tl.arange(0, BLOCK_O)
        o_ok = offs_o < out_width
        acc_w1 = tl.zeros((BLOCK_D, BLOCK_F), dtype=tl.float32)
        acc_w2 = tl.zeros((BLOCK_F, BLOCK_O), dtype=tl.float32)
        acc_b1 = tl.zeros((BLOCK_F,), dtype=tl.float32)
        acc_b2 = tl.zeros((BLOCK_O,), dtype=tl.float32)
        token_begin = split * tokens_per_split
        token_end = tl.minimum(N, token_begin + tokens_per_split)
        local_rows = tl.arange(0, BLOCK_M)
        for m0 in range(token_begin, token_end, BLOCK_M):
            # 64-bit scalar tile bases + 32-bit in-tile offsets (fewer live registers than
            # 64-bit pointers per element)
            m64 = tl.full((), 0, tl.int64) + m0
            row_ok = m0 + local_rows < token_end
            x = tl.load(x_ptr + m64 * stride_xm + local_rows[:, None] * stride_xm
                        + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            out_ok = row_ok[:, None] & o_ok[None, :]
            if is_router:    # d logits, fp32
                dout = tl.load(dlogits_ptr + m64 * E + local_rows[:, None] * E
                               + offs_o[None, :], mask=out_ok, other=0.0)
            else:
                dout = tl.load(dy_ptr + m64 * stride_dym + local_rows[:, None] * stride_dym
                               + offs_o[None, :], mask=out_ok, other=0.0).to(tl.float32)
            scale = tl.load(gate_scale_ptr + m64 * E + local_rows * E + scale_col,
                            mask=row_ok & (local_rows * 0 + scale_col >= 0), other=1.0)
            dout = dout * scale[:, None]
            # fp16: this tile's output gradient times a power of two s before it is rounded
            # for the dots, every accumulator scaled by s around them (exact)
            s, inv_s = fp16_range_scale(dout, x.dtype)
            dout = cast_to(dout * s, x.dtype)
            # the weight chunks are re-read per token tile (L2-resident) rather than held in
            # registers across the loop (fewer live registers, pipelined into shared memory)
            w1 = tl.load(w1_ptr + offs_d[:, None] * hidden_width + offs_f[None, :],
                         mask=d_ok[:, None] & f_ok[None, :], other=0.0)
            b1 = tl.load(b1_ptr + offs_f, mask=f_ok, other=0.0).to(tl.float32)
            w2 = tl.load(w2_ptr + offs_f[:, None] * out_width + offs_o[None, :],
                         mask=f_ok[:, None] & o_ok[None, :], other=0.0)
            pre = mma(x, w1, None, FP32_DOT_PRECISION) + b1[None, :]
            hidden, hidden_grad = gelu_and_grad(pre)
            dpre = mma(dout, tl.trans(w2), None, FP32_DOT_PRECISION) * hidden_grad   # * s
            acc_w1 = mma(tl.trans(x), cast_to(dpre, x.dtype), acc_w1 * s,
                         FP32_DOT_PRECISION) * inv_s
            acc_w2 = mma(tl.trans(cast_to(hidden, x.dtype)), dout, acc_w2 * s,
                         FP32_DOT_PRECISION) * inv_s
            acc_b1 += tl.sum(dpre, axis=0) * inv_s
            acc_b2 += tl.sum(dout.to(tl.float32), axis=0) * inv_s
        base = partial_ptr + split.to(tl.int64) * split_stride
        tl.store(base + region_w1 + offs_d[:, None] * hidden_width + offs_f[None, :], acc_w1,
                 mask=d_ok[:, None] & f_ok[None, :])
        tl.store(base + region_b1 + offs_f, acc_b1, mask=f_ok)
        tl.store(base + region_w2 + offs_f[:, None] * out_width + offs_o[None, :], acc_w2,
                 mask=f_ok[:, None] & o_ok[None, :])
        if chunk == 0:
            tl.store(base + region_b2 + offs_o, acc_b2, mask=o_ok)


# --------------------------------------------------------------------------------------
# Host wrappers
# --------------------------------------------------------------------------------------

def _empty(shape, dtype, device) -> Tensor:
    """Allocation of every buffer this module's kernels write (one place, so tests can
    poison them and prove each element is written)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _check_inputs(x: Tensor, mask: Tensor | None, weights: HyMoEWeights, alpha_param: Tensor,
                  ramp: Tensor, top_k: int) -> tuple[int, int, int, int, int]:
    """check_kernel_inputs with weights of x's dtype, and a shape this path supports;
    returns (N, D, F, H, E)."""
    N, D, H, E, F = check_kernel_inputs(x, mask, weights, alpha_param, ramp, top_k,
                                        same_dtype=True)
    if not fused_tile_supported(D, F, E, H, top_k, x.dtype):
        raise ValueError(f"fused tile path does not support D={D}, F={F}, E={E}, H={H}, "
                         f"top_k={top_k} for {x.dtype} (see fused_tile_supported)")
    return N, D, F, H, E


def _mask_arg(mask: Tensor | None, x: Tensor) -> tuple[Tensor, bool]:
    """(pointer argument, HAS_MASK) for the kernels: the mask as contiguous uint8, or x as an
    unread placeholder when there is no mask."""
    if mask is None:
        return x, False
    return mask.contiguous().view(torch.uint8), True


def fused_tile_forward(x: Tensor, mask: Tensor | None, weights: HyMoEWeights,
                       alpha_param: Tensor, ramp: Tensor,
                       top_k: int) -> tuple[Tensor, Tensor, Tensor, tuple]:
    """HyMoE forward on the fused token-tile path.

    The arguments of ``hymoe_reference``, with the weights all of x's dtype and device:
    x (N, D), mask (N,) bool or None, weights (:class:`HyMoEWeights`), alpha_param and ramp
    0-d. Returns ``(y (N, D) x.dtype, prob_sum (E,) fp32, load (E,) int64, saved)``;
    ``saved`` (the selected-expert bitmask (N,) int32) goes to :func:`fused_tile_backward`.
    """
    N, D, F, H, E = _check_inputs(x, mask, weights, alpha_param, ramp, top_k)
    x = x.contiguous()
    weights = HyMoEWeights(*(w.contiguous() for w in weights))
    device = x.device
    y = _empty((N, D), x.dtype, device)
    selected_bits = _empty((N,), torch.int32, device)
    if N == 0:
        return (y, torch.zeros(E, dtype=torch.float32, device=device),
                torch.zeros(E, dtype=torch.int64, device=device), (selected_bits,))
    config = pick_config(FORWARD_CONFIGS, D, x.dtype)
    num_tiles = triton.cdiv(N, config.BLOCK_M)
    prob_partial = _empty((num_tiles, E), torch.float32, device)
    load_partial = _empty((num_tiles, E), torch.int32, device)
    mask_arg, has_mask = _mask_arg(mask, x)
    fused_tile_forward_kernel[(num_tiles,)](
        x, mask_arg, *weights, alpha_param, ramp,
        y, selected_bits, prob_partial, load_partial,
        N, D, F, H, E, x.stride(0), y.stride(0),
        BLOCK_D=block_d_for(D), BLOCK_E=block_e_for(E), TOP_K=top_k, HAS_MASK=has_mask,
        **launch_params(config))
    prob_sum = prob_partial.sum(dim=0)
    load = load_partial.sum(dim=0, dtype=torch.int64)
    return y, prob_sum, load, (selected_bits,)


def _grad_regions(D: int, F: int, H: int, E: int) -> tuple[HyMoEWeights, int]:
    """Offsets (ints, in HyMoEWeights fields) of each weight's gradient inside one split's
    flat fp32 partial buffer, laid out in the weights' order, and the buffer's length."""
    offsets, total = [], 0
    for shape in HyMoEWeights.shapes(D, H, E, F):
        offsets.append(total)
        total += math.prod(shape)
    return HyMoEWeights(*offsets), total


def weight_grad_splits(N: int, block_m: int, split_elements: int) -> tuple[int, int]:
    """(number of token splits, tokens per split) of the weight-gradient pass, whose every
    split writes ``split_elements`` fp32 partials: up to WEIGHT_GRAD_MAX_SPLITS splits of at
    least WEIGHT_GRAD_MIN_SPLIT_TOKENS tokens, and no more than MAX_PARTIAL_ELEMENTS
    partials in all (one split at least). Depends only on the shapes, so the summation order
    (and the result) is reproducible."""
    num_splits = max(1, min(WEIGHT_GRAD_MAX_SPLITS, triton.cdiv(N, WEIGHT_GRAD_MIN_SPLIT_TOKENS),
                            MAX_PARTIAL_ELEMENTS // split_elements))
    tokens_per_split = triton.cdiv(triton.cdiv(N, num_splits), block_m) * block_m
    return triton.cdiv(N, tokens_per_split), tokens_per_split


def fused_tile_backward(saved: tuple, x: Tensor, mask: Tensor | None, weights: HyMoEWeights,
                        alpha_param: Tensor, ramp: Tensor, top_k: int, dy: Tensor | None,
                        dprob_sum: Tensor | None) -> tuple[Tensor, ...]:
    """Gradients of the fused tile forward.

    Takes ``saved`` from :func:`fused_tile_forward`, the forward's inputs, dy (N, D) (or None
    = zeros) and dprob_sum (E,) float (or None = zeros). Returns ``(dx, *weight_grads,
    dalpha_param)``: dx (N, D) x.dtype, the twelve weight gradients in HyMoEWeights order
    and the weights' dtype, dalpha_param shaped like alpha_param.
    """
    N, D, F, H, E = _check_inputs(x, mask, weights, alpha_param, ramp, top_k)
    (selected_bits,) = saved
    device, dtype = x.device, x.dtype
    x = x.contiguous()
    weights = HyMoEWeights(*(w.contiguous() for w in weights))
    dy = torch.zeros_like(x) if dy is None else dy.to(dtype).contiguous()
    dprob_sum = (torch.zeros(E, dtype=torch.float32, device=device) if dprob_sum is None
                 else dprob_sum.float().contiguous())
    if dy.shape != x.shape:
        raise ValueError(f"dy must have x's shape {tuple(x.shape)}, got {tuple(dy.shape)}")
    if N == 0:
        return (torch.zeros_like(x), *[torch.zeros_like(w) for w in weights],
                torch.zeros_like(alpha_param))
    mask_arg, has_mask = _mask_arg(mask, x)

    token_config = pick_config(BACKWARD_TOKEN_CONFIGS, D, dtype)
    num_tiles = triton.cdiv(N, token_config.BLOCK_M)
    dx = _empty((N, D), dtype, device)
    dlogits = _empty((N, E), torch.float32, device)
    gate_scale = _empty((N, E), torch.float32, device)
    dalpha_partial = _empty((num_tiles,), torch.float32, device)
    fused_tile_backward_token_kernel[(num_tiles,)](
        x, mask_arg, dy, dprob_sum, selected_bits, *weights, alpha_param, ramp,
        dx, dlogits, gate_scale, dalpha_partial,
        N, D, F, H, E, x.stride(0), dy.stride(0), dx.stride(0),
        BLOCK_D=block_d_for(D), BLOCK_E=block_e_for(E), HAS_MASK=has_mask,
        **launch_params(token_config))

    wgrad_config = pick_config(WEIGHT_GRAD_CONFIGS, D, dtype)
    offsets, split_stride = _grad_regions(D, F, H, E)
    num_splits, tokens_per_split = weight_grad_splits(N, wgrad_config.BLOCK_M, split_stride)
    partial = _empty((num_splits, split_stride), torch.float32, device)
    num_chunks = triton.cdiv(max(F, H), wgrad_config.BLOCK_F)
    w = weights
    fused_tile_weight_grad_kernel[(E + 2, num_chunks, num_splits)](
        x, dy, dlogits, gate_scale, w.router_w1, w.router_b1, w.router_w2, w.expert_w1,
        w.expert_b1, w.expert_w2, w.dense_w1, w.dense_b1, w.dense_w2, partial,
        N, D, F, H, E, x.stride(0), dy.stride(0), tokens_per_split, split_stride, *offsets,
        BLOCK_D=block_d_for(D), BLOCK_O=max(block_d_for(D), block_e_for(E)),
        **launch_params(wgrad_config))
    flat_grads = partial.sum(dim=0).to(dtype)
    weight_grads = [flat_grads[offset:offset + weight.numel()].view(weight.shape)
                    for offset, weight in zip(offsets, weights)]

    sig = torch.sigmoid(alpha_param.float())
    dalpha_param = (dalpha_partial.sum() * sig * (1 - sig) * ramp.float()).to(alpha_param.dtype)
    return (dx, *weight_grads, dalpha_param.reshape(alpha_param.shape))
