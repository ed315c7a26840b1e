"""Router: second linear layer, top-k softmax gates, full-softmax sums and loads; and backward.

Forward (:func:`router_topk`), per block of tokens, from the router's hidden pre-activation
h_pre = x @ router_w1 + router_b1 (computed by :func:`.stage3_expert_gemms.row_gemm`):
logits = GELU(h_pre) @ router_w2 + router_b2 (fp32 accumulation, kept in fp32), the top_k
experts (ties to the lower index; NaN logits rank below every number, so every id is a
valid expert, distinct within a token), gates = softmax over the kept logits, and over real
tokens (mask) the per-block sums of the full softmax over all E logits and the per-block
slot counts; the partials are summed in a fixed order (no atomics).

Backward (:func:`router_backward`): d logits from d gates through the top-k softmax plus,
for real tokens, from d prob_sum through the full softmax.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..backend import INTERPRETING
from ..device_math import cast_to, dot_precision, gelu, mma, top_k_step, without_nan
from ..kernel_launch import launch_params


class RouterConfig(NamedTuple):
    """Launch parameters of ``_router_topk_kernel``."""
    BLOCK_T: int       # tokens per program
    BLOCK_H: int       # hidden columns per step
    num_warps: int
    num_stages: int


class RouterBackwardConfig(NamedTuple):
    """Launch parameters of ``_router_backward_kernel``."""
    BLOCK_T: int       # tokens per program
    num_warps: int


ROUTER_CONFIGS = (
    RouterConfig(BLOCK_T=64, BLOCK_H=64, num_warps=4, num_stages=2),
    RouterConfig(BLOCK_T=16, BLOCK_H=32, num_warps=2, num_stages=1),
)
ROUTER_BACKWARD_CONFIGS = (
    RouterBackwardConfig(BLOCK_T=128, num_warps=4),
    RouterBackwardConfig(BLOCK_T=16, num_warps=1),
)


@triton.jit
def _router_topk_kernel(
    h_ptr, stride_hm, stride_hk,
    w_ptr, stride_wk, stride_we,
    b_ptr, mask_ptr,
    logits_ptr, ids_ptr, gates_ptr, prob_part_ptr, load_part_ptr,
    num_tokens, H, num_experts,
    TOP_K: tl.constexpr, K_POW2: tl.constexpr, E_POW2: tl.constexpr, HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    tokens = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = tokens < num_tokens
    tokens64 = tokens.to(tl.int64)
    experts = tl.arange(0, E_POW2)
    expert_ok = experts < num_experts
    acc = tl.zeros((BLOCK_T, E_POW2), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h_ok = hs < H
        hidden = tl.load(h_ptr + tokens64[:, None] * stride_hm + hs[None, :] * stride_hk,
                         mask=tok_ok[:, None] & h_ok[None, :], other=0.0)
        w = tl.load(w_ptr + hs[:, None] * stride_wk + experts[None, :] * stride_we,
                    mask=h_ok[:, None] & expert_ok[None, :], other=0.0)
        acc = mma(cast_to(gelu(hidden.to(tl.float32)), w.dtype), w, acc, DOT_PRECISION)
    logits = acc + tl.load(b_ptr + experts, mask=expert_ok, other=0.0).to(tl.float32)[None, :]
    logits = tl.where(expert_ok[None, :], logits, float("-inf"))
    out_ok = tok_ok[:, None] & expert_ok[None, :]
    tl.store(logits_ptr + tokens64[:, None] * num_experts + experts[None, :], logits, mask=out_ok)

    # the choice ranks NaN below every number (see top_k_step); gates and probabilities
    # use the logits themselves, so a token with NaN logits gets NaN gates, not a
    # padding expert id
    ranks = tl.arange(0, K_POW2)
    kept = tl.zeros((BLOCK_T, K_POW2), dtype=tl.float32)
    chosen = tl.zeros((BLOCK_T, K_POW2), dtype=tl.int32)
    taken = tl.broadcast_to(~expert_ok[None, :], (BLOCK_T, E_POW2))
    top = tl.max(without_nan(logits), axis=1)
    for j in tl.static_range(TOP_K):
        best_id = top_k_step(logits, taken, experts, E_POW2)[1]
        hit = experts[None, :] == best_id[:, None]
        best = tl.sum(tl.where(hit, logits, 0.0), axis=1)
        kept = tl.where(ranks[None, :] == j, tl.exp(best - top)[:, None], kept)
        chosen = tl.where(ranks[None, :] == j, best_id[:, None], chosen)
        taken = taken | hit
    selected = (taken & expert_ok[None, :]).to(tl.int32)
    slot_ok = tok_ok[:, None] & (ranks < TOP_K)[None, :]
    slots = tokens64[:, None] * TOP_K + ranks[None, :]
    tl.store(gates_ptr + slots, kept / tl.sum(kept, axis=1)[:, None], mask=slot_ok)
    tl.store(ids_ptr + slots, chosen, mask=slot_ok)

    probs = tl.exp(logits - top[:, None])
    probs = probs / tl.sum(probs, axis=1)[:, None]
    real = tok_ok
    if HAS_MASK:
        real = real & (tl.load(mask_ptr + tokens, mask=tok_ok, other=0) != 0)
    tl.store(prob_part_ptr + pid * E_POW2 + experts,
             tl.sum(tl.where(real[:, None], probs, 0.0), axis=0))
    tl.store(load_part_ptr + pid * E_POW2 + experts,
             tl.sum(tl.where(real[:, None], selected, 0), axis=0))


@triton.jit
def _router_backward_kernel(
    logits_ptr, ids_ptr, gates_ptr, dgates_ptr, dprob_ptr, mask_ptr, dlogits_ptr,
    num_tokens, num_experts,
    TOP_K: tl.constexpr, E_POW2: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    tokens = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = tokens < num_tokens
    tokens64 = tokens.to(tl.int64)
    experts = tl.arange(0, E_POW2)
    expert_ok = experts < num_experts
    inner = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        g = tl.load(gates_ptr + tokens64 * TOP_K + j, mask=tok_ok, other=0.0)
        dg = tl.load(dgates_ptr + tokens64 * TOP_K + j, mask=tok_ok, other=0.0)
        inner += g * dg
    dlogits = tl.zeros((BLOCK_T, E_POW2), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        g = tl.load(gates_ptr + tokens64 * TOP_K + j, mask=tok_ok, other=0.0)
        dg = tl.load(dgates_ptr + tokens64 * TOP_K + j, mask=tok_ok, other=0.0)
        ids = tl.load(ids_ptr + tokens64 * TOP_K + j, mask=tok_ok, other=-1)
        dlogits += tl.where(experts[None, :] == ids[:, None], (g * (dg - inner))[:, None], 0.0)
    tile_ok = tok_ok[:, None] & expert_ok[None, :]
    logits = tl.load(logits_ptr + tokens64[:, None] * num_experts + experts[None, :],
                     mask=tile_ok, other=0.0)
    logits = tl.where(expert_ok[None, :], logits, float("-inf"))
    probs = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    probs = probs / tl.sum(probs, axis=1)[:, None]
    dprob = tl.load(dprob_ptr + experts, mask=expert_ok, other=0.0)
    dfull = probs * (dprob[None, :] - tl.sum(probs * dprob[None, :], axis=1)[:, None])
    real = tok_ok
    if HAS_MASK:
        real = real & (tl.load(mask_ptr + tokens, mask=tok_ok, other=0) != 0)
    dlogits += tl.where(real[:, None], dfull, 0.0)
    tl.store(dlogits_ptr + tokens64[:, None] * num_experts + experts[None, :], dlogits,
             mask=tile_ok)


def pick_router_config(num_tokens: int, H: int) -> RouterConfig:
    """Config from :data:`ROUTER_CONFIGS` for ``num_tokens`` tokens, hidden width ``H``."""
    big = INTERPRETING or (num_tokens >= 1024 and H >= 64)
    return ROUTER_CONFIGS[0] if big else ROUTER_CONFIGS[1]


def pick_router_backward_config(num_tokens: int) -> RouterBackwardConfig:
    """Config from :data:`ROUTER_BACKWARD_CONFIGS` for ``num_tokens`` tokens."""
    big = INTERPRETING or num_tokens >= 1024
    return ROUTER_BACKWARD_CONFIGS[0] if big else ROUTER_BACKWARD_CONFIGS[1]


def _experts_pow2(num_experts: int) -> int:
    return max(16, triton.next_power_of_2(num_experts))  # >= 16: the logits tile is a dot output


def router_topk(h_pre: Tensor, w2: Tensor, b2: Tensor, mask: Tensor | None, top_k: int,
                config: RouterConfig | None = None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Top-k routing of N tokens from the router's hidden pre-activation.

    h_pre (N, H); w2 (H, E) and b2 (E,) in h_pre's dtype; mask (N,) contiguous bool or None
    (all real). config: one of :data:`ROUTER_CONFIGS` (default :func:`pick_router_config`).
    Returns logits (N, E) f32, ids (N, top_k) int32, gates (N, top_k) f32,
    prob_sum (E,) f32 (sum over real tokens of softmax(logits)), load (E,) int64 (real
    token slots per expert).
    """
    num_tokens, H = h_pre.shape
    num_experts = w2.shape[1]
    e_pow2 = _experts_pow2(num_experts)
    config = config or pick_router_config(num_tokens, H)
    num_blocks = triton.cdiv(num_tokens, config.BLOCK_T)
    device = h_pre.device
    logits = torch.empty(num_tokens, num_experts, device=device, dtype=torch.float32)
    ids = torch.empty(num_tokens, top_k, device=device, dtype=torch.int32)
    gates = torch.empty(num_tokens, top_k, device=device, dtype=torch.float32)
    prob_part = torch.zeros(num_blocks, e_pow2, device=device, dtype=torch.float32)
    load_part = torch.zeros(num_blocks, e_pow2, device=device, dtype=torch.int32)
    if num_blocks > 0:
        _router_topk_kernel[(num_blocks,)](
            h_pre, h_pre.stride(0), h_pre.stride(1), w2, w2.stride(0), w2.stride(1),
            b2.contiguous(),
            logits if mask is None else mask,
            logits, ids, gates, prob_part, load_part, num_tokens, H, num_experts,
            TOP_K=top_k, K_POW2=triton.next_power_of_2(top_k), E_POW2=e_pow2,
            HAS_MASK=mask is not None, DOT_PRECISION=dot_precision(w2.dtype),
            **launch_params(config),
        )
    prob_sum = prob_part.sum(0)[:num_experts]
    load = load_part.sum(0, dtype=torch.int64)[:num_experts]
    return logits, ids, gates, prob_sum, load


def router_backward(logits: Tensor, ids: Tensor, gates: Tensor, dgates: Tensor,
                    dprob_sum: Tensor, mask: Tensor | None,
                    config: RouterBackwardConfig | None = None) -> Tensor:
    """d loss / d logits (N, E) f32 from dgates (N, top_k) f32 (through the top-k softmax)
    and dprob_sum (E,) contiguous f32 (through the full softmax, real tokens only); the
    other arguments as returned by :func:`router_topk`. config: one of
    :data:`ROUTER_BACKWARD_CONFIGS` (default :func:`pick_router_backward_config`)."""
    num_tokens, num_experts = logits.shape
    config = config or pick_router_backward_config(num_tokens)
    dlogits = torch.empty_like(logits)
    num_blocks = triton.cdiv(num_tokens, config.BLOCK_T)
    if num_blocks > 0:
        _router_backward_kernel[(num_blocks,)](
            logits, ids, gates, dgates, dprob_sum, logits if mask is None else mask, dlogits,
            num_tokens, num_experts,
            TOP_K=ids.shape[1], E_POW2=_experts_pow2(num_experts), HAS_MASK=mask is not None,
            **launch_params(config),
        )
    return dlogits
