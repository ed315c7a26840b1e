"""Fused token-tile HyMoE kernels against hymoe_reference: forward outputs and every gradient.

Runs the Triton kernels on CUDA when present, else in the Triton interpreter on CPU (see
conftest.py). The reference is evaluated in float64 on the same (dtype-rounded) inputs, so
the measured error is the kernels' own. Every buffer the kernels write is poisoned (NaN /
sentinel integers) before the call, so an element a kernel forgets to write fails the test.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hymoe_kernels.hymoe_op import fused_tile
from hymoe_kernels.hymoe_op.fused_tile import (fused_tile_backward, fused_tile_forward,
                                              fused_tile_supported)
from hymoe_kernels.hymoe_op.reference import hymoe_reference
from hymoe_kernels.weights import HyMoEWeights
from kernel_cases import routing_robust_rows

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# every drawn shape compiles new kernel specializations on a GPU (seconds each); the
# interpreter has no compile step, so the CPU run draws more
EXAMPLES = {"cpu": 10, "cuda": 3}[DEVICE]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
GRAD_NAMES = ("x",) + HyMoEWeights._fields + ("alpha_param",)


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    """Every buffer fused_tile allocates starts as NaN (floats) or a large sentinel (ints)."""
    def poisoned(shape, dtype, device):
        out = torch.empty(shape, dtype=dtype, device=device)
        return out.fill_(float("nan") if dtype.is_floating_point else 12345)
    monkeypatch.setattr(fused_tile, "_empty", poisoned)


def make_problem(N, D, F, H, E, dtype, seed, masked=True, alpha_param=0.3, ramp=0.7):
    """Random inputs: x (N, D), mask (N,) or None, HyMoEWeights, alpha_param, ramp."""
    gen = torch.Generator().manual_seed(seed)
    shapes, fan_in = HyMoEWeights.shapes(D, H, E, F), HyMoEWeights.fan_in(D, H, E, F)
    weights = HyMoEWeights(*(((torch.rand(s, generator=gen) * 2 - 1) * fan ** -0.5)
                             .to(DEVICE, dtype) for s, fan in zip(shapes, fan_in)))
    x = torch.randn(N, D, generator=gen).to(DEVICE, dtype)
    mask = (torch.rand(N, generator=gen) > 0.3).to(DEVICE) if masked else None
    return (x, mask, weights, torch.tensor(alpha_param, device=DEVICE),
            torch.tensor(ramp, device=DEVICE))


def rel_error(actual, expected):
    """max |actual - expected| / max |expected| (with a tiny floor for all-zero references)."""
    expected = expected.double()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    diff = (actual.double() - expected).abs().max().item() if expected.numel() else 0.0
    return diff / max(scale, 1e-6)


def reference_outputs_and_grads(x, mask, weights, alpha_param, ramp, top_k, dy, dprob_sum):
    """hymoe_reference in float64: (y, prob_sum, load) and the gradients of
    sum(y * dy) + sum(prob_sum * dprob_sum) w.r.t. x, the weights and alpha_param."""
    leaves = [t.detach().double().requires_grad_() for t in (x, *weights, alpha_param)]
    y, prob_sum, load = hymoe_reference(leaves[0], mask, HyMoEWeights(*leaves[1:13]), leaves[13],
                                        ramp.double(), top_k)
    objective = (y * dy.double()).sum() + (prob_sum * dprob_sum.double()).sum()
    grads = torch.autograd.grad(objective, leaves, allow_unused=True)
    grads = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)]
    return y, prob_sum, load, grads


def check_against_reference(N, D, F, H, E, top_k, dtype, seed, masked=True, ramp=0.7,
                            alpha_param=0.3):
    """Run forward + backward and assert every output within TOLERANCE[dtype]; returns the
    largest relative error seen. Tokens whose routing is a near-tie are left out: a GPU's
    tf32x3 dots (~1e-6 relative) may break them otherwise than the float64 reference."""
    x, mask, weights, alpha_t, ramp_t = make_problem(N, D, F, H, E, dtype, seed, masked,
                                                     alpha_param, ramp)
    keep = routing_robust_rows(x, weights, top_k)
    x, mask, N = x[keep], None if mask is None else mask[keep], int(keep.sum())
    gen = torch.Generator().manual_seed(seed + 1)
    dy = torch.randn(N, D, generator=gen).to(DEVICE, dtype)
    dprob_sum = torch.randn(E, generator=gen).to(DEVICE)

    y, prob_sum, load, saved = fused_tile_forward(x, mask, weights, alpha_t, ramp_t, top_k)
    grads = fused_tile_backward(saved, x, mask, weights, alpha_t, ramp_t, top_k, dy, dprob_sum)
    ref_y, ref_prob_sum, ref_load, ref_grads = reference_outputs_and_grads(
        x, mask, weights, alpha_t, ramp_t, top_k, dy, dprob_sum)

    assert y.shape == (N, D) and y.dtype == dtype
    assert prob_sum.shape == (E,) and prob_sum.dtype == torch.float32
    assert load.dtype == torch.int64 and torch.equal(load.cpu(), ref_load.cpu())
    tol = TOLERANCE[dtype]
    errors = {"y": rel_error(y, ref_y), "prob_sum": rel_error(prob_sum, ref_prob_sum)}
    assert len(grads) == 14
    for name, grad, ref_grad, leaf in zip(GRAD_NAMES, grads, ref_grads, (x, *weights, alpha_t)):
        assert grad.shape == leaf.shape and grad.dtype == leaf.dtype, name
        errors["d" + name] = rel_error(grad, ref_grad)
    worst = max(errors, key=errors.get)
    assert errors[worst] < tol, f"{worst}: rel. error {errors[worst]:.2e} >= {tol} ({errors})"
    return errors[worst]


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(N=st.integers(1, 80), D=st.integers(1, 40), F=st.integers(1, 80), H=st.integers(1, 40),
       E=st.integers(1, 6), data=st.data(), masked=st.booleans(),
       ramp=st.sampled_from([0.0, 0.4, 1.0]), seed=st.integers(0, 2**16))
def test_fp32_matches_reference(N, D, F, H, E, data, masked, ramp, seed):
    top_k = data.draw(st.integers(1, E), label="top_k")
    check_against_reference(N, D, F, H, E, top_k, torch.float32, seed, masked, ramp)


@settings(max_examples=max(2, EXAMPLES // 2), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(N=st.integers(1, 70), D=st.integers(8, 40), F=st.integers(8, 72), E=st.integers(2, 5),
       dtype=st.sampled_from([torch.bfloat16, torch.float16]), seed=st.integers(0, 2**16))
def test_half_precision_matches_reference(N, D, F, E, dtype, seed):
    check_against_reference(N, D, F, D, E, 2, dtype, seed)


@pytest.mark.parametrize("D,F,E,top_k,dtype", [(64, 96, 4, 2, torch.float32),
                                               (100, 40, 16, 3, torch.bfloat16)])
def test_wider_shapes(D, F, E, top_k, dtype):
    """Real tile widths: D = 64 (a full BLOCK_D; fp32's widest), D = 100 (masked 128),
    E = 16 (every bit of the selection mask)."""
    check_against_reference(70, D, F, 32, E, top_k, dtype, seed=D + E)


def test_bf16_recommender_shape():
    check_against_reference(130, 64, 256, 64, 4, 2, torch.bfloat16, seed=7)


def test_empty_batch():
    x, mask, weights, alpha_t, ramp_t = make_problem(0, 16, 32, 16, 4, torch.float32, seed=3)
    y, prob_sum, load, saved = fused_tile_forward(x, mask, weights, alpha_t, ramp_t, 2)
    assert y.shape == (0, 16)
    assert torch.equal(prob_sum.cpu(), torch.zeros(4)) and torch.equal(load.cpu(), torch.zeros(4, dtype=torch.int64))
    grads = fused_tile_backward(saved, x, mask, weights, alpha_t, ramp_t, 2,
                                torch.zeros_like(x), torch.ones(4, device=DEVICE))
    assert grads[0].shape == (0, 16)
    assert all(torch.count_nonzero(g).item() == 0 for g in grads)


def test_all_padding_and_missing_grads():
    """A fully masked batch has zero prob_sum and load; None gradients count as zeros."""
    x, _, weights, alpha_t, ramp_t = make_problem(20, 16, 24, 16, 3, torch.float32, seed=5)
    mask = torch.zeros(20, dtype=torch.bool, device=DEVICE)
    y, prob_sum, load, saved = fused_tile_forward(x, mask, weights, alpha_t, ramp_t, 1)
    assert torch.count_nonzero(prob_sum).item() == 0 and torch.count_nonzero(load).item() == 0
    assert torch.isfinite(y).all()
    grads = fused_tile_backward(saved, x, mask, weights, alpha_t, ramp_t, 1, None, None)
    assert all(torch.count_nonzero(g).item() == 0 for g in grads)


def test_strided_input_and_repeatability():
    """x given as a column slice of a wider tensor; two runs are bitwise identical."""
    x, mask, weights, alpha_t, ramp_t = make_problem(50, 24, 40, 24, 4, torch.float32, seed=9)
    wide = torch.randn(50, 40, device=DEVICE)
    wide[:, 3:27] = x
    strided = wide[:, 3:27]
    dy = torch.randn(50, 24, device=DEVICE)
    dprob_sum = torch.randn(4, device=DEVICE)
    runs = []
    for inp in (strided, x):
        y, prob_sum, load, saved = fused_tile_forward(inp, mask, weights, alpha_t, ramp_t, 2)
        grads = fused_tile_backward(saved, inp, mask, weights, alpha_t, ramp_t, 2, dy, dprob_sum)
        runs.append((y, prob_sum, load, *grads))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_bad_inputs_name_the_argument():
    x, mask, weights, alpha_t, ramp_t = make_problem(8, 16, 24, 16, 4, torch.float32, seed=1)
    wrong = weights._replace(expert_w2=torch.zeros(4, 24, 15, device=DEVICE))
    with pytest.raises(ValueError, match="expert_w2"):
        fused_tile_forward(x, mask, wrong, alpha_t, ramp_t, 2)
    wrong = weights._replace(dense_b1=weights.dense_b1.double())
    with pytest.raises(ValueError, match="dense_b1"):
        fused_tile_forward(x, mask, wrong, alpha_t, ramp_t, 2)
    with pytest.raises(ValueError, match="mask"):
        fused_tile_forward(x, mask[:5], weights, alpha_t, ramp_t, 2)
    with pytest.raises(ValueError, match="top_k=5"):
        fused_tile_forward(x, mask, weights, alpha_t, ramp_t, 5)
    wide_x, _, wide_weights, _, _ = make_problem(8, 72, 24, 16, 4, torch.float32, seed=1)
    with pytest.raises(ValueError, match="D=72"):                # fp32 tiles end at D = 64
        fused_tile_forward(wide_x, None, wide_weights, alpha_t, ramp_t, 2)


def test_supported_shapes():
    bf16, fp32 = torch.bfloat16, torch.float32
    assert fused_tile_supported(64, 256, 4, 64, 2, fp32)
    assert fused_tile_supported(128, 1024, 16, 256, 16, bf16)
    assert not fused_tile_supported(128, 512, 4, 128, 2, fp32)    # fp32 tiles spill past 64
    assert not fused_tile_supported(256, 1024, 4, 256, 2, bf16)   # D too wide for one tile
    assert not fused_tile_supported(64, 256, 17, 64, 2, bf16)     # E beyond the bitmask
    assert not fused_tile_supported(64, 256, 4, 64, 5, bf16)      # k > E
    assert not fused_tile_supported(64, 256, 4, 64, 2, torch.float64)


def test_fp16_router_gradients_do_not_underflow():
    """fp16, dy = 0 and an aux-loss-sized dprob_sum: the router's d logits (~1e-8, below
    fp16's smallest subnormal) reach the weight gradients, summed over 1024 tokens, at
    fp16 precision. (Rounded to fp16 unscaled they vanish: relative errors 0.1 to 0.5.)"""
    N, D, F, H, E = 1024, 16, 16, 16, 4
    x, mask, weights, alpha_t, ramp_t = make_problem(N, D, F, H, E, torch.float16, seed=3,
                                                     masked=False)
    dy = torch.zeros(N, D, device=DEVICE, dtype=torch.float16)
    dprob_sum = 2e-7 * torch.randn(E, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    _, _, _, saved = fused_tile_forward(x, mask, weights, alpha_t, ramp_t, 2)
    grads = fused_tile_backward(saved, x, mask, weights, alpha_t, ramp_t, 2, dy, dprob_sum)
    ref_grads = reference_outputs_and_grads(x, mask, weights, alpha_t, ramp_t, 2, dy,
                                            dprob_sum)[3]
    for name, grad, ref_grad in zip(GRAD_NAMES, grads, ref_grads):
        if name.startswith("router"):
            # router_w1's gradient (~6e-6) is itself an fp16 subnormal: 1e-2, not 5e-3
            assert rel_error(grad, ref_grad) < 1e-2, name


def test_weight_grad_splits_bound_the_partials():
    """At most MAX_PARTIAL_ELEMENTS fp32 partials (one split always allowed), e.g. E=16,
    D=128, F=8192: one split (32 would take 4.5 GB); every token in exactly one split."""
    block_m = 64
    for N, split_elements in ((1_000_000, 35_700_000), (1_000_000, 3_000_000), (50_000, 1000),
                              (5, 10), (1_000_000, 2 * fused_tile.MAX_PARTIAL_ELEMENTS)):
        splits, per_split = fused_tile.weight_grad_splits(N, block_m, split_elements)
        assert splits == 1 or splits * split_elements <= fused_tile.MAX_PARTIAL_ELEMENTS
        assert 1 <= splits <= fused_tile.WEIGHT_GRAD_MAX_SPLITS and per_split % block_m == 0
        assert (splits - 1) * per_split < N <= splits * per_split
    assert fused_tile.weight_grad_splits(1_000_000, block_m, 35_700_000)[0] == 1
    assert fused_tile.weight_grad_splits(1_000_000, block_m, 3_000_000)[0] == 22


def test_capped_splits_match_reference(monkeypatch):
    """Splits capped by the partials budget (9 wanted, 2 allowed) still sum to the reference."""
    D, F, H, E = 8, 12, 8, 3
    split_elements = fused_tile._grad_regions(D, F, H, E)[1]
    monkeypatch.setattr(fused_tile, "WEIGHT_GRAD_MIN_SPLIT_TOKENS", 16)
    monkeypatch.setattr(fused_tile, "MAX_PARTIAL_ELEMENTS", 2 * split_elements + 1)
    assert fused_tile.weight_grad_splits(130, 64, split_elements)[0] == 2
    check_against_reference(130, D, F, H, E, 2, torch.float32, seed=11)
