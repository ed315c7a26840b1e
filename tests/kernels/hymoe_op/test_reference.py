"""The pure-PyTorch reference is the spec: check it against finite differences and
against an independent dense formulation (every expert on every token, unchosen gates 0)."""
import pytest
import torch

from hymoe_kernels.hymoe_op.reference import ffn, hymoe_reference, router_logits
from hymoe_kernels.weights import HyMoEWeights


def make_weights(D, F, E, H, dtype=torch.float64, seed=0) -> HyMoEWeights:
    g = torch.Generator().manual_seed(seed)
    return HyMoEWeights(*((torch.randn(s, generator=g, dtype=dtype) * 0.5).requires_grad_()
                          for s in HyMoEWeights.shapes(D, H, E, F)))


def dense_formulation(x, mask, w, alpha_param, ramp, top_k):
    """Independent spec: run every expert on every token and zero the unchosen gates."""
    logits = router_logits(x, *w.router)
    kth = logits.topk(top_k, dim=-1).values[:, -1:]
    kept = logits.masked_fill(logits < kth, float("-inf"))
    gates = kept.softmax(-1)                                            # (N, E), zeros off top-k
    experts = torch.stack([ffn(x, *(p[e] for p in w.experts))
                           for e in range(w.expert_w1.shape[0])], 1)     # (N, E, D)
    y_moe = (gates.unsqueeze(-1) * experts).sum(1)
    y = ffn(x, *w.dense) + torch.sigmoid(alpha_param) * ramp * y_moe
    real = torch.ones(len(x), dtype=torch.bool) if mask is None else mask
    return y, (logits.softmax(-1) * real[:, None]).sum(0)


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_matches_dense_formulation(top_k):
    D, F, E, H, N = 6, 10, 4, 5, 17
    w = make_weights(D, F, E, H)
    x = torch.randn(N, D, dtype=torch.float64)
    mask = torch.rand(N) > 0.3
    alpha_param, ramp = torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.7)
    y, prob_sum, load = hymoe_reference(x, mask, w, alpha_param, ramp, top_k)
    y_ref, prob_ref = dense_formulation(x, mask, w, alpha_param, ramp, top_k)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(prob_sum, prob_ref)
    assert load.dtype == torch.int64 and int(load.sum()) == int(mask.sum()) * top_k


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_gradcheck_float64(top_k):
    D, F, E, H, N = 4, 6, 3, 5, 7
    w = make_weights(D, F, E, H, seed=top_k)
    x = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    alpha_param = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([1, 1, 0, 1, 1, 0, 1], dtype=torch.bool)
    probe = torch.randn(E, dtype=torch.float64)

    def f(x, alpha_param, *w):
        y, prob_sum, _ = hymoe_reference(x, mask, HyMoEWeights(*w), alpha_param,
                                         torch.tensor(0.6), top_k)
        return y, (prob_sum.double() * probe).sum()

    assert torch.autograd.gradcheck(f, (x, alpha_param, *w), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("fill", [float("nan"), float("inf"), -float("inf")])
def test_padding_is_selected_out_of_prob_sum_and_load(fill):
    """Non-finite values in padded tokens never reach prob_sum or load (selection, not
    multiplication by the mask): they equal those of the real tokens alone."""
    D, F, E, H, N = 6, 10, 4, 5, 13
    w = make_weights(D, F, E, H, dtype=torch.float32)
    x = torch.randn(N, D)
    mask = torch.arange(N) % 3 != 0
    x[~mask] = fill
    alpha_param, ramp = torch.tensor(0.3), torch.tensor(0.7)
    y, prob_sum, load = hymoe_reference(x, mask, w, alpha_param, ramp, 2)
    y_real, prob_real, load_real = hymoe_reference(x[mask], None, w, alpha_param, ramp, 2)
    torch.testing.assert_close(prob_sum, prob_real)
    assert torch.equal(load, load_real)
    torch.testing.assert_close(y[mask], y_real)


def test_weights_are_cast_to_the_input_dtype():
    """fp32 weights with a bf16 input: computed in bf16, the same as bf16 weights."""
    D, F, E, H = 6, 10, 4, 5
    w = make_weights(D, F, E, H, dtype=torch.float32)
    x = torch.randn(9, D, dtype=torch.bfloat16)
    alpha_param, ramp = torch.tensor(0.3), torch.tensor(0.7)
    mixed = hymoe_reference(x, None, w, alpha_param, ramp, 2)
    same = hymoe_reference(x, None, w.to(torch.bfloat16), alpha_param, ramp, 2)
    assert mixed[0].dtype == torch.bfloat16 and mixed[1].dtype == torch.float32
    for got, want in zip(mixed, same):
        assert torch.equal(got, want)
