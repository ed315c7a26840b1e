"""NARM (Li et al., CIKM 2017): a GRU encoder with a global part (the last hidden state)
and a local attention part over all earlier hidden states, combined by a bilinear decoder.

At position t: h = GRU(dropout(emb(items))); c_global = h_t; attention
a_tj = v^T sigmoid(A1 h_t + A2 h_j) for j <= t (not normalised, as in the paper);
c_local = sum_j a_tj h_j; query = B dropout([c_global; c_local]) (B: 2H -> D), scored
against the item embeddings (the paper's bilinear decoder emb_i^T B c).

Defaults (``paper_defaults``): one GRU layer, embedding 64, GRU width 128
(``rnn_hidden``; the paper used 50 / 100), dropout 0.25 on the embeddings (``dropout``)
and 0.5 before the decoder (``CONTEXT_DROPOUT``), the paper's two rates. Trained on every
position of the window, which is the paper's prefix augmentation. No position-wise FFN,
so ``--ffn`` must stay ``dense``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import register
from .base import ModelConfig, SequentialRecommender

ATTENTION_ELEMENTS = 1 << 24  # (B, query rows, keys, H) elements of attention alive at once
QUERY_BLOCKS = 8              # at least this many query blocks: each reads only its causal keys


@register("narm")
class NARM(SequentialRecommender):
    """Causal: position t reads only h_1..h_t, so right padding never reaches a real
    position (padded keys are masked as well)."""
    paper_defaults = {"ffn": "dense", "n_layers": 1, "rnn_hidden": 128, "dropout": 0.25}
    has_ffn = False
    CONTEXT_DROPOUT = 0.5

    def __init__(self, n_items: int, config: ModelConfig):
        super().__init__(n_items, config)
        H = config.rnn_hidden
        self.input_dropout = nn.Dropout(config.dropout)
        self.gru = nn.GRU(config.d_model, H, num_layers=config.n_layers, batch_first=True,
                          bias=False)
        self.query_proj = nn.Linear(H, H, bias=False)   # A1
        self.key_proj = nn.Linear(H, H, bias=False)     # A2
        self.score = nn.Linear(H, 1, bias=False)        # v
        self.context_dropout = nn.Dropout(self.CONTEXT_DROPOUT)
        self.decoder = nn.Linear(2 * H, config.d_model, bias=False)  # B
        nn.init.xavier_normal_(self.item_emb.weight)
        self.item_emb.weight.data[0].zero_()

    def local_context(self, states: Tensor, keys: Tensor, queries: Tensor, start: int,
                      key_mask: Tensor) -> Tensor:
        """c_local for query rows start..start+q: states / keys (B, L, H), queries
        (B, q, H), key_mask (B, L) bool -> (B, q, H)."""
        q, L = queries.shape[1], states.shape[1]
        weights = self.score(torch.sigmoid(queries.unsqueeze(2) + keys.unsqueeze(1))).squeeze(-1)
        rows = torch.arange(start, start + q, device=states.device).unsqueeze(1)
        allowed = (torch.arange(L, device=states.device).unsqueeze(0) <= rows).unsqueeze(0)
        weights = weights.masked_fill(~(allowed & key_mask.unsqueeze(1)), 0.0)
        return weights @ states

    def encode(self, items: Tensor) -> Tensor:
        """items (B, L) int64 right-padded with 0 -> query (B, L, D) float32."""
        B, L = items.shape
        states, _ = self.gru(self.input_dropout(self.item_emb(items)))
        keys, queries = self.key_proj(states), self.query_proj(states)
        H = states.shape[-1]
        rows = max(1, min(ATTENTION_ELEMENTS // max(1, B * L * H), -(-L // QUERY_BLOCKS)))
        key_mask = items > 0
        parts = []
        for start in range(0, L, rows):
            end = min(start + rows, L)   # query rows start..end-1 attend to keys 0..end-1
            args = (states[:, :end], keys[:, :end], queries[:, start:end], start, key_mask[:, :end])
            if torch.is_grad_enabled():  # recompute the (B, q, end, H) block in backward
                parts.append(checkpoint(self.local_context, *args, use_reentrant=False))
            else:
                parts.append(self.local_context(*args))
        context = torch.cat([states, torch.cat(parts, dim=1)], dim=-1)
        return self.decoder(self.context_dropout(context))
