"""What every sequential backbone shares: its hyper-parameters, the interface the trainer
and evaluator use, and the loss / scoring built on :mod:`.scoring`."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from hymoe_kernels import HyMoEFFN

from .scoring import full_item_scores, full_softmax_loss

FFN_KINDS = ("hymoe", "dense")


@dataclass
class ModelConfig:
    """Backbone hyper-parameters (defaults: the paper's / SASRec's public config)."""
    max_len: int = 50
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    ffn_mult: int = 4
    dropout: float = 0.2
    ffn: str = "hymoe"
    num_experts: int = 4
    top_k: int = 2
    warmup_steps: int = 500
    lb_weight: float = 0.02
    backend: str = "auto"

    def __post_init__(self):
        if self.ffn not in FFN_KINDS:
            raise ValueError(f"ffn must be one of {FFN_KINDS}, got {self.ffn!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        for name in ("max_len", "d_model", "n_layers", "n_heads", "ffn_mult"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)


class SequentialRecommender(nn.Module):
    """Base class: subclasses implement ``encode(items (B, L) int64) -> (B, L, D)`` (right
    padded with 0, causal: position t sees items 0..t) and own ``item_emb`` (nn.Embedding
    with n_items + 1 rows, row 0 = padding)."""

    def __init__(self, n_items: int, config: ModelConfig):
        super().__init__()
        self.n_items, self.config = n_items, config
        self.item_emb = nn.Embedding(n_items + 1, config.d_model, padding_idx=0)

    def encode(self, items: Tensor) -> Tensor:
        raise NotImplementedError

    def hymoe_layers(self) -> list[HyMoEFFN]:
        return [m for m in self.modules() if isinstance(m, HyMoEFFN)]

    def aux_loss(self) -> Tensor:
        """Sum of every HyMoE layer's load-balance loss of the last training forward."""
        losses = [m.aux_loss for m in self.hymoe_layers() if m.aux_loss is not None]
        return torch.stack(losses).sum() if losses else self.item_emb.weight.new_zeros(())

    def loss(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """(next-item cross-entropy, aux loss) for right-padded inputs / targets (B, L)
        int64; only real target positions (target > 0) enter the loss."""
        hidden = self.encode(inputs)
        real = targets > 0
        task = full_softmax_loss(hidden[real], self.item_emb.weight, targets[real])
        return task, self.aux_loss()

    def score_next(self, inputs: Tensor) -> Tensor:
        """Full-ranking scores (B, n_items + 1) of the item after each right-padded history
        (B, L) int64 (every history non-empty); column 0 is -inf."""
        hidden = self.encode(inputs)
        last = (inputs > 0).sum(dim=1) - 1
        query = hidden[torch.arange(inputs.shape[0], device=inputs.device), last]
        return full_item_scores(query, self.item_emb.weight)
