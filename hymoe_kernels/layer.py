"""HyMoEFFN: the drop-in replacement for a transformer's position-wise FFN.

The module owns the parameters, the alpha warm-up counter, the load-balance loss and the
routing statistics; the arithmetic is delegated to a backend function with the signature
of :func:`hymoe_kernels.hymoe_op.reference.hymoe_reference`.
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backend import BACKENDS, Backend, resolve
from .config import HYMOE_DEFAULTS
from .hymoe_op.reference import hymoe_reference
from .hymoe_op.torch_backend import hymoe_torch
from .weights import KERNEL_DTYPES, HyMoEWeights

EXPERT_INITS = ("copy", "drop", "random")


def check_gelu(activation) -> None:
    """Raise ValueError naming ``activation`` unless it is exact (erf) GELU, the kernels'
    activation: "gelu", F.gelu or nn.GELU(approximate="none")."""
    if activation == "gelu" or activation is F.gelu or (
            isinstance(activation, nn.GELU) and activation.approximate == "none"):
        return
    name = activation if isinstance(activation, str) else (
        getattr(activation, "__name__", None) or repr(activation))
    raise ValueError(f"activation {name} is not exact GELU: HyMoE's experts and dense FFN use "
                     "exact (erf) GELU, so a dense FFN with another activation cannot be "
                     "converted without changing its function")


def hymoe_function(backend: Backend) -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
    """The HyMoE function (the signature of
    :func:`hymoe_kernels.hymoe_op.reference.hymoe_reference`) of a resolved backend
    (:func:`hymoe_kernels.backend.resolve`: not AUTO)."""
    if backend is Backend.TRITON:
        from .hymoe_op.triton_backend import hymoe_triton
        return hymoe_triton
    return {Backend.TORCH: hymoe_torch, Backend.REFERENCE: hymoe_reference}[backend]


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
            readable spec) or "auto" ("triton" on CUDA tensors of the kernels' dtypes, fp32 /
            bf16 / fp16; "torch" otherwise, float64 included).
        router_hidden: width of the router's hidden layer (default d_model).

    The defaults of num_experts, top_k, warmup_steps and lb_weight are
    :data:`hymoe_kernels.config.HYMOE_DEFAULTS`'s.

    ``forward(x, mask=None)`` takes x of shape (..., d_model) and an optional bool mask of
    shape x.shape[:-1] (True = real token) and returns a tensor of x's shape and dtype.
    Padded tokens are replaced by zeros (a selection, not a product) before anything is
    computed, so whatever they hold, NaN or inf included, never reaches the real tokens'
    outputs, the router statistics, ``aux_loss`` or any gradient; a padded token's output
    is that of a zero token. The layer computes in x's dtype whatever its parameters'
    (an fp32 layer given bf16 input computes in bf16, as under autocast; gradients reach
    the fp32 parameters through the cast), with the routing math in x's precision and in
    at least float32. After a training forward, ``aux_loss`` holds the load-balance term
    (a scalar with grad) to add to the task loss. The layer can be deep-copied and pickled
    at any point (EMA, SWA, keep-the-best-model code); a copy holds no ``aux_loss`` (None)
    until its own training forward.

    :meth:`from_dense` builds the layer around a trained dense FFN (sparse upcycling).
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int = HYMOE_DEFAULTS.num_experts,
                 top_k: int = HYMOE_DEFAULTS.top_k, warmup_steps: int = HYMOE_DEFAULTS.warmup_steps,
                 lb_weight: float = HYMOE_DEFAULTS.lb_weight, dropout: float = 0.0,
                 backend: str = "auto", router_hidden: int | None = None):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_ff", d_ff), ("num_experts", num_experts)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be an int in 1..num_experts={num_experts}, got {top_k!r}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps!r}")
        if not (isinstance(lb_weight, numbers.Real) and math.isfinite(lb_weight)
                and lb_weight >= 0):
            raise ValueError(f"lb_weight must be a finite number >= 0, got {lb_weight!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.d_model, self.d_ff = d_model, d_ff
        self.num_experts, self.top_k = num_experts, top_k
        self.warmup_steps, self.lb_weight = warmup_steps, lb_weight
        self.backend = backend
        shapes = HyMoEWeights.shapes(d_model, router_hidden or d_model, num_experts, d_ff)
        for name, shape in zip(HyMoEWeights._fields, shapes):     # router_w1 ... dense_b2
            self.register_parameter(name, nn.Parameter(torch.empty(shape)))
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
        weights = self.weights()
        fan_in = HyMoEWeights.fan_in(*weights.sizes())
        with torch.no_grad():
            for name, param, fan in zip(weights._fields, weights, fan_in):
                if std is None:
                    bound = 1.0 / math.sqrt(fan)
                    param.uniform_(-bound, bound)
                elif "_w" in name:
                    param.normal_(0.0, std)
                else:
                    param.zero_()
            self.alpha_param.zero_()

    @classmethod
    def from_dense(cls, up: nn.Linear, down: nn.Linear, *, activation="gelu",
                   num_experts: int = HYMOE_DEFAULTS.num_experts,
                   top_k: int = HYMOE_DEFAULTS.top_k,
                   expert_init: str = HYMOE_DEFAULTS.expert_init,
                   drop_ratio: float = HYMOE_DEFAULTS.drop_ratio,
                   noise_std: float = HYMOE_DEFAULTS.noise_std,
                   router_std: float = HYMOE_DEFAULTS.router_std,
                   warmup_steps: int = HYMOE_DEFAULTS.warmup_steps,
                   lb_weight: float = HYMOE_DEFAULTS.lb_weight, dropout: float = 0.0,
                   backend: str = "auto", router_hidden: int | None = None) -> "HyMoEFFN":
        """A HyMoE layer whose dense expert is the trained FFN ``down(act(up(x)))``.

        ``up`` is nn.Linear(D, F) and ``down`` nn.Linear(F, D) (biases optional, zero when
        absent), of one dtype and device, which the layer takes; ``activation`` the FFN's
        activation, which must be exact GELU ("gelu", F.gelu or nn.GELU()): anything else
        is a ValueError naming it. The dense expert gets their weights exactly (transposed
        to the layer's (in, out) layout). Each sparse expert starts as
        ``expert_init``:

        * "copy": a copy of the dense FFN (sparse upcycling), plus N(0, noise_std) noise on
          its weights when ``noise_std`` > 0;
        * "drop": a copy whose hidden units are re-initialised at a fraction ``drop_ratio``
          of them, a different random subset per expert (Drop-Upcycling, Nakamura et al.,
          ICLR 2025): the chosen columns of W1, entries of b1 and rows of W2 are drawn
          from N(mean, std) of the dense tensor they come from; then noise as for "copy";
        * "random": every hidden unit re-initialised that way ("drop" with ratio 1).

        The router's first layer keeps nn.Linear's init, its output layer is
        N(0, router_std) with zero bias (near-uniform routing), alpha_param is 0 and the
        step counter 0. As alpha = sigmoid(alpha_param) * min(1, t / warmup_steps) is 0 at
        t = 0, the layer's output then equals the dense FFN's up to the rounding of the
        same GEMMs, on every backend, and training adds the experts as alpha warms up; so
        ``warmup_steps`` must be >= 1. Random draws use torch's global RNG.
        The other arguments are the constructor's; ``dropout`` is applied to the output.
        Defaults not given here are :data:`hymoe_kernels.config.HYMOE_DEFAULTS`'s.
        """
        for name, linear in (("up", up), ("down", down)):
            if not isinstance(linear, nn.Linear):
                raise TypeError(f"{name} must be an nn.Linear, got {type(linear).__name__}")
        d_model, d_ff = up.in_features, up.out_features
        if (down.in_features, down.out_features) != (d_ff, d_model):
            raise ValueError(f"up is Linear({d_model}, {d_ff}), so down must be Linear({d_ff}, "
                             f"{d_model}), got Linear({down.in_features}, {down.out_features})")
        ref = up.weight
        if (down.weight.dtype, down.weight.device) != (ref.dtype, ref.device):
            raise ValueError(f"up is {ref.dtype} on {ref.device}, down {down.weight.dtype} on "
                             f"{down.weight.device}: they must match")
        check_gelu(activation)
        if expert_init not in EXPERT_INITS:
            raise ValueError(f"expert_init must be one of {EXPERT_INITS}, got {expert_init!r}")
        for name, value in (("drop_ratio", drop_ratio), ("noise_std", noise_std),
                            ("router_std", router_std)):
            if not (isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if drop_ratio > 1:
            raise ValueError(f"drop_ratio must be in [0, 1], got {drop_ratio!r}")
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps must be >= 1 for from_dense (alpha must start at 0 "
                             f"so that the layer starts as the dense FFN), got {warmup_steps!r}")
        layer = cls(d_model, d_ff, num_experts, top_k, warmup_steps, lb_weight, dropout,
                    backend, router_hidden).to(device=ref.device, dtype=ref.dtype)

        def bias(linear: nn.Linear, size: int) -> Tensor:
            return linear.bias if linear.bias is not None else ref.new_zeros(size)

        dense = (up.weight.t(), bias(up, d_ff), down.weight.t(), bias(down, d_model))
        ratio = {"copy": 0.0, "drop": drop_ratio, "random": 1.0}[expert_init]
        n_drop = round(ratio * d_ff)
        weights = layer.weights()
        experts = weights.experts
        with torch.no_grad():
            for param, value in zip(weights.dense, dense):
                param.copy_(value)
            for param, value in zip(experts, dense):
                param.copy_(value.expand_as(param))
            # hidden unit j is column j of W1 (D, F), entry j of b1 (F,), row j of W2 (F, D)
            moments = [(value.float().mean(), value.float().std(correction=0))
                       for value in dense[:3]]
            for expert in range(num_experts if n_drop else 0):
                units = torch.randperm(d_ff)[:n_drop].to(ref.device)
                for param, value, hidden_dim, (mean, std) in zip(experts[:3], dense[:3],
                                                                 (1, 0, 0), moments):
                    shape = list(value.shape)
                    shape[hidden_dim] = n_drop
                    fresh = torch.randn(shape, device=ref.device) * std + mean
                    param[expert].index_copy_(hidden_dim, units, fresh.to(ref.dtype))
            if noise_std:
                for param in (layer.expert_w1, layer.expert_w2):
                    param.add_(torch.randn_like(param) * noise_std)
            layer.router_w2.normal_(0.0, router_std)
            layer.router_b2.zero_()
        return layer

    def weights(self) -> HyMoEWeights:
        """The twelve weight parameters, as the backend functions take them."""
        return HyMoEWeights(*(getattr(self, name) for name in HyMoEWeights._fields))

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
        """Set the warm-up step counter t, an int >= 0 (e.g. when resuming training); a
        float such as 2.7 is a TypeError, not silently truncated."""
        try:
            t = operator.index(t)
        except TypeError:
            raise TypeError(f"step must be an int, got {t!r}") from None
        if t < 0:
            raise ValueError(f"step must be >= 0, got {t}")
        self.step.fill_(t)

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
        if flat_mask is not None:
            x2 = torch.where(flat_mask.unsqueeze(-1), x2, 0.0)
        # auto: the kernels take fp32 / bf16 / fp16; float64 runs (and routes) on torch
        fn = hymoe_function(resolve(self.backend, x2,
                                    triton_fits=lambda: x2.dtype in KERNEL_DTYPES))
        ramp = self.ramp()
        y, prob_sum, load = fn(x2, flat_mask, self.weights(), self.alpha_param, ramp, self.top_k)

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

    def __getstate__(self) -> dict:
        """The state copy.deepcopy and pickle take: nn.Module's, with ``aux_loss`` None, as
        that term holds its forward's autograd graph, which cannot be copied and belongs to
        the original layer's parameters."""
        return {**super().__getstate__(), "aux_loss": None}

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
