"""The HyMoE layer on Triton kernels: autograd Function, torch.library ops, functional API.

:func:`hymoe_triton` has exactly the signature and returns of
:func:`hymoe_kernels.reference.hymoe_reference`. The computation is two custom ops,
``hymoe::forward`` and ``hymoe::backward`` (registered with fake implementations, so
torch.compile can trace them), tied together by :class:`HyMoEFunction`. Neither direction
synchronises with the host: every size is a function of the shapes (the expert-sorted layout
is sized for the worst case), so the layer can be captured in a CUDA graph. Every op body runs
with x's CUDA device current (Triton launches on the current device, not the tensors').

Forward launches: router hidden GEMM; router top-k kernel; three permutation kernels; expert
up-projection (gathers x rows through the permutation, bias in the epilogue); expert
down-projection (GELU on load, bias); dense up-projection; dense down-projection whose
epilogue adds alpha * sum_j g_j f_j -- y is written once. Backward mirrors it with fused
GELU' epilogues, gate/alpha gradients, router softmax backward, and grouped weight gradients.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .kernels import on_device_of
from .kernels.combine import gate_grads
from .kernels.fused_tile import fused_tile_backward, fused_tile_forward, fused_tile_supported
from .kernels.grouped_gemm import Routing, row_gemm, weight_grad
from .kernels.permute import padded_rows, sort_slots_by_expert
from .kernels.router import router_backward, router_topk

WEIGHT_NAMES = ("router_w1", "router_b1", "router_w2", "router_b2",
                "expert_w1", "expert_b1", "expert_w2", "expert_b2",
                "dense_w1", "dense_b1", "dense_w2", "dense_b2")


def _alpha(alpha_param: Tensor, ramp: Tensor) -> Tensor:
    """alpha = sigmoid(alpha_param) * ramp as a (1,) float32 device tensor."""
    return (torch.sigmoid(alpha_param.float()) * ramp.float()).reshape(1)


@torch.library.custom_op("hymoe::forward", mutates_args=())
def hymoe_forward_op(
    x: Tensor, mask: Tensor | None,
    router_w1: Tensor, router_b1: Tensor, router_w2: Tensor, router_b2: Tensor,
    expert_w1: Tensor, expert_b1: Tensor, expert_w2: Tensor, expert_b2: Tensor,
    dense_w1: Tensor, dense_b1: Tensor, dense_w2: Tensor, dense_b2: Tensor,
    alpha_param: Tensor, ramp: Tensor, top_k: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
           Tensor, Tensor, Tensor, Tensor]:
    """Triton forward. Returns (y, prob_sum, load) as hymoe_reference, then what backward
    needs: router_hidden (N, H), logits (N, E) f32, ids (N, k) i32, gates (N, k) f32,
    dense_hidden (N, F), expert_hidden (P, F), expert_out (P, D), and the Routing tensors
    row_slot (P,), slot_row (N*k,), group_start (E+1,), group_count (E,) (int32)."""
    with on_device_of(x):
        num_experts = expert_w1.shape[0]
        mask = None if mask is None else mask.contiguous()
        alpha = _alpha(alpha_param, ramp)
        router_hidden = row_gemm(x, router_w1, router_b1)
        logits, ids, gates, prob_sum, load = router_topk(router_hidden, router_w2, router_b2,
                                                         mask, top_k)
        routing = sort_slots_by_expert(ids, num_experts)
        expert_hidden = row_gemm(x, expert_w1, expert_b1, routing=routing, gather=True)
        expert_out = row_gemm(expert_hidden, expert_w2, expert_b2, routing=routing,
                              a_gelu=True)
        dense_hidden = row_gemm(x, dense_w1, dense_b1)
        y = row_gemm(dense_hidden, dense_w2, dense_b2, a_gelu=True, routing=routing,
                     gates=gates, alpha=alpha, combine_src=expert_out, combine_gated=True,
                     out_dtype=x.dtype)
        return (y, prob_sum, load, router_hidden, logits, ids, gates, dense_hidden,
                expert_hidden, expert_out, routing.row_slot, routing.slot_row,
                routing.group_start, routing.group_count)


@hymoe_forward_op.register_fake
def _(x, mask, router_w1, router_b1, router_w2, router_b2, expert_w1, expert_b1, expert_w2,
      expert_b2, dense_w1, dense_b1, dense_w2, dense_b2, alpha_param, ramp, top_k):
    N, D = x.shape
    H, (E, _, F) = router_w1.shape[1], expert_w1.shape
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
    dy: Tensor, dprob_sum: Tensor, x: Tensor, mask: Tensor | None,
    router_w1: Tensor, router_w2: Tensor, expert_w1: Tensor, expert_w2: Tensor,
    dense_w1: Tensor, dense_w2: Tensor, alpha_param: Tensor, ramp: Tensor,
    router_hidden: Tensor, logits: Tensor, ids: Tensor, gates: Tensor, dense_hidden: Tensor,
    expert_hidden: Tensor, expert_out: Tensor, row_slot: Tensor, slot_row: Tensor,
    group_start: Tensor, group_count: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
           Tensor, Tensor, Tensor, Tensor]:
    """Triton backward. dy (N, D), dprob_sum (E,) f32; the rest as saved by the forward.
    Returns (dx, the 12 weight gradients in WEIGHT_NAMES order, dalpha_param)."""
    with on_device_of(x):
        num_experts, top_k = expert_w1.shape[0], ids.shape[1]
        mask = None if mask is None else mask.contiguous()
        routing = Routing(row_slot, slot_row, group_start, group_count, top_k)
        alpha = _alpha(alpha_param, ramp)
        sig = torch.sigmoid(alpha_param.float())

        dgates, dalpha = gate_grads(dy, expert_out, slot_row, gates, alpha)
        dalpha_param = (dalpha * ramp.float() * sig * (1 - sig)).reshape(())

        dlogits = router_backward(logits, ids, gates, dgates, dprob_sum.float().contiguous(), mask)
        d_router_hidden = row_gemm(dlogits, router_w2.t(), gelu_grad_of=router_hidden)
        d_router_w2, d_router_b2 = weight_grad(router_hidden, dlogits, a_gelu=True)
        d_router_w1, d_router_b1 = weight_grad(x, d_router_hidden)
        dx_router = row_gemm(d_router_hidden, router_w1.t(), out_dtype=torch.float32)

        flat_gates = gates.reshape(-1)
        d_expert_hidden = row_gemm(dy, expert_w2.transpose(1, 2), routing=routing, gather=True,
                                   gates=flat_gates, alpha=alpha, gelu_grad_of=expert_hidden)
        d_expert_w2, d_expert_b2 = weight_grad(expert_hidden, dy, routing=routing, a_gelu=True,
                                               b_gather=True, gates=flat_gates, alpha=alpha)
        d_expert_w1, d_expert_b1 = weight_grad(x, d_expert_hidden, routing=routing, a_gather=True)
        dx_expert = row_gemm(d_expert_hidden, expert_w1.transpose(1, 2), routing=routing,
                             out_dtype=torch.float32)

        d_dense_hidden = row_gemm(dy, dense_w2.t(), gelu_grad_of=dense_hidden)
        d_dense_w2, d_dense_b2 = weight_grad(dense_hidden, dy, a_gelu=True)
        d_dense_w1, d_dense_b1 = weight_grad(x, d_dense_hidden)
        dx = row_gemm(d_dense_hidden, dense_w1.t(), routing=routing, residual=dx_router,
                      combine_src=dx_expert, out_dtype=x.dtype)

        weight_dtype = expert_w1.dtype
        grads = (d_router_w1, d_router_b1, d_router_w2, d_router_b2,
                 d_expert_w1, d_expert_b1, d_expert_w2, d_expert_b2,
                 d_dense_w1, d_dense_b1, d_dense_w2, d_dense_b2)
        return (dx, *(g.to(weight_dtype) for g in grads), dalpha_param.to(alpha_param.dtype))


@hymoe_backward_op.register_fake
def _(dy, dprob_sum, x, mask, router_w1, router_w2, expert_w1, expert_w2, dense_w1, dense_w2,
      alpha_param, ramp, router_hidden, logits, ids, gates, dense_hidden, expert_hidden,
      expert_out, row_slot, slot_row, group_start, group_count):
    (D, H), E, F = router_w1.shape, router_w2.shape[1], dense_w1.shape[1]
    w = expert_w1

    def new(*shape):
        return w.new_empty(shape)
    return (x.new_empty(x.shape), new(D, H), new(H), new(H, E), new(E),
            new(E, D, F), new(E, F), new(E, F, D), new(E, D),
            new(D, F), new(F), new(F, D), new(D), alpha_param.new_empty(()))


class HyMoEFunction(torch.autograd.Function):
    """Autograd Function over the ``hymoe::forward`` / ``hymoe::backward`` ops.

    ``HyMoEFunction.apply(x, mask, *12 weights, alpha_param, ramp, top_k)`` returns the
    forward op's 14 outputs (the first three are y, prob_sum, load); gradients flow to x,
    the 12 weights and alpha_param, from y and prob_sum.
    """

    @staticmethod
    def forward(x, mask, *args):
        return torch.ops.hymoe.forward(x, mask, *args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, mask, *weights, alpha_param, ramp, _top_k = inputs
        router_w1, _, router_w2, _, expert_w1, _, expert_w2, _, dense_w1, _, dense_w2, _ = weights
        ctx.mark_non_differentiable(*output[2:])
        ctx.save_for_backward(x, mask, router_w1, router_w2, expert_w1, expert_w2, dense_w1,
                              dense_w2, alpha_param, ramp, *output[3:])

    @staticmethod
    def backward(ctx, dy, dprob_sum, *_unused):
        x = ctx.saved_tensors[0]
        if dy is None:
            dy = torch.zeros_like(x)
        if dprob_sum is None:
            dprob_sum = x.new_zeros(ctx.saved_tensors[3].shape[1], dtype=torch.float32)
        grads = torch.ops.hymoe.backward(dy, dprob_sum, *ctx.saved_tensors)
        return (grads[0], None, *grads[1:], None, None)


torch.library.register_autograd("hymoe::forward", HyMoEFunction.backward,
                                setup_context=HyMoEFunction.setup_context)


@torch.library.custom_op("hymoe::fused_tile_forward", mutates_args=())
def fused_tile_forward_op(
    x: Tensor, mask: Tensor | None,
    router_w1: Tensor, router_b1: Tensor, router_w2: Tensor, router_b2: Tensor,
    expert_w1: Tensor, expert_b1: Tensor, expert_w2: Tensor, expert_b2: Tensor,
    dense_w1: Tensor, dense_b1: Tensor, dense_w2: Tensor, dense_b2: Tensor,
    alpha_param: Tensor, ramp: Tensor, top_k: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The fused token-tile forward: (y, prob_sum, load) as hymoe_reference, then the
    chosen-expert bitmask (N,) int32 that its backward recomputes from."""
    weights = (router_w1, router_b1, router_w2, router_b2, expert_w1, expert_b1, expert_w2,
               expert_b2, dense_w1, dense_b1, dense_w2, dense_b2)
    with on_device_of(x):
        y, prob_sum, load, (selected_bits,) = fused_tile_forward(x, mask, *weights, alpha_param,
                                                                 ramp, top_k)
    return y, prob_sum, load, selected_bits


@fused_tile_forward_op.register_fake
def _(x, mask, router_w1, router_b1, router_w2, *rest):
    E = router_w2.shape[1]
    return (x.new_empty(x.shape), x.new_empty(E, dtype=torch.float32),
            x.new_empty(E, dtype=torch.int64), x.new_empty(x.shape[0], dtype=torch.int32))


@torch.library.custom_op("hymoe::fused_tile_backward", mutates_args=())
def fused_tile_backward_op(
    dy: Tensor, dprob_sum: Tensor, selected_bits: Tensor, x: Tensor, mask: Tensor | None,
    router_w1: Tensor, router_b1: Tensor, router_w2: Tensor, router_b2: Tensor,
    expert_w1: Tensor, expert_b1: Tensor, expert_w2: Tensor, expert_b2: Tensor,
    dense_w1: Tensor, dense_b1: Tensor, dense_w2: Tensor, dense_b2: Tensor,
    alpha_param: Tensor, ramp: Tensor, top_k: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
           Tensor, Tensor, Tensor, Tensor]:
    """The fused token-tile backward: (dx, the 12 weight gradients, dalpha_param)."""
    weights = (router_w1, router_b1, router_w2, router_b2, expert_w1, expert_b1, expert_w2,
               expert_b2, dense_w1, dense_b1, dense_w2, dense_b2)
    with on_device_of(x):
        dx, *grads = fused_tile_backward((selected_bits,), x, mask, weights, alpha_param, ramp,
                                         top_k, dy, dprob_sum)
        # the weight gradients are views of one reduction buffer; a custom op's outputs may
        # not alias each other, so each gets its own (small) copy
        return (dx, *(g.clone() for g in grads))


@fused_tile_backward_op.register_fake
def _(dy, dprob_sum, selected_bits, x, mask, *weights_alpha_ramp_top_k):
    *weights, alpha_param, _ramp, _top_k = weights_alpha_ramp_top_k
    return (x.new_empty(x.shape), *(w.new_empty(w.shape) for w in weights),
            alpha_param.new_empty(()))


def _fused_tile_setup_context(ctx, inputs, output):
    x, mask, *weights, alpha_param, ramp, top_k = inputs
    ctx.mark_non_differentiable(output[2], output[3])
    ctx.top_k = top_k
    ctx.save_for_backward(output[3], x, mask, *weights, alpha_param, ramp)


def _fused_tile_backward(ctx, dy, dprob_sum, *_unused):
    selected_bits, x, mask, *weights, alpha_param, ramp = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(x)
    if dprob_sum is None:
        dprob_sum = x.new_zeros(weights[2].shape[1], dtype=torch.float32)
    grads = torch.ops.hymoe.fused_tile_backward(dy, dprob_sum, selected_bits, x, mask, *weights,
                                                alpha_param, ramp, ctx.top_k)
    return (grads[0], None, *grads[1:], None, None)


torch.library.register_autograd("hymoe::fused_tile_forward", _fused_tile_backward,
                                setup_context=_fused_tile_setup_context)

PATHS = ("auto", "grouped", "fused")


def pick_path(x: Tensor, expert_w1: Tensor, router_w1: Tensor, top_k: int) -> str:
    """"fused" when the fused token-tile kernels support the shape and evaluating every
    expert for a tile costs at most 4x the chosen experts (E <= 4k), else "grouped".

    Provisional rule, not yet measured on a GPU: benchmarks/gpu/run.sh times both paths
    per shape, and this rule is to be set from its table."""
    E, D, F = expert_w1.shape
    supported = fused_tile_supported(D, F, E, router_w1.shape[1], top_k, x.dtype)
    return "fused" if supported and E <= 4 * top_k else "grouped"


def hymoe_triton(
    x: Tensor, mask: Tensor | None,
    router_w1: Tensor, router_b1: Tensor, router_w2: Tensor, router_b2: Tensor,
    expert_w1: Tensor, expert_b1: Tensor, expert_w2: Tensor, expert_b2: Tensor,
    dense_w1: Tensor, dense_b1: Tensor, dense_w2: Tensor, dense_b2: Tensor,
    alpha_param: Tensor, ramp: Tensor, top_k: int, *, path: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """HyMoE forward on Triton kernels; same arguments and returns as ``hymoe_reference``.

    x (N, D) float32/bfloat16/float16, any strides; weights are cast to x's dtype (the
    casts are differentiable); mask (N,) bool or None. Returns y (N, D) in x's dtype,
    prob_sum (E,) float32, load (E,) int64.

    ``path``: "grouped" (router -> counting-sort permutation -> gather-fused grouped expert
    GEMMs -> combine epilogue; any shape), "fused" (one kernel per token tile from router to
    combine, every expert evaluated, unchosen gates zero; small D only, see
    ``fused_tile_supported``) or "auto" (:func:`pick_path`).
    """
    weights = (router_w1, router_b1, router_w2, router_b2, expert_w1, expert_b1, expert_w2,
               expert_b2, dense_w1, dense_b1, dense_w2, dense_b2)
    _check_inputs(x, mask, weights, alpha_param, ramp, top_k)
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    weights = tuple(w.to(x.dtype) for w in weights)
    if path == "auto":
        path = pick_path(x, expert_w1, router_w1, top_k)
    if path == "fused":
        E, D, F = expert_w1.shape
        if not fused_tile_supported(D, F, E, router_w1.shape[1], top_k, x.dtype):
            raise ValueError(f"path 'fused' does not support D={D}, F={F}, E={E}, "
                             f"top_k={top_k} in {x.dtype}; use path 'grouped'")
        outputs = torch.ops.hymoe.fused_tile_forward(x, mask, *weights, alpha_param,
                                                     ramp.detach(), top_k)
    else:
        outputs = HyMoEFunction.apply(x, mask, *weights, alpha_param, ramp.detach(), top_k)
    return outputs[0], outputs[1], outputs[2]


def _check_inputs(x, mask, weights, alpha_param, ramp, top_k) -> None:
    if x.dim() != 2 or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"x must be a 2-d float32/bfloat16/float16 tensor, got "
                         f"{tuple(x.shape)} {x.dtype}")
    N, D = x.shape
    H, E, F = weights[0].shape[-1], weights[2].shape[-1], weights[8].shape[-1]
    expected = ((D, H), (H,), (H, E), (E,), (E, D, F), (E, F), (E, F, D), (E, D),
                (D, F), (F,), (F, D), (D,))
    for name, w, shape in zip(WEIGHT_NAMES, weights, expected):
        if tuple(w.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(w.shape)}")
        if w.device != x.device:
            raise ValueError(f"{name} is on {w.device}, x on {x.device}")
    if mask is not None and (mask.shape != (N,) or mask.dtype != torch.bool
                             or mask.device != x.device):
        raise ValueError(f"mask must be a bool tensor of shape ({N},) on {x.device}, got "
                         f"{tuple(mask.shape)} {mask.dtype} on {mask.device}")
    for name, t in (("alpha_param", alpha_param), ("ramp", ramp)):
        if t.dim() != 0:
            raise ValueError(f"{name} must be a 0-d tensor, got shape {tuple(t.shape)}")
    if not isinstance(top_k, int) or not 1 <= top_k <= E:
        raise ValueError(f"top_k must be an int in 1..{E}, got {top_k!r}")
