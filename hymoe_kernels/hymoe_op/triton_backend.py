"""The HyMoE layer on Triton kernels: torch.library custom ops with autograd, and
:func:`hymoe_triton`, the functional API.

:func:`hymoe_triton` has the signature and returns of
:func:`.reference.hymoe_reference`. It calls one of two custom ops,
``hymoe::forward`` (the grouped path) or ``hymoe::fused_tile_forward``, each registered with
a fake implementation (so torch.compile traces it) and with autograd, whose backward is the
matching op ``hymoe::backward`` / ``hymoe::fused_tile_backward``. The ops take the twelve
weights as one ``Tensor[]`` in :class:`HyMoEWeights` order (``list(weights)``). Neither
direction synchronises with the host: every size is a function of the shapes (the
expert-sorted layout is sized for the worst case), so the layer can be captured in a CUDA
graph. Every op body runs with x's CUDA device current (Triton launches on the current
device, not the tensors').

The grouped forward, stage by stage: tokens -> router (hidden GEMM, top-k kernel) ->
permutation (counting sort by expert) -> experts (gathered up-projection, down-projection)
-> combine (the dense FFN's down-projection adds alpha * sum_j g_j f_j in its epilogue, so
y is written once). The backward mirrors it with fused GELU' epilogues, gate/alpha
gradients, the router's softmax backward and grouped weight gradients.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..kernel_launch import on_device_of
from ..weights import HyMoEWeights, check_kernel_inputs
from .fused_tile import fused_tile_backward, fused_tile_forward, fused_tile_supported
from .stage1_router import router_backward, router_topk
from .stage2_permutation import Routing, padded_rows, sort_slots_by_expert
from .stage3_expert_gemms import (dense_down_and_combine, expert_down, expert_up, linear,
                                  row_gemm, weight_grad)
from .stage4_combine import gate_grads

PATHS = ("auto", "grouped", "fused")


def _alpha(alpha_param: Tensor, ramp: Tensor) -> Tensor:
    """alpha = sigmoid(alpha_param) * ramp as a (1,) float32 device tensor."""
    return (torch.sigmoid(alpha_param.float()) * ramp.float()).reshape(1)


def _cotangents(dy: Tensor | None, dprob_sum: Tensor | None, x: Tensor,
                num_experts: int) -> tuple[Tensor, Tensor]:
    """dy (N, D) and dprob_sum (E,) float32 of a backward, zeros for an unused output."""
    return (torch.zeros_like(x) if dy is None else dy,
            x.new_zeros(num_experts, dtype=torch.float32) if dprob_sum is None else dprob_sum)


# --------------------------------------------------------------------------------------
# The grouped path
# --------------------------------------------------------------------------------------

@torch.library.custom_op("hymoe::forward", mutates_args=())
def hymoe_forward_op(
    x: Tensor, mask: Tensor | None, weights: list[Tensor], alpha_param: Tensor, ramp: Tensor,
    top_k: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
           Tensor, Tensor, Tensor, Tensor]:
    """Triton forward of the grouped path. Returns (y, prob_sum, load) as hymoe_reference,
    then what backward needs: router_hidden (N, H), logits (N, E) f32, ids (N, k) i32,
    gates (N, k) f32, dense_hidden (N, F), expert_hidden (P, F), expert_out (P, D), and the
    Routing tensors row_slot (P,), slot_row (N*k,), group_start (E+1,), group_count (E,)
    (int32)."""
    w = HyMoEWeights(*weights)
    with on_device_of(x):
        mask = None if mask is None else mask.contiguous()
        alpha = _alpha(alpha_param, ramp)
        # router: which top_k experts each token goes to, with which gates
        router_hidden = linear(x, w.router_w1, w.router_b1)
        logits, ids, gates, prob_sum, load = router_topk(router_hidden, w.router_w2,
                                                         w.router_b2, mask, top_k)
        # permutation: the token slots grouped by expert
        routing = sort_slots_by_expert(ids, w.expert_w1.shape[0])
        # experts: each expert's FFN over its group of rows
        expert_hidden = expert_up(x, w.expert_w1, w.expert_b1, routing)
        expert_out = expert_down(expert_hidden, w.expert_w2, w.expert_b2, routing)
        # combine: the dense FFN, whose down-projection adds alpha * sum_j g_j f_j
        dense_hidden = linear(x, w.dense_w1, w.dense_b1)
        y = dense_down_and_combine(dense_hidden, w.dense_w2, w.dense_b2, expert_out, routing,
                                   gates, alpha, x.dtype)
        return (y, prob_sum, load, router_hidden, logits, ids, gates, dense_hidden,
                expert_hidden, expert_out, routing.row_slot, routing.slot_row,
                routing.group_start, routing.group_count)


@hymoe_forward_op.register_fake
def _(x, mask, weights, alpha_param, ramp, top_k):
    N, D = x.shape
    _, H, E, F = HyMoEWeights(*weights).sizes()
    rows = padded_rows(N * top_k, E)

    def new(*shape, dtype=x.dtype):
        return x.new_empty(shape, dtype=dtype)
    return (new(N, D), new(E, dtype=torch.float32), new(E, dtype=torch.int64), new(N, H),
            new(N, E, dtype=torch.float32), new(N, top_k, dtype=torch.int32),
            new(N, top_k, dtype=torch.float32), new(N, F), new(rows, F), new(rows, D),
            new(rows, dtype=torch.int32), new(N * top_k, dtype=torch.int32),
            new(E + 1, dtype=torch.int32), new(E, dtype=torch.int32))


@torch.library.custom_op("hymoe::backward", mutates_args=())
def hymoe_backward_op(
    dy: Tensor, dprob_sum: Tensor, x: Tensor, mask: Tensor | None, weights: list[Tensor],
    alpha_param: Tensor, ramp: Tensor,
    router_hidden: Tensor, logits: Tensor, ids: Tensor, gates: Tensor, dense_hidden: Tensor,
    expert_hidden: Tensor, expert_out: Tensor, row_slot: Tensor, slot_row: Tensor,
    group_start: Tensor, group_count: Tensor,
) -> tuple[Tensor, list[Tensor], Tensor]:
    """Triton backward of the grouped path. dy (N, D), dprob_sum (E,) f32; the rest as the
    forward took and saved. Returns (dx, the 12 weight gradients in HyMoEWeights order,
    dalpha_param)."""
    w = HyMoEWeights(*weights)
    with on_device_of(x):
        mask = None if mask is None else mask.contiguous()
        routing = Routing(row_slot, slot_row, group_start, group_count, ids.shape[1])
        alpha = _alpha(alpha_param, ramp)
        sig = torch.sigmoid(alpha_param.float())

        dgates, dalpha = gate_grads(dy, expert_out, slot_row, gates, alpha)
        dalpha_param = (dalpha * ramp.float() * sig * (1 - sig)).reshape(())

        dlogits = router_backward(logits, ids, gates, dgates, dprob_sum.float().contiguous(), mask)
        d_router_hidden = row_gemm(dlogits, w.router_w2.t(), gelu_grad_of=router_hidden)
        d_router_w2, d_router_b2 = weight_grad(router_hidden, dlogits, a_gelu=True)
        d_router_w1, d_router_b1 = weight_grad(x, d_router_hidden)
        dx_router = row_gemm(d_router_hidden, w.router_w1.t(), out_dtype=torch.float32)

        flat_gates = gates.reshape(-1)
        d_expert_hidden = row_gemm(dy, w.expert_w2.transpose(1, 2), routing=routing,
                                   gather=True, gates=flat_gates, alpha=alpha,
                                   gelu_grad_of=expert_hidden)
        d_expert_w2, d_expert_b2 = weight_grad(expert_hidden, dy, routing=routing, a_gelu=True,
                                               b_gather=True, gates=flat_gates, alpha=alpha)
        d_expert_w1, d_expert_b1 = weight_grad(x, d_expert_hidden, routing=routing, a_gather=True)
        dx_expert = row_gemm(d_expert_hidden, w.expert_w1.transpose(1, 2), routing=routing,
                             out_dtype=torch.float32)

        d_dense_hidden = row_gemm(dy, w.dense_w2.t(), gelu_grad_of=dense_hidden)
        d_dense_w2, d_dense_b2 = weight_grad(dense_hidden, dy, a_gelu=True)
        d_dense_w1, d_dense_b1 = weight_grad(x, d_dense_hidden)
        dx = row_gemm(d_dense_hidden, w.dense_w1.t(), routing=routing, residual=dx_router,
                      combine_src=dx_expert, out_dtype=x.dtype)

        grads = HyMoEWeights(d_router_w1, d_router_b1, d_router_w2, d_router_b2,
                             d_expert_w1, d_expert_b1, d_expert_w2, d_expert_b2,
                             d_dense_w1, d_dense_b1, d_dense_w2, d_dense_b2)
        return dx, list(grads.to(w.expert_w1.dtype)), dalpha_param.to(alpha_param.dtype)


@hymoe_backward_op.register_fake
def _(dy, dprob_sum, x, mask, weights, alpha_param, *_saved):
    return x.new_empty(x.shape), [w.new_empty(w.shape) for w in weights], \
        alpha_param.new_empty(())


def _grouped_setup_context(ctx, inputs, output):
    """Saves the forward's inputs and its outputs 3.. (what hymoe::backward takes)."""
    x, mask, weights, alpha_param, ramp, _top_k = inputs
    ctx.mark_non_differentiable(*output[2:])
    ctx.num_experts = output[1].shape[0]
    ctx.save_for_backward(x, mask, alpha_param, ramp, *weights, *output[3:])


def _grouped_backward(ctx, dy, dprob_sum, *_unused):
    """Gradients of (x, mask, weights, alpha_param, ramp, top_k) from those of y (N, D) and
    prob_sum (E,) (None where unused); the other outputs are not differentiable."""
    x, mask, alpha_param, ramp, *rest = ctx.saved_tensors
    weights, saved = rest[:len(HyMoEWeights._fields)], rest[len(HyMoEWeights._fields):]
    dy, dprob_sum = _cotangents(dy, dprob_sum, x, ctx.num_experts)
    dx, weight_grads, dalpha_param = torch.ops.hymoe.backward(
        dy, dprob_sum, x, mask, weights, alpha_param, ramp, *saved)
    return dx, None, list(weight_grads), dalpha_param, None, None


torch.library.register_autograd("hymoe::forward", _grouped_backward,
                                setup_context=_grouped_setup_context)


# --------------------------------------------------------------------------------------
# The fused token-tile path
# --------------------------------------------------------------------------------------

@torch.library.custom_op("hymoe::fused_tile_forward", mutates_args=())
def fused_tile_forward_op(
    x: Tensor, mask: Tensor | None, weights: list[Tensor], alpha_param: Tensor, ramp: Tensor,
    top_k: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The fused token-tile forward: (y, prob_sum, load) as hymoe_reference, then the
    chosen-expert bitmask (N,) int32 that its backward recomputes from."""
    with on_device_of(x):
        y, prob_sum, load, (selected_bits,) = fused_tile_forward(
            x, mask, HyMoEWeights(*weights), alpha_param, ramp, top_k)
    return y, prob_sum, load, selected_bits


@fused_tile_forward_op.register_fake
def _(x, mask, weights, alpha_param, ramp, top_k):
    E = HyMoEWeights(*weights).sizes()[2]
    return (x.new_empty(x.shape), x.new_empty(E, dtype=torch.float32),
            x.new_empty(E, dtype=torch.int64), x.new_empty(x.shape[0], dtype=torch.int32))


@torch.library.custom_op("hymoe::fused_tile_backward", mutates_args=())
def fused_tile_backward_op(
    dy: Tensor, dprob_sum: Tensor, selected_bits: Tensor, x: Tensor, mask: Tensor | None,
    weights: list[Tensor], alpha_param: Tensor, ramp: Tensor, top_k: int,
) -> tuple[Tensor, list[Tensor], Tensor]:
    """The fused token-tile backward: (dx, the 12 weight gradients, dalpha_param)."""
    with on_device_of(x):
        dx, *weight_grads, dalpha_param = fused_tile_backward(
            (selected_bits,), x, mask, HyMoEWeights(*weights), alpha_param, ramp, top_k, dy,
            dprob_sum)
        # the weight gradients are views of one reduction buffer; a custom op's outputs may
        # not alias each other, so each gets its own (small) copy
        return dx, [g.clone() for g in weight_grads], dalpha_param.clone()


@fused_tile_backward_op.register_fake
def _(dy, dprob_sum, selected_bits, x, mask, weights, alpha_param, ramp, top_k):
    return x.new_empty(x.shape), [w.new_empty(w.shape) for w in weights], \
        alpha_param.new_empty(())


def _fused_tile_setup_context(ctx, inputs, output):
    """Saves the forward's inputs and its chosen-expert bitmask."""
    x, mask, weights, alpha_param, ramp, top_k = inputs
    ctx.mark_non_differentiable(output[2], output[3])
    ctx.top_k, ctx.num_experts = top_k, output[1].shape[0]
    ctx.save_for_backward(output[3], x, mask, *weights, alpha_param, ramp)


def _fused_tile_backward(ctx, dy, dprob_sum, *_unused):
    """As :func:`_grouped_backward`, recomputing the forward (hymoe::fused_tile_backward)."""
    selected_bits, x, mask, *weights, alpha_param, ramp = ctx.saved_tensors
    dy, dprob_sum = _cotangents(dy, dprob_sum, x, ctx.num_experts)
    dx, weight_grads, dalpha_param = torch.ops.hymoe.fused_tile_backward(
        dy, dprob_sum, selected_bits, x, mask, weights, alpha_param, ramp, ctx.top_k)
    return dx, None, list(weight_grads), dalpha_param, None, None


torch.library.register_autograd("hymoe::fused_tile_forward", _fused_tile_backward,
                                setup_context=_fused_tile_setup_context)


# --------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------

def pick_path(x: Tensor, weights: HyMoEWeights, top_k: int) -> str:
    """"fused" when the fused token-tile kernels support the shape (small D, see
    ``fused_tile_supported``) and E <= 4k, else "grouped".

    The fused tile evaluates all E experts of a token instead of its k chosen ones (E / k
    times the expert FLOPs) but needs no permutation, no per-stage launches and no
    expert-sorted intermediates; at the widths it supports, the layer is bound by memory
    traffic and launches rather than FLOPs, so up to 4x the expert FLOPs is taken to cost
    less than those. ``benchmarks/gpu/bench_layer.py`` times both paths per shape."""
    D, H, E, F = weights.sizes()
    supported = fused_tile_supported(D, F, E, H, top_k, x.dtype)
    return "fused" if supported and E <= 4 * top_k else "grouped"


def hymoe_triton(x: Tensor, mask: Tensor | None, weights: HyMoEWeights, alpha_param: Tensor,
                 ramp: Tensor, top_k: int, *, path: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """HyMoE forward on Triton kernels; same arguments and returns as ``hymoe_reference``.

    x (N, D) float32/bfloat16/float16, any strides; weights (:class:`HyMoEWeights`) are cast
    to x's dtype (the casts are differentiable); mask (N,) bool or None; alpha_param and
    ramp 0-d. Returns y (N, D) in x's dtype, prob_sum (E,) float32, load (E,) int64;
    gradients flow to x, the weights and alpha_param from y and prob_sum.

    ``path``: "grouped" (router -> counting-sort permutation -> gather-fused grouped expert
    GEMMs -> combine epilogue; any shape), "fused" (one kernel per token tile from router to
    combine, every expert evaluated, unchosen gates zero; small D only, see
    ``fused_tile_supported``) or "auto" (:func:`pick_path`).
    """
    check_kernel_inputs(x, mask, weights, alpha_param, ramp, top_k)
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    weights = weights.to(x.dtype)
    if path == "auto":
        path = pick_path(x, weights, top_k)
    if path == "fused":
        D, H, E, F = weights.sizes()
        if not fused_tile_supported(D, F, E, H, top_k, x.dtype):
            raise ValueError(f"path 'fused' does not support D={D}, F={F}, E={E}, "
                             f"top_k={top_k} in {x.dtype}; use path 'grouped'")
        op = torch.ops.hymoe.fused_tile_forward
    else:
        op = torch.ops.hymoe.forward
    outputs = op(x, mask, list(weights), alpha_param, ramp.detach(), top_k)
    return outputs[0], outputs[1], outputs[2]
