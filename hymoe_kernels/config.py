"""The HyMoE layer's defaults, written once: the paper's settings (E = 4, k = 2,
T_warmup = 500, lambda_lb = 0.02) and the upcycling defaults. The layer, ``from_dense`` /
``replace_ffn``, the recommender's ModelConfig and the command-line flags all read them."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HyMoEConfig:
    """Settings of one HyMoE layer beyond its widths.

    num_experts: sparse experts E; top_k: experts per token k (1 <= k <= E);
    warmup_steps: T_warmup of alpha = sigmoid(alpha_param) * min(1, t / T_warmup);
    lb_weight: lambda_lb of the load-balance term sum_e gbar_e log gbar_e;
    expert_init / drop_ratio: how ``from_dense`` fills the experts of an upcycled layer
    ("copy", "drop" with that share of hidden units re-drawn, or "random");
    noise_std: std of the N(0, noise_std) noise ``from_dense`` adds to the experts' weights;
    router_std: std of the N(0, router_std) init of an upcycled layer's router output layer.
    """

    num_experts: int = 4
    top_k: int = 2
    warmup_steps: int = 500
    lb_weight: float = 0.02
    expert_init: str = "copy"
    drop_ratio: float = 0.5
    noise_std: float = 0.0
    router_std: float = 0.02


HYMOE_DEFAULTS = HyMoEConfig()
