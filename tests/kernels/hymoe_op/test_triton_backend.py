"""hymoe_triton (both paths, their custom ops and autograd) against hymoe_reference: forward
and every gradient."""
from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings, strategies as st

from hymoe_kernels import HyMoEFFN, HyMoEWeights, hymoe, hymoe_reference, hymoe_triton
from hymoe_kernels import backend
from hymoe_kernels.backend import Backend, resolve
from hymoe_kernels.hymoe_op.reference import ffn
from hymoe_kernels.layer import hymoe_function
from kernel_cases import (DEVICE, TOL, make_weights, poisoned_outputs, rel_err,
                          routing_robust_rows)


def run_and_compare(N, D, H, E, F, top_k, dtype=torch.float32, masked=True, noncontig=False,
                    seed=0, weights=None, mask=None, path="grouped"):
    """Run hymoe_triton on ``path`` (outputs poisoned) and hymoe_reference in float64 on the
    same inputs, less the tokens whose routing is a near-tie; assert y, prob_sum, load and
    the gradients of x, 12 weights and alpha_param agree (the loss weighs y and prob_sum
    with random cotangents)."""
    gen = torch.Generator().manual_seed(seed)
    if weights is None:
        weights = make_weights(D, H, E, F, dtype, separated_logits=dtype != torch.float32,
                               generator=gen)
    x = torch.randn(N, 2 * D if noncontig else D, generator=gen).to(DEVICE, dtype)
    if mask is None and masked:
        mask = (torch.rand(N, generator=gen) > 0.3).to(DEVICE)
    # a GPU's fp32 dots may break near-ties of the router logits otherwise than the
    # float64 reference does: those tokens are left out (none are, in the interpreter's draws)
    keep = routing_robust_rows(x[:, ::2] if noncontig else x, weights, top_k)
    x, mask, N = x[keep], None if mask is None else mask[keep], int(keep.sum())
    x = (x[:, ::2] if noncontig else x).requires_grad_()
    alpha_param = torch.tensor(0.4, device=DEVICE, requires_grad=True)
    ramp = torch.tensor(0.75, device=DEVICE)
    dy = torch.randn(N, D, generator=gen, dtype=torch.float64).to(DEVICE)
    dprob = torch.randn(E, generator=gen, dtype=torch.float64).to(DEVICE)
    with poisoned_outputs():
        y, prob_sum, load = hymoe_triton(x, mask, weights, alpha_param, ramp, top_k, path=path)
        grads = torch.autograd.grad((y.double() * dy).sum() + (prob_sum.double() * dprob).sum(),
                                    [x, *weights, alpha_param])

    def reference(dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, *weights)]
        leaves.append(alpha_param.detach().to(torch.float64 if dtype == torch.float64
                                              else torch.float32).requires_grad_())
        y_ref, prob_ref, load_ref = hymoe_reference(leaves[0], mask, HyMoEWeights(*leaves[1:13]),
                                                    leaves[13], ramp, top_k)
        loss = (y_ref.double() * dy).sum() + (prob_ref.double() * dprob).sum()
        return leaves, (y_ref, prob_ref, *torch.autograd.grad(loss, leaves)), load_ref

    # truth: float64 reference; PyTorch's own error in x's dtype sets the allowance for
    # ill-conditioned outputs (sums of terms of both signs, e.g. router_b2: per-token softmax
    # gradients sum to zero): ours may be up to twice PyTorch's error, or `tol`.
    ref_leaves, refs, load_ref = reference(torch.float64)
    _, same_dtype_refs, _ = reference(dtype)
    bounds = [max(TOL[dtype], 2 * rel_err(same, ref)) for same, ref in zip(same_dtype_refs, refs)]

    names = ["y", "prob_sum", "x", *HyMoEWeights._fields, "alpha_param"]
    outs = (y, prob_sum, *grads)
    assert y.dtype == dtype and y.shape == (N, D)
    assert prob_sum.dtype == torch.float32 and load.dtype == torch.int64
    assert torch.equal(load.cpu(), load_ref.cpu())
    for grad, leaf in zip(grads, (x, *weights, alpha_param)):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape
    for name, out, ref, bound in zip(names[:-1], outs, refs, bounds):
        assert torch.isfinite(out).all(), name
        assert rel_err(out, ref) < bound, (name, rel_err(out, ref), bound)
    # d/d alpha_param is one sum of N*D terms of either sign; bound its error by the sum of
    # the terms' magnitudes (what any summation order guarantees), not by the result.
    with torch.no_grad():
        dense = ffn(ref_leaves[0], *HyMoEWeights(*ref_leaves[1:13]).dense)
        sig = torch.sigmoid(ref_leaves[13])
        dalpha_dparam = sig * (1 - sig) * ramp
        y_moe = (refs[0] - dense) / (sig * ramp)
        magnitude = (dy * y_moe).abs().sum() * dalpha_dparam
    assert (grads[-1] - refs[-1]).abs() <= TOL[dtype] * magnitude + 1e-30, "alpha_param"
    return load


@settings(max_examples=10, deadline=None)
@given(N=st.integers(0, 24), D=st.integers(3, 20), H=st.integers(2, 12), E=st.integers(1, 8),
       F=st.integers(3, 24), k_frac=st.floats(0, 1), masked=st.booleans(),
       seed=st.integers(0, 2 ** 31), path=st.sampled_from(["grouped", "fused"]))
def test_matches_reference_fp32(N, D, H, E, F, k_frac, masked, seed, path):
    # widths >= 2-3: a 1-element gradient summed over tokens of both signs can lose 1e-5
    # relative accuracy in any fp32 summation order (test_edge_shapes covers tiny widths)
    top_k = 1 + int(k_frac * (E - 1))
    run_and_compare(N, D, H, E, F, top_k, masked=masked, seed=seed, path=path)


@settings(max_examples=4, deadline=None)
@given(dtype=st.sampled_from([torch.bfloat16, torch.float16]), N=st.integers(1, 24),
       D=st.integers(3, 20), E=st.integers(2, 6), seed=st.integers(0, 2 ** 31),
       path=st.sampled_from(["grouped", "fused"]))
def test_matches_reference_low_precision(dtype, N, D, E, seed, path):
    run_and_compare(N, D, 9, E, 19, 2, dtype=dtype, seed=seed, path=path)


@pytest.mark.parametrize("N,D,H,E,F,top_k", [
    (0, 8, 4, 3, 8, 2),      # no tokens
    (1, 8, 4, 3, 8, 2),      # one token
    (5, 6, 4, 1, 7, 1),      # a single expert
    (6, 6, 4, 4, 7, 4),      # k = E
    (9, 5, 3, 16, 6, 3),     # 16 experts, most of them empty
    (70, 33, 17, 5, 70, 2),  # several row tiles per expert, D and F not powers of two
])
@pytest.mark.parametrize("path", ["grouped", "fused"])
def test_edge_shapes(N, D, H, E, F, top_k, path):
    run_and_compare(N, D, H, E, F, top_k, path=path)


def test_expert_without_tokens():
    weights = make_weights(7, 5, 4, 9)
    with torch.no_grad():
        weights.router_b2[1] = -1e4  # expert 1 is never in a top-2
    load = run_and_compare(20, 7, 5, 4, 9, 2, weights=weights)
    assert load[1] == 0


@pytest.mark.parametrize("masked", ["none", "all_padding"])
def test_masks(masked):
    mask = torch.zeros(11, dtype=torch.bool, device=DEVICE) if masked == "all_padding" else None
    load = run_and_compare(11, 6, 4, 3, 5, 2, masked=False, mask=mask)
    assert load.sum() == (0 if masked == "all_padding" else 22)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noncontiguous_inputs(dtype):
    gen = torch.Generator().manual_seed(3)
    weights = make_weights(6, 4, 3, 10, dtype, separated_logits=dtype != torch.float32,
                           generator=gen)
    # dense_w1 as a transposed view and expert_w2 with permuted strides
    weights = weights._replace(
        dense_w1=weights.dense_w1.detach().t().contiguous().t().requires_grad_(),
        expert_w2=weights.expert_w2.detach().transpose(1, 2).contiguous().transpose(1, 2)
        .requires_grad_())
    run_and_compare(13, 6, 4, 3, 10, 2, dtype=dtype, noncontig=True, weights=weights)


def test_deterministic():
    gen = torch.Generator().manual_seed(5)
    weights = make_weights(12, 8, 4, 20, generator=gen)
    x = torch.randn(40, 12, generator=gen).to(DEVICE).requires_grad_()
    alpha_param = torch.tensor(0.1, device=DEVICE, requires_grad=True)
    ramp = torch.tensor(1.0, device=DEVICE)

    def run():
        y, prob_sum, _ = hymoe(x, None, weights, alpha_param, ramp, 2)
        return (y, prob_sum, *torch.autograd.grad(y.square().sum() + prob_sum[0],
                                                  [x, *weights, alpha_param]))
    for first, second in zip(run(), run()):
        assert torch.equal(first, second)


def test_custom_op_registration():
    gen = torch.Generator().manual_seed(7)
    weights = make_weights(5, 4, 3, 6, generator=gen)
    x = torch.randn(6, 5, generator=gen).to(DEVICE).requires_grad_()
    mask = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool, device=DEVICE)
    alpha_param = torch.tensor(0.2, device=DEVICE, requires_grad=True)
    args = (x, mask, list(weights), alpha_param, torch.tensor(0.5, device=DEVICE), 2)
    torch.library.opcheck(torch.ops.hymoe.forward.default, args)
    torch.library.opcheck(torch.ops.hymoe.fused_tile_forward.default, args)


def test_path_choice():
    from hymoe_kernels.hymoe_op.triton_backend import pick_path
    x = torch.randn(4, 64, device=DEVICE)
    small, wide = make_weights(64, 64, 4, 256), make_weights(64, 64, 16, 256)
    assert pick_path(x, small, 2) == "fused"     # E=4 <= 4k
    assert pick_path(x, wide, 2) == "grouped"     # E=16 > 4k
    x_wide = torch.randn(4, 512, device=DEVICE, dtype=torch.bfloat16)
    big = make_weights(512, 64, 4, 32)
    assert pick_path(x_wide, big, 2) == "grouped"  # D beyond the fused tile
    with pytest.raises(ValueError, match="path 'fused' does not support"):
        hymoe_triton(x_wide, None, big.to(torch.bfloat16), torch.zeros((), device=DEVICE),
                     torch.ones((), device=DEVICE), 2, path="fused")


def test_torch_compile_fullgraph():
    gen = torch.Generator().manual_seed(8)
    weights = make_weights(5, 4, 3, 6, generator=gen)
    x = torch.randn(6, 5, generator=gen).to(DEVICE).requires_grad_()
    alpha_param = torch.tensor(0.2, device=DEVICE, requires_grad=True)
    args = (x, None, weights, alpha_param, torch.tensor(0.5, device=DEVICE), 2)
    for path in ("grouped", "fused"):
        eager = functools.partial(hymoe_triton, path=path)
        compiled = torch.compile(eager, backend="aot_eager", fullgraph=True)
        results = []
        for fn in (eager, compiled):
            y, prob_sum, load = fn(*args)
            results.append((y, prob_sum, load, *torch.autograd.grad(
                y.sum() + prob_sum[1], [x, *weights, alpha_param])))
        for from_eager, from_compiled in zip(*results):
            assert torch.equal(from_eager, from_compiled), path


def test_bad_arguments():
    weights = make_weights(5, 4, 3, 6)
    x = torch.randn(6, 5, device=DEVICE)
    alpha_param, ramp = torch.tensor(0.0, device=DEVICE), torch.tensor(1.0, device=DEVICE)
    with pytest.raises(ValueError, match="expert_w1"):
        hymoe_triton(x, None, weights._replace(expert_w1=weights.expert_w1[:, :4]),
                     alpha_param, ramp, 2)
    with pytest.raises(ValueError, match="top_k"):
        hymoe_triton(x, None, weights, alpha_param, ramp, 4)
    with pytest.raises(ValueError, match="mask"):
        hymoe_triton(x, torch.ones(5, dtype=torch.bool, device=DEVICE), weights, alpha_param,
                     ramp, 2)


def test_layer_triton_backend_matches_reference():
    torch.manual_seed(11)
    layers = {b: HyMoEFFN(10, 14, num_experts=4, top_k=2, warmup_steps=4, backend=b,
                          router_hidden=6).to(DEVICE) for b in ("triton", "reference")}
    layers["reference"].load_state_dict(layers["triton"].state_dict())
    x = torch.randn(3, 5, 10, device=DEVICE)
    mask = torch.rand(3, 5, device=DEVICE) > 0.25
    target = torch.randn(3, 5, 10, device=DEVICE)
    grads = {}
    for name, layer in layers.items():
        layer.train()
        layer.set_step(2)
        xi = x.clone().requires_grad_()
        out = layer(xi, mask)
        loss = (out * target).sum() + 10 * layer.aux_loss
        grads[name] = (out, layer.aux_loss, *torch.autograd.grad(
            loss, [xi, *layer.parameters()]))
    for ours, ref in zip(grads["triton"], grads["reference"]):
        assert rel_err(ours, ref) < 1e-5


def test_auto_backend_choice(monkeypatch):
    x = torch.zeros(2, 3, device=DEVICE)
    expected = Backend.TRITON if x.is_cuda else Backend.TORCH
    assert resolve("auto", x) is expected
    assert hymoe_function(Backend.TRITON) is hymoe_triton
    if not x.is_cuda:
        monkeypatch.setattr(backend, "INTERPRETING", False)
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            resolve("triton", x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs and CUDA graphs need CUDA")
def test_no_host_sync_and_cuda_graph_capture():
    gen = torch.Generator().manual_seed(9)
    weights = make_weights(16, 8, 4, 24, generator=gen)
    x = torch.randn(50, 16, generator=gen).to(DEVICE).requires_grad_()
    mask = (torch.rand(50, generator=gen) > 0.2).to(DEVICE)
    alpha_param = torch.tensor(0.3, device=DEVICE, requires_grad=True)
    ramp = torch.tensor(0.5, device=DEVICE)
    hymoe_triton(x, mask, weights, alpha_param, ramp, 2)  # compile the kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, prob_sum, _ = hymoe_triton(x, mask, weights, alpha_param, ramp, 2)
        torch.autograd.grad(y.sum() + prob_sum.sum(), [x, *weights, alpha_param])
    finally:
        torch.cuda.set_sync_debug_mode("default")

    static_x = x.detach().clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        hymoe_triton(static_x, mask, weights, alpha_param, ramp, 2)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_y, static_prob, static_load = hymoe_triton(static_x, mask, weights,
                                                          alpha_param, ramp, 2)
    new_x = torch.randn(50, 16, generator=gen).to(DEVICE)
    static_x.copy_(new_x)
    graph.replay()
    with torch.no_grad():
        y_eager, prob_eager, load_eager = hymoe_triton(new_x, mask, weights, alpha_param,
                                                       ramp, 2)
    assert torch.equal(static_y, y_eager) and torch.equal(static_prob, prob_eager)
    assert torch.equal(static_load, load_eager)
