"""Router top-k kernel and its backward (hymoe_op/stage1_router.py) against PyTorch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from hymoe_kernels.hymoe_op.stage1_router import (ROUTER_BACKWARD_CONFIGS, ROUTER_CONFIGS,
                                                 router_backward, router_topk)
from kernel_cases import DEVICE, TOL, near_tie_tokens, poisoned_outputs, rel_err


def torch_routing(logits: torch.Tensor, mask: torch.Tensor, top_k: int):
    """gates, prob_sum of float32 logits, as in hymoe_reference."""
    top_logits, top_ids = logits.topk(top_k, dim=-1)
    prob_sum = (logits.softmax(-1) * mask[:, None]).sum(0)
    return top_logits.softmax(-1), top_ids, prob_sum


def random_mask(N, masked, gen):
    return (torch.rand(N, generator=gen) > 0.3).to(DEVICE) if masked else None


@pytest.mark.parametrize("config", ROUTER_CONFIGS)
@settings(max_examples=6, deadline=None)
@given(N=st.integers(0, 40), H=st.integers(1, 40), E=st.integers(1, 16), k_frac=st.floats(0, 1),
       masked=st.booleans(), seed=st.integers(0, 2 ** 31))
def test_router_forward(config, N, H, E, k_frac, masked, seed):
    top_k = 1 + int(k_frac * (E - 1))
    gen = torch.Generator().manual_seed(seed)
    h_pre = torch.randn(N, H, generator=gen).to(DEVICE)
    w2 = torch.randn(H, E, generator=gen).to(DEVICE) / H ** 0.5
    b2 = torch.randn(E, generator=gen).to(DEVICE)
    mask = random_mask(N, masked, gen)
    with poisoned_outputs():
        logits, ids, gates, prob_sum, load = router_topk(h_pre, w2, b2, mask, top_k, config=config)
    logits_ref = F.gelu(h_pre) @ w2 + b2
    real = torch.ones(N, dtype=torch.bool, device=DEVICE) if mask is None else mask
    gates_ref, ids_ref, prob_ref = torch_routing(logits_ref, real, top_k)
    assert rel_err(logits, logits_ref) < 1e-5
    # near-ties may be broken otherwise on a GPU (another fp32 summation order): compare
    # those tokens' choice with the kernel's own logits, the others' with the reference
    tie = near_tie_tokens(logits_ref, top_k)
    assert torch.equal(ids.long()[~tie], ids_ref[~tie])
    assert rel_err(gates[~tie], gates_ref[~tie]) < 1e-5
    assert torch.equal(logits.gather(1, ids.long())[tie], logits.topk(top_k).values[tie])
    assert rel_err(prob_sum, prob_ref) < 1e-5
    assert torch.equal(load, torch.bincount(ids.long()[real].flatten(), minlength=E))


def test_router_nan_logits_rank_below_every_number():
    """NaN logits (an expert's column, a whole token) never give an invalid or repeated id:
    NaN ranks last, a token with nothing but NaN takes the lowest experts; its gates are NaN,
    the other tokens' unchanged."""
    gen = torch.Generator().manual_seed(2)
    h_pre = torch.randn(6, 8, generator=gen).to(DEVICE)
    w2 = torch.randn(8, 5, generator=gen).to(DEVICE) / 8 ** 0.5
    b2 = torch.randn(5, generator=gen).to(DEVICE)
    w2_nan = w2.clone()
    w2_nan[:, 2] = float("nan")
    logits, ids, gates, prob_sum, load = router_topk(h_pre, w2_nan, b2, None, 2)
    expected = (F.gelu(h_pre) @ w2 + b2).index_fill(1, torch.tensor([2], device=DEVICE),
                                                    float("-inf")).topk(2)
    assert torch.equal(ids.long(), expected.indices) and torch.isfinite(gates).all()
    assert torch.isnan(prob_sum).all() and load.sum() == 12
    ids_all = router_topk(h_pre, w2_nan, b2, None, 5)[1]
    assert (ids_all[:, -1] == 2).all()                     # the NaN expert comes last

    h_nan = h_pre.clone()
    h_nan[3] = float("nan")
    _, clean_ids, clean_gates, _, _ = router_topk(h_pre, w2, b2, None, 3)
    _, ids, gates, _, load = router_topk(h_nan, w2, b2, None, 3)
    assert ids[3].tolist() == [0, 1, 2] and torch.isnan(gates[3]).all() and load.sum() == 18
    others = torch.arange(6, device=DEVICE) != 3
    assert torch.equal(ids[others], clean_ids[others])
    assert torch.equal(gates[others], clean_gates[others])


def test_router_forward_bf16_ties_to_lower_index():
    # equal logits for experts 1 and 3 (bias only): the lower index wins
    h_pre = torch.randn(5, 8).to(DEVICE, torch.bfloat16)
    w2 = torch.zeros(8, 4, device=DEVICE, dtype=torch.bfloat16)
    b2 = torch.tensor([0.0, 1.0, -1.0, 1.0], device=DEVICE, dtype=torch.bfloat16)
    logits, ids, gates, prob_sum, load = router_topk(h_pre, w2, b2, None, 1)
    assert (ids == 1).all() and torch.equal(load.cpu(), torch.tensor([0, 5, 0, 0]))
    assert rel_err(prob_sum, 5 * torch.tensor([0.0, 1.0, -1.0, 1.0]).softmax(0).to(DEVICE)) < 1e-6


@pytest.mark.parametrize("config", ROUTER_BACKWARD_CONFIGS)
@settings(max_examples=6, deadline=None)
@given(N=st.integers(0, 40), E=st.integers(1, 16), k_frac=st.floats(0, 1),
       masked=st.booleans(), seed=st.integers(0, 2 ** 31))
def test_router_backward(config, N, E, k_frac, masked, seed):
    top_k = 1 + int(k_frac * (E - 1))
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, E, generator=gen).to(DEVICE).requires_grad_()
    mask = random_mask(N, masked, gen)
    real = torch.ones(N, dtype=torch.bool, device=DEVICE) if mask is None else mask
    gates, ids, prob_sum = torch_routing(logits, real, top_k)
    dgates = torch.randn(N, top_k, generator=gen).to(DEVICE)
    dprob = torch.randn(E, generator=gen).to(DEVICE)
    (dlogits_ref,) = torch.autograd.grad((gates * dgates).sum() + (prob_sum * dprob).sum(), logits)
    with poisoned_outputs():
        dlogits = router_backward(logits.detach(), ids.to(torch.int32).contiguous(),
                                  gates.detach().contiguous(), dgates, dprob, mask, config=config)
    assert rel_err(dlogits, dlogits_ref) < TOL[torch.float32]


def test_near_tie_tokens():
    logits = torch.tensor([[1.0, 1.0 + 1e-7, 0.0],     # top-1 tie
                           [3.0, 1.0, 0.0],             # clear
                           [2.0, 1.0, 1.0 + 1e-7]])     # tie for the 2nd place (top_k = 2)
    assert near_tie_tokens(logits, 1).tolist() == [True, False, False]
    assert near_tie_tokens(logits, 2).tolist() == [True, False, True]
    assert near_tie_tokens(logits[:0], 2).shape == (0,)
