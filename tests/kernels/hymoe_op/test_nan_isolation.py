"""A token with NaN (or fp16-overflowing) inputs never changes another token's results.

The poisoned token's router logits are NaN. Before the fix, the Triton routers gave such a
token the padding expert id for every slot; the counting sort then sent those slots to row 0,
the row of expert 0's first token: on a GPU either write could win, so NaN could land in an
unrelated sequence's y, and load undercounted. The interpreter always picks the same winner,
so besides y and dx these tests check what the collision breaks there too: load counts every
slot, and (grouped path) every slot owns its row, (fused path) every token selects top_k
valid experts.

Every backend runs the same batch twice, clean and with the last token poisoned. The last
token's slots sort after every other token's, and groups stay under one padded block, so
the other tokens keep their rows and tiles: their y and dx must be bitwise equal. The
exception is torch / reference on CUDA, where an expert's batch that gains or loses the
poisoned row can make cuBLAS pick another kernel (rounding differs, no NaN leaks): there
they must be finite and within 1e-5.
"""
from __future__ import annotations

import functools

import pytest
import torch

from hymoe_kernels import hymoe_reference, hymoe_torch, hymoe_triton
from hymoe_kernels.hymoe_op.fused_tile import fused_tile_forward
from hymoe_kernels.hymoe_op.triton_backend import hymoe_forward_op
from hymoe_kernels.weights import HyMoEWeights
from kernel_cases import DEVICE, make_weights

BACKENDS = {
    "reference": hymoe_reference,
    "torch": hymoe_torch,
    "grouped": functools.partial(hymoe_triton, path="grouped"),
    "fused": functools.partial(hymoe_triton, path="fused"),
}
# tokens, width, router hidden, experts (not a power of two), FFN hidden, top_k
N, D, H, E, F, TOP_K = 20, 12, 8, 5, 16, 2
POISONED = N - 1


def make_case(case: str):
    """(weights, clean x, poisoned x): "nan" puts NaN in an fp32 token; "overflow" gives an
    fp16 token entries of +-6e4 aligned with router_w1, whose router pre-activations
    overflow to inf where they are stored in fp16, so that its logits mix +-inf and NaN
    (inf - inf)."""
    dtype = torch.float32 if case == "nan" else torch.float16
    gen = torch.Generator().manual_seed(0)
    weights = HyMoEWeights(*(w.detach()
                             for w in make_weights(D, H, E, F, dtype, generator=gen)))
    x = torch.randn(N, D, generator=gen).to(DEVICE, dtype)
    poisoned = x.clone()
    if case == "nan":
        poisoned[POISONED] = float("nan")
    else:
        poisoned[POISONED] = 6e4 * weights.router_w1.float().sum(1).sign().to(dtype)
    return weights, x, poisoned


def run(fn, x, mask, weights, with_grad):
    """(y, prob_sum, load, dx) of one call; dx of sum(y * dy) + sum(prob_sum * dprob) with
    fixed random cotangents (None without grad)."""
    x = x.detach().requires_grad_(with_grad)
    alpha_param = torch.tensor(0.3, device=DEVICE, requires_grad=with_grad)
    ramp = torch.tensor(0.8, device=DEVICE)
    y, prob_sum, load = fn(x, mask, weights, alpha_param, ramp, TOP_K)
    if not with_grad:
        return y, prob_sum, load, None
    gen = torch.Generator().manual_seed(1)
    dy = torch.randn(y.shape, generator=gen).to(DEVICE)
    dprob = torch.randn(prob_sum.shape, generator=gen).to(DEVICE)
    (dx,) = torch.autograd.grad((y.float() * dy).sum() + (prob_sum.float() * dprob).sum(), [x])
    return y.detach(), prob_sum.detach(), load, dx


def assert_unchanged(name, clean, poisoned, exact):
    if exact:
        assert torch.equal(clean, poisoned), f"{name} of another token changed"
    else:
        assert torch.isfinite(poisoned).all(), f"NaN or inf reached another token's {name}"
        torch.testing.assert_close(poisoned, clean, rtol=1e-5, atol=0, msg=name)


@pytest.mark.parametrize("case", ["nan", "overflow"])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_poisoned_token_leaves_other_tokens_unchanged(backend, case):
    weights, x, poisoned = make_case(case)
    fn = BACKENDS[backend]
    y, _, clean_load, dx = run(fn, x, None, weights, with_grad=True)
    y_bad, prob_bad, load_bad, dx_bad = run(fn, poisoned, None, weights, with_grad=True)
    assert clean_load[0] > 0, "expert 0 needs a token for a collision to be visible"
    if case == "nan":    # NaN logits on every path (overflow: on those that store fp16)
        assert not torch.isfinite(y_bad[POISONED]).any(), "the poison did not take"
        assert torch.isnan(prob_bad).all()                 # a real NaN token: NaN sum
    others = torch.arange(N, device=DEVICE) != POISONED
    exact = backend in ("grouped", "fused") or DEVICE == "cpu"
    assert_unchanged("y", y[others], y_bad[others], exact)
    assert_unchanged("dx", dx[others], dx_bad[others], exact)
    assert load_bad.sum() == N * TOP_K, "a slot was not counted"


@pytest.mark.parametrize("case", ["nan", "overflow"])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_poisoned_padding_is_left_out(backend, case):
    """A poisoned *padding* token changes nothing: prob_sum and load are over real tokens."""
    weights, x, poisoned = make_case(case)
    mask = torch.ones(N, dtype=torch.bool, device=DEVICE)
    mask[POISONED] = False
    fn = BACKENDS[backend]
    y, prob_sum, load, _ = run(fn, x, mask, weights, with_grad=False)
    y_bad, prob_bad, load_bad, _ = run(fn, poisoned, mask, weights, with_grad=False)
    assert torch.equal(prob_sum, prob_bad) and torch.equal(load, load_bad)
    others = torch.arange(N, device=DEVICE) != POISONED
    assert_unchanged("y", y[others], y_bad[others], backend in ("grouped", "fused")
                     or DEVICE == "cpu")


@pytest.mark.parametrize("case", ["nan", "overflow"])
def test_poisoned_token_routing_stays_valid(case):
    """The routings the Triton paths build: every id a valid expert, distinct within a token;
    the grouped path's slots and rows a bijection (no two slots share a row)."""
    weights, _, poisoned = make_case(case)
    alpha_param, ramp = torch.tensor(0.3, device=DEVICE), torch.tensor(0.8, device=DEVICE)
    with torch.no_grad():
        outputs = hymoe_forward_op(poisoned, None, list(weights), alpha_param, ramp, TOP_K)
        ids, row_slot, slot_row = outputs[5].long(), outputs[10].long(), outputs[11].long()
        _, _, _, (selected_bits,) = fused_tile_forward(poisoned, None, weights, alpha_param,
                                                       ramp, TOP_K)
    assert ((ids >= 0) & (ids < E)).all()
    assert (ids.sort(dim=1).values.diff(dim=1) > 0).all()
    assert torch.equal(row_slot[slot_row], torch.arange(N * TOP_K, device=DEVICE))
    bits = selected_bits.long()
    assert (bits >> E == 0).all()
    assert torch.equal(sum((bits >> e) & 1 for e in range(E)), torch.full_like(bits, TOP_K))
