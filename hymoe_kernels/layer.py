"""HyMoEFFN: the drop-in replacement for a transformer's position-wise FFN.

The module owns the parameters, the alpha warm-up counter, the load-balance loss and the
routing statistics; the arithmetic is delegated to a backend function with the signature
of :func:`hymoe_kernels.reference.hymoe_reference`.
"""
from __future__ import annotations

import math
import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .reference import hymoe_reference
from .torch_backend import hymoe_torch

BACKENDS = ("auto", "torch", "reference", "triton")


def resolve_backend(name: str, x: Tensor) -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
    """The HyMoE function for backend ``name`` on the device of ``x``.

    "auto" is "triton" for CUDA tensors and "torch" otherwise. "triton" runs on CUDA
    tensors, or on CPU tensors only under Triton's interpreter (TRITON_INTERPRET=1).
    """
    if name == "auto":
        name = "triton" if x.is_cuda else "torch"
    if name == "torch":
        return hymoe_torch
    if name == "reference":
        return hymoe_reference
    if name == "triton":
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"backend 'triton' needs CUDA tensors (x is on {x.device}); on the "
                             "CPU set TRITON_INTERPRET=1 before importing triton, or use "
                             "backend 'torch'")
        from .function import hymoe_triton
        return hymoe_triton
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


class HyMoEFFN(nn.Module):
    """Hybrid mixture-of-experts FFN: y = FFN_0(x) + alpha * sum_i g_i f_i(x).

    Args:
        d_model: token width D.
        d_ff: hidden width F of the dense expert and of each sparse expert.
        num_experts: number of sparse experts E.
        top_k: experts per token, 1 <= top_k <= num_experts.
        warmup_steps: T_warmup; alpha = sigmoid(alpha_param) * min(1, t / T_warmup).
        lb_weight: lambda_lb of the load-balance term sum_e gbar_e log gbar_e.
        dropout: dropout on the layer's output (training only).
        backend: "triton" (the Triton kernels), "torch" (fast PyTorch), "reference" (the
            readable spec) or "auto" ("triton" on CUDA tensors, "torch" otherwise).
        router_hidden: width of the router's hidden layer (default d_model).

    ``forward(x, mask=None)`` takes x of shape (..., d_model) and an optional bool mask of
    shape x.shape[:-1] (True = real token; padding is excluded from the router
    statistics) and returns a tensor of x's shape and dtype. After a training forward,
    ``aux_loss`` holds the load-balance term (a scalar with grad) to add to the task loss.
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int = 4, top_k: int = 2,
                 warmup_steps: int = 500, lb_weight: float = 0.02, dropout: float = 0.0,
                 backend: str = "auto", router_hidden: int | None = None):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_ff", d_ff), ("num_experts", num_experts)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be an int in 1..num_experts={num_experts}, got {top_k!r}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.d_model, self.d_ff = d_model, d_ff
        self.num_experts, self.top_k = num_experts, top_k
        self.warmup_steps, self.lb_weight = warmup_steps, lb_weight
        self.backend = backend
        hidden = router_hidden or d_model
        E, D, H = num_experts, d_model, hidden

        self.router_w1 = nn.Parameter(torch.empty(D, H))
        self.router_b1 = nn.Parameter(torch.empty(H))
        self.router_w2 = nn.Parameter(torch.empty(H, E))
        self.router_b2 = nn.Parameter(torch.empty(E))
        self.expert_w1 = nn.Parameter(torch.empty(E, D, d_ff))
        self.expert_b1 = nn.Parameter(torch.empty(E, d_ff))
        self.expert_w2 = nn.Parameter(torch.empty(E, d_ff, D))
        self.expert_b2 = nn.Parameter(torch.empty(E, D))
        self.dense_w1 = nn.Parameter(torch.empty(D, d_ff))
        self.dense_b1 = nn.Parameter(torch.empty(d_ff))
        self.dense_w2 = nn.Parameter(torch.empty(d_ff, D))
        self.dense_b2 = nn.Parameter(torch.empty(D))
        self.alpha_param = nn.Parameter(torch.zeros(()))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.dropout = nn.Dropout(dropout)
        self.aux_loss: Tensor | None = None
        self._stats: dict[str, Tensor] = {}
        self.reset_parameters()

    def reset_parameters(self, std: float | None = None) -> None:
        """Initialise every weight and bias, and alpha_param = 0.

        Default: nn.Linear's init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and
        biases. ``std``: weights ~ N(0, std) and zero biases, the init of backbones such
        as SASRec / BERT4Rec (std 0.02), so the layer starts like the dense FFN it replaces.
        """
        D, Fh, H = self.d_model, self.d_ff, self.router_w1.shape[1]
        fan_in = {"router_w1": D, "router_b1": D, "router_w2": H, "router_b2": H,
                  "expert_w1": D, "expert_b1": D, "expert_w2": Fh, "expert_b2": Fh,
                  "dense_w1": D, "dense_b1": D, "dense_w2": Fh, "dense_b2": Fh}
        with torch.no_grad():
            for name, fan in fan_in.items():
                param = getattr(self, name)
                if std is None:
                    bound = 1.0 / math.sqrt(fan)
                    param.uniform_(-bound, bound)
                elif "_w" in name:
                    param.normal_(0.0, std)
                else:
                    param.zero_()
            self.alpha_param.zero_()

    def weights(self) -> tuple[Tensor, ...]:
        """The twelve weight tensors in the order of the backend functions' signature."""
        return (self.router_w1, self.router_b1, self.router_w2, self.router_b2,
                self.expert_w1, self.expert_b1, self.expert_w2, self.expert_b2,
                self.dense_w1, self.dense_b1, self.dense_w2, self.dense_b2)

    def ramp(self) -> Tensor:
        """min(1, t / T_warmup) as a float32 0-d tensor (1 when T_warmup = 0)."""
        if self.warmup_steps == 0:
            return torch.ones((), device=self.step.device)
        return (self.step.float() / self.warmup_steps).clamp(max=1.0)

    @property
    def alpha(self) -> Tensor:
        """Current fusion weight sigmoid(alpha_param) * min(1, t / T_warmup), 0-d float32."""
        return torch.sigmoid(self.alpha_param.float()) * self.ramp()

    def set_step(self, t: int) -> None:
        """Set the warm-up step counter t (e.g. when resuming training)."""
        if t < 0:
            raise ValueError(f"step must be >= 0, got {t}")
        self.step.fill_(int(t))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if not x.is_floating_point():
            raise TypeError(f"HyMoEFFN expects a floating-point input, got dtype {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.d_model:
            raise ValueError(f"HyMoEFFN expects x of shape (..., d_model={self.d_model}), "
                             f"got {tuple(x.shape)}")
        flat_mask = None
        if mask is not None:
            if mask.shape != x.shape[:-1]:
                raise ValueError(f"mask must have shape x.shape[:-1] = {tuple(x.shape[:-1])}, "
                                 f"got {tuple(mask.shape)}")
            flat_mask = mask.reshape(-1).to(torch.bool)
        x2 = x.reshape(-1, self.d_model)
        fn = resolve_backend(self.backend, x2)
        ramp = self.ramp()
        y, prob_sum, load = fn(x2, flat_mask, *self.weights(), self.alpha_param, ramp, self.top_k)

        n_real = x2.new_tensor(x2.shape[0], dtype=torch.float32) if flat_mask is None \
            else flat_mask.sum().float()
        gbar = prob_sum / n_real.clamp(min=1.0)
        if self.training:
            self.aux_loss = self.lb_weight * (gbar * gbar.clamp(min=1e-9).log()).sum()
            self.step.add_(1)
        alpha = torch.sigmoid(self.alpha_param.detach().float()) * ramp
        self._stats = {"alpha": alpha, "gbar": gbar.detach(),
                       "load": load.float() / load.sum().clamp(min=1)}
        return self.dropout(y).to(x.dtype).reshape(x.shape)

    @torch.no_grad()
    def stats(self) -> dict[str, float | list[float]]:
        """Routing statistics of the last forward: alpha (float), gbar (E,) mean router
        probabilities over real tokens, load (E,) fraction of real token slots per expert."""
        if not self._stats:
            return {"alpha": float(self.alpha), "gbar": [], "load": []}
        return {k: (float(v) if v.dim() == 0 else v.cpu().tolist()) for k, v in self._stats.items()}

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_ff={self.d_ff}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, warmup_steps={self.warmup_steps}, "
                f"lb_weight={self.lb_weight}, backend={self.backend!r}")
