"""SASRec-style causal self-attention recommender (Kang & McAuley, ICDM 2018) whose
position-wise FFN is HyMoE (``ffn="hymoe"``, HyMoERec) or a plain dense FFN (``ffn="dense"``,
the ablation). Its measured numbers are in benchmarks/results/.
"""
from __future__ import annotations

from torch import Tensor, nn

from . import register
from .base import ModelConfig, init_normal
from .transformer_blocks import TransformerBackbone


@register("sasrec")
class SASRec(TransformerBackbone):
    """Item + learned position embeddings -> LayerNorm -> dropout -> n_layers blocks
    [-> output head]. Weights ~ N(0, 0.02), HyMoE's included (:func:`.base.init_normal`).

    ``config.output_head``: the last block's output goes through LayerNorm(GELU(Linear(D, D)))
    (BERT4Rec's transform, plus a LayerNorm) before it is scored against the tied item
    embeddings. Without it the residual stream carries the input item's own embedding to the
    scores, and the item just consumed ranks first (benchmarks/results/README.md, "The last
    item comes first").
    ``config.head_skip`` (with ``output_head``) adds the last block's output h back, weighted:
    query = head(h) + head_skip * h, a model between the two."""
    has_output_head = True

    def __init__(self, n_items: int, config: ModelConfig):
        super().__init__(n_items, config, n_positions=config.max_len, causal=True)
        D = config.d_model
        self.head = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.LayerNorm(D)) \
            if config.output_head else nn.Identity()
        init_normal(self)

    def encode(self, items: Tensor) -> Tensor:
        """items (B, L) int64 right-padded, L <= max_len -> hidden (B, L, D) float32."""
        x = self.run_blocks(items)
        if self.config.head_skip:
            return self.head(x) + self.config.head_skip * x
        return self.head(x)
