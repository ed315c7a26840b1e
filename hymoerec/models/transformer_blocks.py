"""The transformer parts SASRec and BERT4Rec share: multi-head self-attention, the post-LN
block around the position-wise FFN, and the backbone that embeds items and positions and runs
the blocks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import ModelConfig, SequentialRecommender, make_ffn


class SelfAttention(nn.Module):
    """Multi-head self-attention on right-padded sequences (B, L, D). Causal (SASRec): with
    right padding, causality alone keeps real positions from seeing padding. Bidirectional
    (``causal=False``, BERT4Rec): padded keys are masked out."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, causal: bool = True):
        super().__init__()
        self.n_heads, self.dropout, self.causal = n_heads, dropout, causal
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x (B, L, D) float, mask (B, L) bool (True = real item) -> (B, L, D)."""
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, D // self.n_heads).unbind(dim=2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=None if self.causal else mask[:, None, None, :],
                                           dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=self.causal)
        return self.out(y.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    """Post-LN transformer block: x = LN(x + drop(attn(x))); x = LN(x + ffn(x, mask))."""
    # the dense ffn (base.DenseFFN) for hymoe_kernels.replace_ffn: (up, down, output dropout)
    hymoe_ffn_slots = {"ffn": ("fc1", "fc2", "dropout")}

    def __init__(self, config: ModelConfig, causal: bool = True):
        super().__init__()
        D = config.d_model
        self.attn = SelfAttention(D, config.n_heads, config.dropout, causal)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.ffn = make_ffn(config)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = self.norm1(x + self.attn_dropout(self.attn(x, mask)))
        return self.norm2(x + self.ffn(x, mask))


class TransformerBackbone(SequentialRecommender):
    """Item + learned position embeddings -> LayerNorm -> dropout -> ``n_layers`` post-LN
    blocks, causal (SASRec) or bidirectional over real positions (BERT4Rec, ``causal=False``).
    Subclasses add their output transform and call :meth:`.base.init_normal` last;
    ``block_type`` is the block class, built as ``block_type(config, causal)``."""
    block_type: type[Block] = Block

    def __init__(self, n_items: int, config: ModelConfig, n_positions: int, causal: bool):
        super().__init__(n_items, config)
        D = config.d_model
        self.pos_emb = nn.Embedding(n_positions, D)
        self.input_norm = nn.LayerNorm(D)
        self.input_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(self.block_type(config, causal)
                                    for _ in range(config.n_layers))

    def positions(self, mask: Tensor) -> Tensor:
        """mask (B, L) bool, True on each row's leading real items -> position embeddings
        (B, L, D) or (L, D). ``config.positions == "first"``: the j-th item of every row has
        position j. ``"last"``: a row's most recent item has the last position P - 1 and the
        one j items before it P - 1 - j, as when rows are left-padded to P (padding after
        the row's items gets P - 1; causality or the key mask keeps it from real positions)."""
        L = mask.shape[1]
        if self.config.positions == "first":
            return self.pos_emb.weight[:L]
        P = self.pos_emb.num_embeddings
        index = torch.arange(L, device=mask.device) + (P - mask.sum(1, keepdim=True))
        return self.pos_emb(index.clamp(max=P - 1))

    def run_blocks(self, items: Tensor) -> Tensor:
        """items (B, L) int64 right-padded with 0, L <= the position count -> the last
        block's output (B, L, D) float32."""
        B, L = items.shape
        if L > self.pos_emb.num_embeddings:
            raise ValueError(f"sequence length {L} exceeds max_len={self.config.max_len} (the "
                             f"model has {self.pos_emb.num_embeddings} positions)")
        mask = items > 0
        x = self.input_dropout(self.input_norm(self.item_emb(items) + self.positions(mask)))
        for block in self.blocks:
            x = block(x, mask)
        return x
