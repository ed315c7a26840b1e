"""The fast torch backend computes the same function as the reference, forward and backward."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hymoe_kernels import HyMoEFFN, HyMoEWeights, hymoe_reference
from hymoe_kernels.backend import Backend, resolve
from hymoe_kernels.hymoe_op import torch_backend
from hymoe_kernels.hymoe_op.torch_backend import expert_ffn, hymoe_torch
from hymoe_kernels.layer import hymoe_function

PARAM_NAMES = (*HyMoEWeights._fields, "alpha_param")


def make_params(d_model, d_ff, num_experts, router_hidden, seed, dtype=torch.float32):
    """The 12 weights and alpha_param by name, as leaf tensors needing grad (nn.Linear-like
    init)."""
    gen = torch.Generator().manual_seed(seed)
    sizes = (d_model, router_hidden, num_experts, d_ff)
    params = {name: ((torch.rand(shape, generator=gen, dtype=dtype) * 2 - 1) / fan ** 0.5)
              for name, shape, fan in zip(HyMoEWeights._fields, HyMoEWeights.shapes(*sizes),
                                          HyMoEWeights.fan_in(*sizes))}
    params["alpha_param"] = torch.randn((), generator=gen, dtype=dtype)
    return {name: p.requires_grad_(True) for name, p in params.items()}


def weights_of(params: dict) -> HyMoEWeights:
    """The HyMoEWeights among ``params`` (of make_params)."""
    return HyMoEWeights(*(params[name] for name in HyMoEWeights._fields))


def run(fn, x, mask, params, ramp, top_k, seed=1, autocast=False):
    """Forward and backward of a random linear functional of (y, prob_sum); returns
    y, prob_sum, load and the gradients of x and of every parameter (as float32)."""
    x = x.detach().requires_grad_(True)
    for p in params.values():
        p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y, prob_sum, load = fn(x, mask, weights_of(params), params["alpha_param"], ramp, top_k)
    gen = torch.Generator().manual_seed(seed)
    y_seed = torch.randn(y.shape, generator=gen)
    prob_seed = torch.randn(prob_sum.shape, generator=gen)
    ((y.float() * y_seed).sum() + (prob_sum * prob_seed).sum()).backward()
    grads = {"x": x.grad}
    grads.update({n: params[n].grad for n in PARAM_NAMES})
    out = {"y": y.detach().float(), "prob_sum": prob_sum.detach(), "load": load}
    out.update({f"grad_{n}": (g if g is not None else torch.zeros_like(params.get(n, x))).float()
                for n, g in grads.items()})
    return out


def assert_same(ref: dict, fast: dict, rel: float, truth: dict | None = None) -> None:
    """Every tensor of ``fast`` equal to ``ref`` within ``rel`` relative to that tensor's
    largest reference entry. With ``truth`` (the reference in float64) fast is compared with
    truth instead, also allowed twice the reference's own largest error in that tensor: a
    sum whose terms cancel (alpha_param's gradient) is rounded far beyond ``rel`` of its
    value in fp32 by the reference too."""
    assert torch.equal(ref["load"], fast["load"]), (ref["load"], fast["load"])
    for name, want in ref.items():
        if name == "load":
            continue
        got = fast[name]
        assert got.shape == want.shape, name
        scale = want.abs().max().item() if want.numel() else 0.0
        atol = rel * max(scale, 1e-6)
        if truth is not None and want.numel():
            atol += 2 * (want - truth[name]).abs().max().item()
            want = truth[name]
        torch.testing.assert_close(got, want, rtol=rel, atol=atol,
                                   msg=lambda m, n=name: f"{n}: {m}")


def run_float64(x, mask, params, ramp, top_k) -> dict:
    """``run`` of the reference in float64, cast back to float32 (the truth fp32 results are
    measured against)."""
    params64 = {n: p.detach().double().requires_grad_(True) for n, p in params.items()}
    out = run(hymoe_reference, x.double(), mask, params64, ramp.double(), top_k)
    return {n: t.float() if t.is_floating_point() else t for n, t in out.items()}


def make_mask(kind: str, num_tokens: int, gen: torch.Generator):
    if kind == "none":
        return None
    if kind == "random":
        return torch.rand(num_tokens, generator=gen) > 0.4
    return torch.zeros(num_tokens, dtype=torch.bool)       # every token is padding


@st.composite
def problems(draw):
    num_experts = draw(st.integers(1, 5))
    return dict(num_tokens=draw(st.integers(0, 40)), d_model=draw(st.integers(1, 12)),
                d_ff=draw(st.integers(1, 12)), router_hidden=draw(st.integers(1, 8)),
                num_experts=num_experts, top_k=draw(st.integers(1, num_experts)),
                mask=draw(st.sampled_from(["none", "random", "all_padding"])),
                ramp=draw(st.sampled_from([0.0, 0.37, 1.0])), seed=draw(st.integers(0, 2**16)))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(problems())
def test_matches_reference_fp32(problem):
    gen = torch.Generator().manual_seed(problem["seed"])
    params = make_params(problem["d_model"], problem["d_ff"], problem["num_experts"],
                         problem["router_hidden"], problem["seed"])
    x = torch.randn(problem["num_tokens"], problem["d_model"], generator=gen)
    mask = make_mask(problem["mask"], problem["num_tokens"], gen)
    ramp = torch.tensor(problem["ramp"])
    ref = run(hymoe_reference, x, mask, params, ramp, problem["top_k"])
    fast = run(hymoe_torch, x, mask, params, ramp, problem["top_k"])
    truth = run_float64(x, mask, params, ramp, problem["top_k"])
    assert torch.equal(truth["load"], ref["load"]), "fp32 and float64 route differently"
    assert_same(ref, fast, rel=1e-5, truth=truth)


@pytest.mark.parametrize("num_tokens, num_experts, top_k", [
    (0, 4, 2),      # no tokens at all
    (1, 4, 2),      # one token
    (9, 1, 1),      # a single expert
    (9, 3, 3),      # k = E: every expert sees every token
    (7, 6, 1),      # more experts than slots can fill
])
def test_edge_shapes(num_tokens, num_experts, top_k):
    params = make_params(6, 10, num_experts, 5, seed=num_tokens + num_experts)
    x = torch.randn(num_tokens, 6, generator=torch.Generator().manual_seed(3))
    mask = torch.arange(num_tokens) % 3 != 1
    ref = run(hymoe_reference, x, mask, params, torch.tensor(0.8), top_k)
    fast = run(hymoe_torch, x, mask, params, torch.tensor(0.8), top_k)
    assert_same(ref, fast, rel=1e-5, truth=run_float64(x, mask, params, torch.tensor(0.8), top_k))


def test_experts_without_tokens_get_zero_gradients():
    params = make_params(8, 16, 4, 8, seed=5)
    with torch.no_grad():                    # experts 2 and 3 never win a top-2 slot
        params["router_b2"].copy_(torch.tensor([3.0, 3.0, -3.0, -3.0]))
    x = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    ref = run(hymoe_reference, x, None, params, torch.tensor(1.0), 2)
    fast = run(hymoe_torch, x, None, params, torch.tensor(1.0), 2)
    assert fast["load"].tolist() == [12, 12, 0, 0]
    assert_same(ref, fast, rel=1e-5)
    for name in ("grad_expert_w1", "grad_expert_b1", "grad_expert_w2", "grad_expert_b2"):
        assert fast[name][2:].abs().max() == 0
        assert fast[name][:2].abs().max() > 0


def well_routed_tokens(x, params, top_k, margin):
    """Rows of x whose fp32 router logits separate the k-th and (k+1)-th expert by at least
    ``margin``, tiled back to x's length, so bf16 rounding cannot change the routing."""
    with torch.no_grad():
        hidden = torch.nn.functional.gelu(x @ params["router_w1"] + params["router_b1"])
        logits = hidden @ params["router_w2"] + params["router_b2"]
        ranked = logits.sort(dim=-1, descending=True).values
    keep = (ranked[:, top_k - 1] - ranked[:, top_k]) >= margin
    assert keep.any(), "no token has a clear routing; change the seed"
    good = x[keep]
    return good.repeat(-(-x.shape[0] // good.shape[0]), 1)[: x.shape[0]]


@pytest.mark.parametrize("mask_kind", ["none", "random"])
def test_matches_reference_bf16_autocast(mask_kind):
    params = make_params(16, 32, 4, 16, seed=11)
    gen = torch.Generator().manual_seed(2)
    x = well_routed_tokens(torch.randn(64, 16, generator=gen), params, 2, margin=0.05)
    mask = make_mask(mask_kind, 64, gen)
    ref = run(hymoe_reference, x, mask, params, torch.tensor(1.0), 2, autocast=True)
    fast = run(hymoe_torch, x, mask, params, torch.tensor(1.0), 2, autocast=True)
    assert_same(ref, fast, rel=3e-2)


def test_layer_torch_backend_matches_reference_backend():
    assert hymoe_function(resolve("torch", torch.zeros(1, 4))) is hymoe_torch
    assert hymoe_function(resolve("reference", torch.zeros(1, 4))) is hymoe_reference
    assert resolve("auto", torch.zeros(1, 4)) is Backend.TORCH
    torch.manual_seed(0)
    fast = HyMoEFFN(8, 16, backend="torch")
    ref = HyMoEFFN(8, 16, backend="reference")
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(3, 5, 8)
    mask = torch.rand(3, 5) > 0.3
    outs = []
    for layer in (ref, fast):
        layer.set_step(250)
        y = layer(x, mask)
        (y.square().sum() + layer.aux_loss).backward()
        outs.append((y, layer.aux_loss, [p.grad for p in layer.parameters()]))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-5, atol=1e-8)
    for got, want in zip(outs[1][2], outs[0][2]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fill", [float("nan"), float("inf")])
def test_non_finite_padding_is_selected_out_like_the_reference(fill):
    """prob_sum and load never see padded tokens' values (selection by the mask), as in the
    reference; real rows' outputs are those of the real tokens alone."""
    params = make_params(6, 10, 4, 5, seed=2)
    x = torch.randn(14, 6, generator=torch.Generator().manual_seed(6))
    mask = torch.arange(14) % 3 != 0
    x[~mask] = fill
    args = (weights_of(params), params["alpha_param"], torch.tensor(0.6), 2)
    with torch.no_grad():
        y, prob_sum, load = hymoe_torch(x, mask, *args)
        y_real, prob_real, load_real = hymoe_torch(x[mask], None, *args)
        _, prob_ref, load_ref = hymoe_reference(x, mask, *args)
    assert torch.isfinite(prob_sum).all() and torch.equal(load, load_real)
    torch.testing.assert_close(prob_sum, prob_real)
    torch.testing.assert_close(prob_sum, prob_ref)
    assert torch.equal(load, load_ref)
    torch.testing.assert_close(y[mask], y_real)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weights_are_cast_to_the_input_dtype(dtype):
    """fp32 weights with a half input compute in that dtype: the same outputs and input
    gradient as half weights (as hymoe_triton and under autocast)."""
    params = make_params(6, 10, 4, 5, seed=3)
    x = torch.randn(11, 6, generator=torch.Generator().manual_seed(7)).to(dtype)
    mask = torch.arange(11) % 4 != 0
    half = {n: p.detach().to(dtype).requires_grad_() for n, p in params.items()}
    half["alpha_param"] = params["alpha_param"]
    mixed, same = (run(hymoe_torch, x, mask, p, torch.tensor(0.6), 2) for p in (params, half))
    for name, want in same.items():
        assert torch.equal(mixed[name], want), name
    assert params["dense_w1"].grad.dtype == torch.float32


def test_expert_ffn_op_registration():
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(7, 3, generator=gen, requires_grad=True)
    w1, b1 = torch.randn(3, 3, 5, generator=gen), torch.randn(3, 5, generator=gen)
    w2, b2 = torch.randn(3, 5, 3, generator=gen), torch.randn(3, 3, generator=gen)
    ends = torch.tensor([2, 2, 7])                        # expert 1 has no rows
    for weight in (w1, b1, w2, b2):
        weight.requires_grad_(True)
    torch.library.opcheck(expert_ffn, (rows, w1, b1, w2, b2, ends, True))
    inference_args = [t.detach() for t in (rows, w1, b1, w2, b2, ends)]
    torch.library.opcheck(expert_ffn, (*inference_args, False))
    out, hidden = expert_ffn(rows, w1, b1, w2, b2, ends, True)
    with pytest.raises(RuntimeError, match="save_hidden=False"):
        expert_ffn(*inference_args[:1], w1, *inference_args[2:], False)[0].sum().backward()
    ffn = lambda r, e: torch.nn.functional.gelu(r @ w1[e] + b1[e]) @ w2[e] + b2[e]
    torch.testing.assert_close(out, torch.cat([ffn(rows[:2], 0), ffn(rows[2:], 2)]))
    torch.testing.assert_close(hidden[2:], rows[2:] @ w1[2] + b1[2])


@pytest.mark.parametrize("chunk_bytes", [1, 200])
def test_chunked_experts_match_reference(monkeypatch, chunk_bytes):
    """Expert slices split into many chunks (1 row, or a few rows) give the same result."""
    monkeypatch.setattr(torch_backend, "_CHUNK_BYTES", chunk_bytes)
    params = make_params(6, 12, 3, 5, seed=8)
    x = torch.randn(25, 6, generator=torch.Generator().manual_seed(4))
    mask = torch.arange(25) % 5 != 0
    ref = run(hymoe_reference, x, mask, params, torch.tensor(0.9), 2)
    fast = run(hymoe_torch, x, mask, params, torch.tensor(0.9), 2)
    assert_same(ref, fast, rel=1e-5)
    with torch.no_grad():                                  # inference path: no saved hidden
        y_eval = hymoe_torch(x, mask, weights_of(params), params["alpha_param"],
                             torch.tensor(0.9), 2)[0]
    torch.testing.assert_close(y_eval, ref["y"], rtol=1e-5, atol=1e-6)


def test_fullgraph_compile_matches_eager():
    params = make_params(8, 16, 4, 8, seed=4)
    x = torch.randn(30, 8, generator=torch.Generator().manual_seed(1))
    mask = torch.arange(30) % 4 != 0
    compiled = torch.compile(hymoe_torch, fullgraph=True)
    eager = run(hymoe_torch, x, mask, params, torch.tensor(0.5), 2)
    fast = run(compiled, x, mask, params, torch.tensor(0.5), 2)
    assert_same(eager, fast, rel=1e-5)
