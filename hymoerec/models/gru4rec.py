"""GRU4Rec (Hidasi et al., ICLR 2016) as used in sequential-recommendation comparisons:
item embedding -> dropout -> GRU -> linear map to the item-embedding space, trained with
the full-softmax next-item loss at every position (the cross-entropy variant of GRU4Rec).

Defaults (``paper_defaults``): one GRU layer, embedding 64, GRU width 128
(``rnn_hidden``), embedding dropout 0.3, as in RecBole's GRU4Rec reproduction that
Mamba4Rec-style tables use; the original paper's session-parallel mini-batches and
TOP1/BPR ranking losses are not reproduced (the shared full-softmax loss is used).
It has no position-wise FFN, so ``--ffn`` must stay ``dense``.
"""
from __future__ import annotations

from torch import Tensor, nn

from . import register
from .base import ModelConfig, SequentialRecommender


@register("gru4rec")
class GRU4Rec(SequentialRecommender):
    """Causal by construction: with right padding, the GRU state at a real position has
    only read the real items before it, so trailing padding cannot reach it."""
    paper_defaults = {"ffn": "dense", "n_layers": 1, "rnn_hidden": 128, "dropout": 0.3}
    has_ffn = False

    def __init__(self, n_items: int, config: ModelConfig):
        super().__init__(n_items, config)
        self.input_dropout = nn.Dropout(config.dropout)
        self.gru = nn.GRU(config.d_model, config.rnn_hidden, num_layers=config.n_layers,
                          batch_first=True, bias=False)
        self.output = nn.Linear(config.rnn_hidden, config.d_model)
        nn.init.xavier_normal_(self.item_emb.weight)
        for weight in self.gru.parameters():
            nn.init.xavier_uniform_(weight)
        self.item_emb.weight.data[0].zero_()

    def encode(self, items: Tensor) -> Tensor:
        """items (B, L) int64 right-padded with 0 -> hidden (B, L, D) float32."""
        states, _ = self.gru(self.input_dropout(self.item_emb(items)))
        return self.output(states)
