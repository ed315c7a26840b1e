"""Fast pure-PyTorch HyMoE: same function as :func:`.reference.hymoe_reference`.

How it differs from the reference (``benchmarks/test_bench_layer.py`` times this path):

* The N*k (token, slot) pairs are sorted once by expert (a stable sort of the flat top-k
  ids), so each expert owns a contiguous slice of the gathered rows; no loop over tokens.
* FFNs run as one custom op, :func:`expert_ffn`, with a hand-written backward: per expert
  slice, in chunks of rows small enough for the cache, addmm -> GELU -> addmm. Only the
  pre-activations are kept for the backward, which recomputes the GELU per chunk; the
  (chunk, F) work buffers are reused, so no other full-size temporaries are allocated (on
  CPU, fresh large buffers cost page faults comparable to the GELUs). The dense FFN is
  the same op with one "expert" that owns every token. As a custom op it is a single
  node for torch.compile (``fullgraph=True`` works).
* Rows move between token order and expert order with gathers whose backward is a gather
  by the inverse permutation (no scatter-add); each token's k expert outputs are combined
  as a weighted sum over a (N, k, D) view, with a hand-written backward.
* The router's (H, E) output layer runs as F.linear with a contiguous (E, H) weight, the
  orientation in which its skinny matmuls are fast.

Not used, as they are no faster: one matmul for the dense and router first layers
(x @ [dense_w1 | router_w1]), slower than the chunked dense FFN; torch's grouped_mm (no
fp32 under torch.compile, and no faster than per-expert addmm on CPU); the experts'
first-layer bias as an extra all-ones input column.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..weights import HyMoEWeights


def _sum_slots(per_token: Tensor, scale: Tensor | None = None) -> Tensor:
    """sum_j scale[:, j] * per_token[:, j] (or the plain sum over j): per_token (N, k, C),
    scale (N, k) -> (N, C). A loop over the k slots: several times faster on CPU than a
    reduction over the middle dimension."""
    total = per_token[:, 0] if scale is None else per_token[:, 0] * scale[:, :1]
    for slot in range(1, per_token.shape[1]):
        if scale is None:
            total = total + per_token[:, slot]
        else:
            total = total.addcmul_(per_token[:, slot], scale[:, slot:slot + 1])
    return total


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
        return _sum_slots(per_slot.view(-1, ctx.top_k, grad.shape[-1])), None, None, None


class _CombineSlots(torch.autograd.Function):
    """y_moe[n] = sum_j scale[n, j] * rows[inverse[n*k + j]]: each token's k expert output
    rows (expert-sorted, (N*k, D)) weighted by scale (N, k) -> (N, D)."""

    @staticmethod
    def forward(ctx, rows, scale, order, inverse):
        n, k = scale.shape
        per_token = rows.index_select(0, inverse).view(n, k, rows.shape[-1])
        ctx.save_for_backward(per_token, scale, order)
        return _sum_slots(per_token, scale)

    @staticmethod
    def backward(ctx, grad_y):
        per_token, scale, order = ctx.saved_tensors
        n, k = scale.shape
        grad_scale = torch.linalg.vecdot(per_token, grad_y.unsqueeze(1))
        per_slot = (grad_y.unsqueeze(1) * scale.unsqueeze(-1)).view(n * k, grad_y.shape[-1])
        return per_slot.index_select(0, order), grad_scale, None, None


# Rows per chunk of an expert's slice: its (chunk, F) hidden activations take about this
# many bytes, so the chunk's GELU input, output and gradients stay in cache and are
# reused across chunks instead of being allocated (and page-faulted) at full size.
_CHUNK_BYTES = 2 << 20


def _expert_chunks(ends: Tensor, chunk_rows: int):
    """(expert, lo, hi) for every chunk of at most ``chunk_rows`` rows of every expert's
    slice [ends[e-1], ends[e]) (slices of empty experts yield nothing)."""
    start = 0
    for expert, end in enumerate(ends.tolist()):
        for lo in range(start, end, chunk_rows):
            yield expert, lo, min(lo + chunk_rows, end)
        start = end


def _chunk_rows(rows: Tensor, d_ff: int) -> int:
    """Rows per chunk for (M, D) ``rows`` feeding a hidden layer of width ``d_ff``."""
    return max(1, min(rows.shape[0], _CHUNK_BYTES // (d_ff * rows.element_size())))


@torch.library.custom_op("hymoe_kernels::expert_ffn", mutates_args=())
def expert_ffn(rows: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, ends: Tensor,
               save_hidden: bool) -> tuple[Tensor, Tensor]:
    """Per-expert FFN of contiguous row slices, chunk by chunk.

    rows (M, D) sorted by expert; w1 (E, D, F), b1 (E, F), w2 (E, F, D'), b2 (E, D');
    ends (E,) int64 exclusive slice ends, on any device. Expert e's rows [s, t) map to
    gelu(rows[s:t] @ w1[e] + b1[e]) @ w2[e] + b2[e]. Returns (out (M, D'), hidden): hidden
    is the (M, F) pre-activation when ``save_hidden`` (for the backward) and (0, F)
    otherwise. A custom op: torch.compile sees one opaque node; the E slice ends are read
    on the host once per call (one sync when they live on a GPU).
    """
    d_ff = w1.shape[-1]
    chunk = _chunk_rows(rows, d_ff)
    out = rows.new_empty(rows.shape[0], w2.shape[-1])
    hidden = rows.new_empty(rows.shape[0] if save_hidden else chunk, d_ff)
    act = rows.new_empty(chunk, d_ff)
    for expert, lo, hi in _expert_chunks(ends, chunk):
        pre = hidden[lo:hi] if save_hidden else hidden[:hi - lo]
        torch.addmm(b1[expert], rows[lo:hi], w1[expert], out=pre)
        torch.ops.aten.gelu.out(pre, out=act[:hi - lo])
        torch.addmm(b2[expert], act[:hi - lo], w2[expert], out=out[lo:hi])
    return out, hidden if save_hidden else hidden[:0]


@expert_ffn.register_fake
def _(rows, w1, b1, w2, b2, ends, save_hidden):
    return (rows.new_empty(rows.shape[0], w2.shape[-1]),
            rows.new_empty(rows.shape[0] if save_hidden else 0, w1.shape[-1]))


@torch.library.custom_op("hymoe_kernels::expert_ffn_backward", mutates_args=())
def expert_ffn_backward(grad_out: Tensor, rows: Tensor, hidden: Tensor, w1: Tensor,
                        w2: Tensor, ends: Tensor
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`expert_ffn` w.r.t. rows, w1, b1, w2, b2 given grad_out (M, D')
    and the saved pre-activation hidden (M, F); the GELU output is recomputed per chunk.
    Experts with empty slices get zero gradients."""
    num_experts, _, d_ff = w1.shape
    chunk = _chunk_rows(rows, d_ff)
    grad_rows = torch.empty_like(rows)
    grad_w1, grad_b1 = torch.zeros_like(w1), w1.new_zeros(num_experts, d_ff)
    grad_w2, grad_b2 = torch.zeros_like(w2), w2.new_zeros(num_experts, w2.shape[-1])
    act, grad_act, grad_pre = (rows.new_empty(chunk, d_ff) for _ in range(3))
    for expert, lo, hi in _expert_chunks(ends, chunk):
        n = hi - lo
        grad, pre = grad_out[lo:hi], hidden[lo:hi]
        torch.ops.aten.gelu.out(pre, out=act[:n])
        grad_w2[expert].addmm_(act[:n].t(), grad)
        grad_b2[expert] += grad.sum(0)
        torch.mm(grad, w2[expert].t(), out=grad_act[:n])
        torch.ops.aten.gelu_backward.grad_input(grad_act[:n], pre, grad_input=grad_pre[:n])
        grad_w1[expert].addmm_(rows[lo:hi].t(), grad_pre[:n])
        grad_b1[expert] += grad_pre[:n].sum(0)
        torch.mm(grad_pre[:n], w1[expert].t(), out=grad_rows[lo:hi])
    return grad_rows, grad_w1, grad_b1, grad_w2, grad_b2


@expert_ffn_backward.register_fake
def _(grad_out, rows, hidden, w1, w2, ends):
    num_experts, _, d_ff = w1.shape
    return (torch.empty_like(rows), torch.empty_like(w1), w1.new_empty(num_experts, d_ff),
            torch.empty_like(w2), w2.new_empty(num_experts, w2.shape[-1]))


def _expert_ffn_setup(ctx, inputs, output) -> None:
    rows, w1, _b1, w2, _b2, ends, save_hidden = inputs
    ctx.save_hidden = save_hidden
    ctx.set_materialize_grads(False)       # hidden gets no gradient; skip zero-filling one
    ctx.save_for_backward(rows, output[1], w1, w2, ends)


def _expert_ffn_grad(ctx, grad_out: Tensor | None, _grad_hidden: Tensor | None):
    if grad_out is None:                   # only the (non-differentiable) hidden was used
        return (None,) * 7
    if not ctx.save_hidden:
        raise RuntimeError("expert_ffn was called with save_hidden=False, so it cannot be "
                           "differentiated; pass save_hidden=True when gradients are needed")
    rows, hidden, w1, w2, ends = ctx.saved_tensors
    grads = expert_ffn_backward(grad_out.contiguous(), rows, hidden, w1, w2, ends)
    return (*grads, None, None)


expert_ffn.register_autograd(_expert_ffn_grad, setup_context=_expert_ffn_setup)


def hymoe_torch(x: Tensor, mask: Tensor | None, weights: HyMoEWeights, alpha_param: Tensor,
                ramp: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """HyMoE forward on a flat batch of tokens; arguments, shapes, dtype rules and returns
    exactly as :func:`.reference.hymoe_reference` (weights cast to x's dtype;
    routing math in at least float32; y (N, D) in the compute dtype of x, prob_sum (E,)
    float32 (float64 for float64 inputs), load (E,) int64; padding excluded from prob_sum
    and load by selection)."""
    num_tokens = x.shape[0]
    num_experts = weights.expert_w1.shape[0]
    device = x.device

    router_act = F.gelu(torch.addmm(weights.router_b1.to(x.dtype), x,
                                    weights.router_w1.to(x.dtype)))
    compute_dtype = router_act.dtype                   # x's dtype, or autocast's
    acc_dtype = torch.promote_types(compute_dtype, torch.float32)     # routing math in >= fp32
    # F.linear with a contiguous (E, H) weight: the orientation in which the skinny
    # (N, H) x (H, E) matmuls are fast, forward and backward.
    logits = F.linear(router_act, weights.router_w2.to(compute_dtype).t().contiguous(),
                      weights.router_b2.to(compute_dtype)).to(acc_dtype)
    top_logits, top_ids = logits.topk(top_k, dim=-1)                  # (N, k)
    alpha = torch.sigmoid(alpha_param.to(acc_dtype)) * ramp
    slot_scale = top_logits.softmax(dim=-1) * alpha                    # (N, k) acc_dtype

    # Sort the N*k slots by expert: expert e owns rows [ends[e-1], ends[e]).
    flat_ids = top_ids.reshape(-1)
    num_slots = flat_ids.shape[0]
    sorted_ids, order = flat_ids.sort(stable=True)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(num_slots, device=device))
    ends = torch.searchsorted(sorted_ids, torch.arange(num_experts, device=device), right=True)

    xc = x.to(compute_dtype)
    expert_rows = _GatherSlotRows.apply(xc, order, inverse, top_k)             # (N*k, D)
    expert_weights = [w.to(compute_dtype) for w in weights.experts]
    # The dense FFN is the same op with a single "expert" that owns all N rows.
    dense_weights = [w.to(compute_dtype).unsqueeze(0) for w in weights.dense]
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (xc, *expert_weights, *dense_weights))
    all_rows = torch.full((1,), num_tokens)      # on the host: reading it never syncs a GPU
    y_dense, _ = expert_ffn(xc, *dense_weights, all_rows, needs_grad)
    expert_out, _ = expert_ffn(expert_rows, *expert_weights, ends, needs_grad)   # (N*k, D)
    y_moe = _CombineSlots.apply(expert_out, slot_scale.to(compute_dtype), order, inverse)
    y = y_dense + y_moe

    real = torch.ones(num_tokens, dtype=torch.bool, device=device) if mask is None else mask
    prob_sum = torch.where(real.unsqueeze(-1), logits.softmax(dim=-1), 0.0).sum(dim=0)
    real_slots = real.unsqueeze(1).expand(num_tokens, top_k).reshape(-1).long()
    load = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(
        0, flat_ids, real_slots)
    return y, prob_sum, load
