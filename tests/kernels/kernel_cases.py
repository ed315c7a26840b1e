"""Shared helpers of the Triton kernel tests: device, random HyMoE weights, poisoned outputs,
and the routing near-ties a GPU may break differently from the reference."""
from __future__ import annotations

import contextlib

import torch

from hymoe_kernels.weights import HyMoEWeights

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
# Logits closer than this (relative to 1 + the token's largest |logit|) are a near-tie: the
# interpreter multiplies exactly, but on a GPU the kernels' fp32 dots (tf32x3, ~1e-6
# relative; or another summation order) may rank them differently from a float64 reference.
NEAR_TIE_RTOL = 1e-5


def rel_err(out: torch.Tensor, ref: torch.Tensor, magnitude: torch.Tensor | None = None) -> float:
    """||out - ref|| / ||magnitude|| in float64, magnitude defaulting to ref (0 when both are
    empty or zero). For a sum whose terms may cancel, pass the sum of the terms' magnitudes."""
    out, ref = out.double(), ref.double()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    diff = (out - ref).norm().item()
    scale = ref if magnitude is None else magnitude.double()
    return diff / scale.norm().item() if diff else 0.0


@contextlib.contextmanager
def poisoned_outputs():
    """Make torch.empty / empty_like return NaN (floats) or -2**30 (ints) filled tensors, so
    that an output element a kernel fails to write, or garbage it reads, shows up."""
    real_empty, real_empty_like = torch.empty, torch.empty_like
    # torch.compile fills its table of torch functions on first use; fill it now, so the
    # stand-ins below never enter it (else later compiles treat torch.empty_like as unknown)
    from torch._dynamo.trace_rules import get_torch_obj_rule_map
    get_torch_obj_rule_map()

    def poison(t):
        return t.fill_(float("nan") if t.is_floating_point() else -(2 ** 30)) if t.numel() else t

    torch.empty = lambda *a, **k: poison(real_empty(*a, **k))
    torch.empty_like = lambda *a, **k: poison(real_empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like


def make_weights(D: int, H: int, E: int, F: int, dtype=torch.float32, logit_scale: float = 1.0,
                 separated_logits: bool = False, generator=None) -> HyMoEWeights:
    """The 12 HyMoE weights at nn.Linear-like scale, requiring grad, on DEVICE.

    separated_logits: router_w2 tiny and router_b2 a random permutation of 0, 2, 4, ... so
    routing has no near-ties (for bf16/fp16, whose rounding would otherwise flip choices).
    """
    shapes, fan_in = HyMoEWeights.shapes(D, H, E, F), HyMoEWeights.fan_in(D, H, E, F)

    def u(name):
        shape, fan = getattr(shapes, name), getattr(fan_in, name)
        return (torch.rand(*shape, generator=generator) * 2 - 1) / fan ** 0.5

    # the router's output layer is drawn first (the order the tests' seeds were chosen in)
    router_w2, router_b2 = u("router_w2") * logit_scale, u("router_b2") * logit_scale
    if separated_logits:
        router_w2 = router_w2 * 0.01
        router_b2 = torch.randperm(E, generator=generator).float() * 2
    drawn = {"router_w2": router_w2, "router_b2": router_b2}
    weights = HyMoEWeights(*(drawn[name] if name in drawn else u(name)
                             for name in HyMoEWeights._fields))
    return HyMoEWeights(*(w.to(device=DEVICE, dtype=dtype).requires_grad_() for w in weights))


def random_ids(N: int, E: int, top_k: int, generator=None) -> torch.Tensor:
    """(N, top_k) int32 expert ids, distinct within a row, on DEVICE."""
    return torch.rand(N, E, generator=generator).argsort(dim=1)[:, :top_k].to(
        device=DEVICE, dtype=torch.int32).contiguous()


def near_tie_tokens(logits: torch.Tensor, top_k: int, rtol: float = NEAR_TIE_RTOL) -> torch.Tensor:
    """(N,) bool: tokens of ``logits`` (N, E) whose top min(top_k + 1, E) logits hold two
    within ``rtol * (1 + max |logit|)`` of each other, so that the chosen experts (or their
    order) may differ between two correct evaluations."""
    if logits.shape[0] == 0 or logits.shape[1] < 2:
        return torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    top = logits.topk(min(top_k + 1, logits.shape[1]), dim=1).values
    scale = 1 + logits.abs().amax(dim=1, keepdim=True)
    return ((top[:, :-1] - top[:, 1:]) <= rtol * scale).any(dim=1)


def routing_robust_rows(x: torch.Tensor, weights: HyMoEWeights, top_k: int) -> torch.Tensor:
    """(N,) bool: the tokens of x (N, D) that are not near-ties (:func:`near_tie_tokens`)
    of the router logits in float64; tests drop the others before comparing a layer with the
    reference."""
    from hymoe_kernels.hymoe_op.reference import router_logits
    with torch.no_grad():
        logits = router_logits(x.double(), *(w.double() for w in weights.router))
    return ~near_tie_tokens(logits, top_k)
