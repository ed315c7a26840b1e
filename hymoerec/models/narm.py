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

from . import register
from .base import ModelConfig, SequentialRecommender

ATTENTION_ELEMENTS = 1 << 24  # (B, query rows, keys, H) elements of attention alive at once
QUERY_BLOCKS = 8              # at least this many query blocks: each reads only its causal keys


def local_context_reference(states: Tensor, keys: Tensor, queries: Tensor, score: Tensor,
                            key_mask: Tensor) -> Tensor:
    """c_local in one block, by plain autograd: c_i = sum over j <= i with key_mask_j of
    (score . sigmoid(q_i + k_j)) h_j. states / keys / queries (B, L, H), score (H,),
    key_mask (B, L) bool -> (B, L, H)."""
    L = states.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=states.device).tril()
    weights = torch.sigmoid(queries.unsqueeze(2) + keys.unsqueeze(1)) @ score
    return weights.masked_fill(~(causal & key_mask.unsqueeze(1)), 0.0) @ states


def query_blocks(states: Tensor, keys: Tensor, queries: Tensor, score: Tensor,
                 key_mask: Tensor, rows: int):
    """Yield (start, end, allowed, sig, weights) for each block of ``rows`` query rows:
    allowed (B, q, end) bool (key j <= start + r and key_mask (B, L) true at j),
    sig = sigmoid(q_i + k_j) (B, q, end, H), weights = (sig @ score) masked (B, q, end)."""
    L = states.shape[1]
    for start in range(0, L, rows):
        end = min(start + rows, L)
        causal = (torch.arange(end, device=key_mask.device).unsqueeze(0)
                  <= torch.arange(start, end, device=key_mask.device).unsqueeze(1))
        allowed = causal & key_mask[:, None, :end]
        sig = torch.sigmoid_(queries[:, start:end].unsqueeze(2) + keys[:, None, :end])
        yield start, end, allowed, sig, (sig @ score).masked_fill_(~allowed, 0.0)


class LocalContext(torch.autograd.Function):
    """:func:`local_context_reference` in blocks of ``rows`` query rows, each reading only
    its causal keys. Only one (B, rows, keys, H) sigmoid block is alive at a time: backward
    recomputes it and forms every gradient from it in place."""

    @staticmethod
    def forward(ctx, states: Tensor, keys: Tensor, queries: Tensor, score: Tensor,
                key_mask: Tensor, rows: int) -> Tensor:
        out = torch.empty_like(queries)
        for start, end, _, _, weights in query_blocks(states, keys, queries, score, key_mask, rows):
            out[:, start:end] = weights @ states[:, :end]
        ctx.save_for_backward(states, keys, queries, score, key_mask)
        ctx.rows = rows
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        states, keys, queries, score, key_mask = ctx.saved_tensors
        d_states, d_keys = torch.zeros_like(states), torch.zeros_like(keys)
        d_queries, d_score = torch.empty_like(queries), torch.zeros_like(score)
        blocks = query_blocks(states, keys, queries, score, key_mask, ctx.rows)
        for start, end, allowed, sig, weights in blocks:   # sigmoids recomputed
            grad = grad_out[:, start:end]
            d_states[:, :end] += weights.transpose(1, 2) @ grad
            d_weights = (grad @ states[:, :end].transpose(1, 2)).masked_fill_(~allowed, 0.0)
            d_score += d_weights.reshape(-1) @ sig.reshape(-1, sig.shape[-1])
            d_pre = sig.addcmul_(sig, sig, value=-1.0).mul_(d_weights.unsqueeze(-1))
            d_queries[:, start:end] = d_pre.sum(2) * score    # d_pre: d weights / d (q + k)
            d_keys[:, :end] += d_pre.sum(1) * score
        return d_states, d_keys, d_queries, d_score, None, None


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

    def encode(self, items: Tensor) -> Tensor:
        """items (B, L) int64 right-padded with 0 -> query (B, L, D) float32."""
        B, L = items.shape
        states, _ = self.gru(self.input_dropout(self.item_emb(items)))
        keys, queries = self.key_proj(states), self.query_proj(states)
        H = states.shape[-1]
        rows = max(1, min(ATTENTION_ELEMENTS // max(1, B * L * H), -(-L // QUERY_BLOCKS)))
        local = LocalContext.apply(states, keys, queries, self.score.weight.view(H),
                                   items > 0, rows)
        context = torch.cat([states, local], dim=-1)
        return self.decoder(self.context_dropout(context))
