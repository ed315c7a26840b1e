"""BERT4Rec (Sun et al., CIKM 2019): a bidirectional transformer trained with the Cloze
task (masked items), predicting the next item from a [mask] token appended to the history.

Model: emb(items) + learned position -> LayerNorm -> dropout -> n_layers post-LN blocks
with bidirectional attention (padded keys masked) and the FFN of :func:`.base.make_ffn`
(``--ffn hymoe`` puts HyMoE inside) -> GELU(W h + b), scored against the item embeddings.
The item embedding has n_items + 2 rows: row 0 = padding, rows 1..n_items = items, row
n_items + 1 = [mask]; only rows 0..n_items are passed to the shared scoring functions, so
[mask] is never a candidate. Position embeddings have max_len + 1 rows (history + [mask]).

Training: each training window (its inputs plus its last target) has every real item
replaced by [mask] with probability ``mask_prob``; a window where none was drawn gets its
last item masked (the paper's extra "mask the last item" samples). The loss is the full
softmax over all items at the masked positions. With ``config.seen_bias`` (our addition, as
for every backbone) each masked position's scores get the learned offset at the items left
visible in its window, and ranking gives it to the history's items: what the model sees in
its input in both cases.

Defaults (``paper_defaults``, the paper's configuration): 2 layers, 2 heads, d_model 64,
dropout 0.1, dense FFN of width 4 d_model with GELU; mask_prob comes from the data (the
paper's 0.6 for Beauty, 0.2 for ML-1m: :func:`hymoerec.settings.data_defaults`). Not
reproduced: the output bias b^O (the shared scoring has none) and the paper's optimiser
schedule (lr 1e-4, 400k steps); the trainer's shared settings are used instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import register
from .base import ModelConfig, init_normal
from .transformer_blocks import TransformerBackbone
from .scoring import full_softmax_loss


@register("bert4rec")
class BERT4Rec(TransformerBackbone):
    """Weights ~ N(0, 0.02), HyMoE's included (:func:`.base.init_normal`)."""
    paper_defaults = {"ffn": "dense", "n_layers": 2, "n_heads": 2, "dropout": 0.1}

    def __init__(self, n_items: int, config: ModelConfig):
        super().__init__(n_items, config, n_positions=config.max_len + 1, causal=False)
        D = config.d_model
        self.mask_token = n_items + 1
        self.item_emb = nn.Embedding(n_items + 2, D, padding_idx=0)  # + the [mask] row
        self.head = nn.Linear(D, D)
        init_normal(self)

    def candidates(self) -> Tensor:
        """Item embedding rows 0..n_items (padding + items; [mask] excluded), (V + 1, D)."""
        return self.item_emb.weight[:self.n_items + 1]

    def encode(self, items: Tensor) -> Tensor:
        """items (B, L) int64 right-padded with 0, may hold [mask] (= n_items + 1),
        L <= max_len + 1 -> hidden (B, L, D) float32; bidirectional over real positions."""
        return F.gelu(self.head(self.run_blocks(items)))

    def mask_items(self, sequences: Tensor) -> tuple[Tensor, Tensor]:
        """Cloze corruption of right-padded sequences (B, L) int64 (every row non-empty):
        returns (inputs, targets), both (B, L) int64; inputs have [mask] where an item was
        chosen, targets hold the original item there and 0 elsewhere."""
        real = sequences > 0
        chosen = (torch.rand(sequences.shape, device=sequences.device) < self.config.mask_prob) & real
        unmasked_rows = (~chosen.any(dim=1)).nonzero().squeeze(1)
        chosen[unmasked_rows, real[unmasked_rows].sum(dim=1) - 1] = True
        return sequences.masked_fill(chosen, self.mask_token), sequences * chosen

    def visible_items(self, masked: Tensor, chosen: Tensor) -> Tensor:
        """(M, L) int64: for each masked position (True in ``chosen`` (B, L) bool), in
        row-major order (the order of ``hidden[chosen]``), the items of its window
        ``masked`` (B, L) int64 left unmasked, 0 elsewhere: what the model sees when it
        predicts that position's item."""
        visible = masked.masked_fill(masked == self.mask_token, 0)
        return visible[chosen.nonzero(as_tuple=True)[0]]

    def loss(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Cloze loss on the windows given as next-item (inputs, targets) (B, L) int64
        right-padded: the window is inputs[:, :1] followed by targets."""
        windows = torch.cat([inputs[:, :1], targets], dim=1)
        masked, cloze_targets = self.mask_items(windows)
        hidden = self.encode(masked)
        chosen = cloze_targets > 0
        offsets = {} if self.seen_offset is None else {
            "offset_items": self.visible_items(masked, chosen), "offset": self.seen_offset}
        task = full_softmax_loss(hidden[chosen], self.candidates(), cloze_targets[chosen],
                                 self.config.fused_loss, **offsets)
        return task, self.aux_loss()

    def query(self, inputs: Tensor) -> Tensor:
        """[mask] is appended after each right-padded history (B, L <= max_len); its output
        (B, D) scores the next item."""
        rows = torch.arange(inputs.shape[0], device=inputs.device)
        lengths = (inputs > 0).sum(dim=1)
        extended = torch.cat([inputs, inputs.new_zeros(inputs.shape[0], 1)], dim=1)
        extended[rows, lengths] = self.mask_token
        return self.encode(extended)[rows, lengths]
