"""Baseline FFN layers the HyMoE benchmarks compare against.

* :class:`DensePFFN`: the position-wise FFN a transformer recommender (SASRec) uses, the
  floor any mixture of experts pays on top of.
* :class:`NaiveMoEFFN`: the same hybrid mixture as HyMoEFFN (dense FFN + GELU router + top-k
  softmax experts + load-balance loss) written the way most recommender code writes an MoE:
  a Python loop over experts that, per expert, masks the tokens routed to it, gathers them,
  runs the expert FFN and scatter-adds the gated result back.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DensePFFN(nn.Module):
    """Linear(D, F) -> exact GELU -> Linear(F, D) on x (..., D) -> (..., D)."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class NaiveMoEFFN(nn.Module):
    """Dense FFN + alpha * top-k mixture of ``num_experts`` FFNs, one Python loop step per
    expert. ``forward(x)`` maps (..., D) -> (..., D) and sets ``aux_loss`` (the load-balance
    term lb_weight * sum_e gbar_e log gbar_e over all tokens) in training mode."""

    def __init__(self, d_model: int, d_ff: int, num_experts: int = 4, top_k: int = 2,
                 lb_weight: float = 0.02):
        super().__init__()
        self.top_k, self.lb_weight = top_k, lb_weight
        self.dense = DensePFFN(d_model, d_ff)
        self.router = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(),
                                    nn.Linear(d_model, num_experts))
        self.experts = nn.ModuleList(DensePFFN(d_model, d_ff) for _ in range(num_experts))
        self.alpha_param = nn.Parameter(torch.zeros(()))
        self.aux_loss: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        logits = self.router(tokens)
        top_logits, top_ids = logits.topk(self.top_k, dim=-1)
        gates = top_logits.softmax(dim=-1)
        y_moe = torch.zeros_like(tokens)
        for expert_id, expert in enumerate(self.experts):
            routed = top_ids == expert_id                                  # (N, k)
            token_idx = routed.any(dim=-1).nonzero().squeeze(1)
            if token_idx.numel() == 0:
                continue
            gate = (gates * routed).sum(dim=-1).index_select(0, token_idx).unsqueeze(-1)
            y_moe = y_moe.index_add(0, token_idx, gate * expert(tokens.index_select(0, token_idx)))
        y = self.dense(tokens) + torch.sigmoid(self.alpha_param) * y_moe
        if self.training:
            gbar = logits.softmax(dim=-1).mean(dim=0)
            self.aux_loss = self.lb_weight * (gbar * gbar.clamp(min=1e-9).log()).sum()
        return y.reshape(x.shape)
