"""Shared helpers of the Triton kernel tests: device, random HyMoE weights, poisoned outputs."""
from __future__ import annotations

import contextlib

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (0 when both are empty or zero)."""
    out, ref = out.double(), ref.double()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    diff = (out - ref).norm().item()
    return diff / ref.norm().item() if diff else 0.0


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
                 separated_logits: bool = False, generator=None) -> list[torch.Tensor]:
    """The 12 HyMoE weights at nn.Linear-like scale, requiring grad, on DEVICE.

    separated_logits: router_w2 tiny and router_b2 a random permutation of 0, 2, 4, ... so
    routing has no near-ties (for bf16/fp16, whose rounding would otherwise flip choices).
    """
    def u(*shape, fan):
        return (torch.rand(*shape, generator=generator) * 2 - 1) / fan ** 0.5

    router_w2, router_b2 = u(H, E, fan=H) * logit_scale, u(E, fan=H) * logit_scale
    if separated_logits:
        router_w2 = router_w2 * 0.01
        router_b2 = torch.randperm(E, generator=generator).float() * 2
    weights = [u(D, H, fan=D), u(H, fan=D), router_w2, router_b2,
               u(E, D, F, fan=D), u(E, F, fan=D), u(E, F, D, fan=F), u(E, D, fan=F),
               u(D, F, fan=D), u(F, fan=D), u(F, D, fan=F), u(D, fan=F)]
    return [w.to(device=DEVICE, dtype=dtype).requires_grad_() for w in weights]


def random_ids(N: int, E: int, top_k: int, generator=None) -> torch.Tensor:
    """(N, top_k) int32 expert ids, distinct within a row, on DEVICE."""
    return torch.rand(N, E, generator=generator).argsort(dim=1)[:, :top_k].to(
        device=DEVICE, dtype=torch.int32).contiguous()
