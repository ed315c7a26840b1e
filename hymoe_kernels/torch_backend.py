"""Fast pure-PyTorch HyMoE: same function as :func:`hymoe_kernels.reference.hymoe_reference`.

How it differs from the reference (each choice measured, see ``benchmarks/``):

* The dense FFN's and the router's first layers are one matmul: x @ [dense_w1 | router_w1],
  so x is read once and one GELU call covers both hidden layers.
* The N*k (token, slot) pairs are sorted once by expert (a stable sort of the flat top-k
  ids); each expert then owns a contiguous slice, and the experts' two layers are two
  grouped matmuls (``torch.nn.functional.grouped_mm`` for fp32/bf16/fp16 on CPU: no host sync,
  traceable by torch.compile with ``fullgraph=True``; otherwise a loop over the E slices).
* The experts' first-layer bias rides in the matmul as an extra all-ones input column (its
  gradient then comes out of the weight gradient); the second-layer bias is summed per
  token as (alpha * gates scattered to (N, E)) @ expert_b2, an N x E x D matmul.
* Rows move between token order and expert order with two gathers whose backward is a
  gather by the inverse permutation (no scatter-add), and each token's k expert outputs
  are combined by a weighted sum over a (N, k, D) view.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

class _GatherSlotRows(torch.autograd.Function):
    """rows[i] = x[order[i] // k]: token rows in expert-sorted slot order.

    x (N, C), order (N*k,) int64 permutation of the flat slots, inverse (N*k,) its
    inverse; returns (N*k, C). Backward gathers by ``inverse`` and sums each token's k
    slots instead of scatter-adding.
    """

    @staticmethod
    def forward(ctx, x: Tensor, order: Tensor, inverse: Tensor, top_k: int) -> Tensor:
        ctx.save_for_backward(inverse)
        ctx.top_k = top_k
        return x.index_select(0, order // top_k)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        per_slot = grad.index_select(0, inverse)
        return per_slot.view(-1, ctx.top_k, grad.shape[-1]).sum(1), None, None, None


class _PermuteRows(torch.autograd.Function):
    """out[i] = src[perm[i]] for a permutation ``perm`` with inverse ``inverse`` (both
    (M,) int64); src (M, C) -> (M, C). Backward is a gather by ``inverse``."""

    @staticmethod
    def forward(ctx, src: Tensor, perm: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return src.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


@torch.library.custom_op("hymoe_kernels::grouped_linear", mutates_args=())
def grouped_linear(rows: Tensor, weight: Tensor, bias: Tensor, ends: Tensor) -> Tensor:
    """Per-expert affine map of contiguous row slices: rows (M, K) sorted by expert,
    weight (E, K, P), bias (E, P), ends (E,) int64 exclusive slice ends -> (M, P), where
    out[s:t] = rows[s:t] @ weight[e] + bias[e] for expert e's slice [s, t).

    A custom op so that torch.compile (fullgraph) treats it as one opaque node; the
    E slice bounds are read on the host once per call (free on CPU, one sync on GPU).
    """
    out = rows.new_empty(rows.shape[0], weight.shape[-1])
    start = 0
    for expert, end in enumerate(ends.tolist()):
        torch.addmm(bias[expert], rows[start:end], weight[expert], out=out[start:end])
        start = end
    return out


@grouped_linear.register_fake
def _(rows: Tensor, weight: Tensor, bias: Tensor, ends: Tensor) -> Tensor:
    return rows.new_empty(rows.shape[0], weight.shape[-1])


@torch.library.custom_op("hymoe_kernels::grouped_linear_backward", mutates_args=())
def grouped_linear_backward(grad_out: Tensor, rows: Tensor, weight: Tensor,
                            ends: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`grouped_linear` w.r.t. rows (M, K), weight (E, K, P) and bias
    (E, P), given grad_out (M, P); an expert with an empty slice gets zero gradients."""
    grad_rows = rows.new_empty(rows.shape)
    grad_weight = weight.new_empty(weight.shape)
    grad_bias = grad_out.new_empty(weight.shape[0], weight.shape[-1])
    start = 0
    for expert, end in enumerate(ends.tolist()):
        torch.mm(grad_out[start:end], weight[expert].t(), out=grad_rows[start:end])
        torch.mm(rows[start:end].t(), grad_out[start:end], out=grad_weight[expert])
        torch.sum(grad_out[start:end], dim=0, out=grad_bias[expert])
        start = end
    return grad_rows, grad_weight, grad_bias


@grouped_linear_backward.register_fake
def _(grad_out: Tensor, rows: Tensor, weight: Tensor, ends: Tensor):
    return (rows.new_empty(rows.shape), weight.new_empty(weight.shape),
            grad_out.new_empty(weight.shape[0], weight.shape[-1]))


def _grouped_linear_setup(ctx, inputs, output) -> None:
    rows, weight, _bias, ends = inputs
    ctx.save_for_backward(rows, weight, ends)


def _grouped_linear_grad(ctx, grad_out: Tensor):
    rows, weight, ends = ctx.saved_tensors
    grad_rows, grad_weight, grad_bias = grouped_linear_backward(
        grad_out.contiguous(), rows, weight, ends)
    return grad_rows, grad_weight, grad_bias, None


grouped_linear.register_autograd(_grouped_linear_grad, setup_context=_grouped_linear_setup)


def hymoe_torch(
    x: Tensor,
    mask: Tensor | None,
    router_w1: Tensor, router_b1: Tensor, router_w2: Tensor, router_b2: Tensor,
    expert_w1: Tensor, expert_b1: Tensor, expert_w2: Tensor, expert_b2: Tensor,
    dense_w1: Tensor, dense_b1: Tensor, dense_w2: Tensor, dense_b2: Tensor,
    alpha_param: Tensor,
    ramp: Tensor,
    top_k: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """HyMoE forward on a flat batch of tokens; arguments, shapes and returns exactly as
    :func:`hymoe_kernels.reference.hymoe_reference` (y (N, D) in the compute dtype of x,
    prob_sum (E,) float32, load (E,) int64)."""
    num_tokens, d_model = x.shape
    num_experts, _, d_ff = expert_w1.shape
    router_hidden = router_w1.shape[1]
    device = x.device

    # Dense FFN and router hidden layers from one read of x.
    hidden = F.gelu(torch.addmm(torch.cat([dense_b1, router_b1]), x,
                                torch.cat([dense_w1, router_w1], dim=1)))
    compute_dtype = hidden.dtype                       # x's dtype, or autocast's
    dense_hidden, router_hidden_act = hidden.split([d_ff, router_hidden], dim=1)
    logits = torch.addmm(router_b2.to(compute_dtype), router_hidden_act,
                         router_w2.to(compute_dtype)).float()
    top_logits, top_ids = logits.topk(top_k, dim=-1)                  # (N, k)
    alpha = torch.sigmoid(alpha_param.float()) * ramp
    slot_scale = top_logits.softmax(dim=-1) * alpha                    # (N, k) float32

    # Sort the N*k slots by expert: expert e owns rows [ends[e-1], ends[e]).
    flat_ids = top_ids.reshape(-1)
    num_slots = flat_ids.shape[0]
    sorted_ids, order = flat_ids.sort(stable=True)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(num_slots, device=device))
    ends = torch.searchsorted(sorted_ids, torch.arange(num_experts, device=device), right=True)

    expert_rows = _GatherSlotRows.apply(x.to(compute_dtype), order, inverse, top_k)
    expert_hidden = F.gelu(grouped_linear(expert_rows, expert_w1.to(compute_dtype),
                                          expert_b1.to(compute_dtype), ends))
    expert_out = grouped_linear(expert_hidden, expert_w2.to(compute_dtype),
                                expert_b2.to(compute_dtype), ends)       # (N*k, D)
    per_token = _PermuteRows.apply(expert_out, inverse, order).view(num_tokens, top_k, d_model)
    y_moe = (per_token * slot_scale.to(compute_dtype).unsqueeze(-1)).sum(1)
    y = torch.addmm(dense_b2.to(compute_dtype), dense_hidden, dense_w2.to(compute_dtype)) + y_moe

    real = torch.ones(num_tokens, dtype=torch.bool, device=device) if mask is None else mask
    prob_sum = (logits.softmax(dim=-1) * real.unsqueeze(-1)).sum(dim=0)
    real_slots = real.unsqueeze(1).expand(num_tokens, top_k).reshape(-1).long()
    load = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(
        0, flat_ids, real_slots)
    return y, prob_sum, load
