"""Pure-PyTorch HyMoE: the readable, executable specification of the method.

Every other implementation (the fast torch path, the Triton kernels) must compute the
same function as :func:`hymoe_reference`; tests compare them on random inputs, forward
and backward. Written for clarity, not speed, and float64-gradcheckable.

For a token x in R^D:

* router:         logits = gelu(x @ router_w1 + router_b1) @ router_w2 + router_b2   (E,)
* top-k softmax:  ids = topk(logits, k); gates = softmax(logits[ids])                 (k,)
* experts:        f_e(x) = gelu(x @ expert_w1[e] + expert_b1[e]) @ expert_w2[e] + expert_b2[e]
* dense expert:   y_dense = gelu(x @ dense_w1 + dense_b1) @ dense_w2 + dense_b2
* fusion:         y = y_dense + alpha * sum_i gates_i f_{ids_i}(x),
                  alpha = sigmoid(alpha_param) * ramp,  ramp = min(1, t / T_warmup)

Besides y it returns what the load-balance loss and the statistics need: the per-expert
sum of the *full* router softmax over real tokens (differentiable), and the number of
token slots routed to each expert over real tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..weights import HyMoEWeights


def ffn(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """Position-wise FFN: (N, D) @ (D, F) -> exact-erf GELU -> @ (F, D) -> (N, D)."""
    return F.gelu(x @ w1 + b1) @ w2 + b2


def router_logits(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """Router pi(x): two linear layers with a GELU between, (N, D) -> (N, E)."""
    return ffn(x, w1, b1, w2, b2)


def hymoe_reference(x: Tensor, mask: Tensor | None, weights: HyMoEWeights, alpha_param: Tensor,
                    ramp: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """HyMoE forward on a flat batch of tokens.

    Shapes: x (N, D); mask (N,) bool, True = real token, or None (all real); weights the
    :class:`HyMoEWeights` of the layer (shapes ``HyMoEWeights.shapes(D, H, E, F)``);
    alpha_param () and ramp () float tensors. Weights of another floating dtype are cast
    (differentiably) to x's: an fp32 layer given a bf16 input computes in bf16, as under
    autocast; the routing math (softmax, gates, alpha) runs in at least float32.

    Returns ``(y, prob_sum, load)``: y (N, D) in the compute dtype of x; prob_sum (E,)
    float32 (float64 for float64 inputs), the sum over real tokens of softmax(logits) (all
    E experts, differentiable); load (E,) int64, the number of (real token, slot) pairs
    routed to each expert. Padding is excluded from both by selection, so non-finite
    values in padded tokens never reach them.
    """
    weights = weights.to(x.dtype)
    num_experts = weights.expert_w1.shape[0]
    logits = router_logits(x, *weights.router)
    acc_dtype = torch.promote_types(logits.dtype, torch.float32)       # routing math in >= fp32
    logits = logits.to(acc_dtype)
    top_logits, top_ids = logits.topk(top_k, dim=-1)                  # (N, k)
    gates = top_logits.softmax(dim=-1)                                 # (N, k) acc_dtype

    y_dense = ffn(x, *weights.dense)
    y_moe = torch.zeros_like(y_dense)
    for e in range(num_experts):
        token_idx, slot = (top_ids == e).nonzero(as_tuple=True)       # tokens routed to e
        f_e = ffn(x[token_idx], *(w[e] for w in weights.experts))
        gate = gates[token_idx, slot].unsqueeze(-1)
        y_moe = y_moe.index_add(0, token_idx, (gate * f_e).to(y_moe.dtype))

    alpha = torch.sigmoid(alpha_param.to(acc_dtype)) * ramp
    y = y_dense + alpha.to(y_dense.dtype) * y_moe

    real = torch.ones(x.shape[0], dtype=torch.bool, device=x.device) if mask is None else mask
    prob_sum = torch.where(real.unsqueeze(-1), logits.softmax(dim=-1), 0.0).sum(dim=0)
    load = torch.zeros(num_experts, dtype=torch.int64, device=x.device)
    load = load.index_add(0, top_ids[real].reshape(-1),
                          torch.ones_like(top_ids[real].reshape(-1)))
    return y, prob_sum, load
