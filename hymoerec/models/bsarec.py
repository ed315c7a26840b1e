"""BSARec (Shin et al., AAAI 2024, "An Attentive Inductive Bias for Sequential Recommendation
beyond the Self-Attention"): SASRec's transformer whose attention sub-layer is mixed with a
frequency filter along the sequence, the inductive bias that keeps the high frequencies
self-attention smooths away. The position-wise FFN is dense (the published model) or HyMoE
(``--ffn hymoe``: HyMoERec on the BSARec backbone), built by :func:`.base.make_ffn`.

Model: emb(items) + learned position -> LayerNorm -> dropout -> n_layers blocks, each

    filtered = LayerNorm(x + dropout(low(x) + beta * (x - low(x))))
    attended = LayerNorm(x + dropout(attention(x)))      causal, dropout on its weights too
    h        = alpha * filtered + (1 - alpha) * attended
    out      = LayerNorm(h + FFN(h))                      the FFN ends in dropout

where low(x) keeps the lowest c frequencies of x along the sequence (BSARec: rfft over the
window, bins c // 2 + 1 and up set to 0, inverse rfft), beta = sqrt_beta ** 2 is learned per
channel (sqrt_beta ~ N(0, 1), as BSARec draws it), alpha = ``config.filter_weight`` and
c = ``config.low_freqs``.

Causality. BSARec left-pads each prefix of a user's sequence to a window of N = max_len
positions, filters the whole window and reads only its last position. Its low-pass is a
circular convolution with the kernel h that the kept bins transform back to,
low(w)_i = sum_j h[(i - j) mod N] w_j, so every window position mixes with every other,
later ones included (and, circularly, the last with the oldest). Reading only the last
position keeps that causal for BSARec's one target per prefix: its window holds nothing
after it. Here sequences are right-padded and every position is a target, so filtering the
batch row as a whole would hand position t the items after t and the trailing padding.
Instead position t gets exactly what BSARec's filter gives the last position of the window
that ends at t, with zeros before the first item:

    low(x)_t = sum_{m=0..t} h[m] x_{t-m},

a causal convolution with a fixed kernel: one lower-triangular Toeplitz (N, N) matrix, built
once from the FFT definition and applied to all prefixes at once (O(L^2 D) per sequence,
like the attention). Position t then depends on items 0..t only, in training and evaluation
alike; later items and padding never reach it, and a batch's length does not change it (the
window is max_len long whatever L is). Where this differs from BSARec: its padding rows hold
the position embeddings (and later the blocks' outputs there) and enter its filter; here the
positions before the first item count as zero.

Defaults: BSARec's Beauty configuration (its README example and committed best log): 2
layers, d_model 64, 1 head (``paper_defaults``), alpha 0.7 and c 5 (ModelConfig's defaults
of ``filter_weight`` / ``low_freqs``, which only this model reads), dropout 0.5 on the
embeddings, attention weights and every sub-layer output (BSARec's value on every dataset),
Adam lr 5e-4 (``paper_defaults``), dense FFN of width 4 d_model with exact GELU, weights
~ N(0, 0.02) (:func:`.base.init_normal`). Not taken: its batch of 256 one-target prefixes
(the trainer's batch counts next-item targets over whole windows), its LayerNorm eps 1e-12
(the shared blocks' 1e-5) and its position indices, which count back from the newest item
in a left-padded window (here, as in SASRec, they count from the oldest item in the window).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import register
from .base import ModelConfig, init_normal
from .transformer_blocks import Block, TransformerBackbone


def causal_low_pass(window: int, low_freqs: int) -> Tensor:
    """(window, window) float32 lower-triangular M with M[t, s] = h[t - s] for s <= t, where
    h (window,) is the impulse response of BSARec's low-pass over a window of ``window``
    positions (rfft bins 0..low_freqs // 2 kept): ``M @ x`` gives each position t the
    low-pass that the window ending at t, zero before position 0, has at its last position."""
    spectrum = torch.zeros(window // 2 + 1, dtype=torch.complex128)
    spectrum[:low_freqs // 2 + 1] = 1.0
    kernel = torch.fft.irfft(spectrum, n=window)
    lag = torch.arange(window)[:, None] - torch.arange(window)[None, :]
    return torch.where(lag >= 0, kernel[lag.clamp(min=0)], 0.0).float()


class FrequencyFilter(nn.Module):
    """BSARec's frequency rescaling, causal (module docstring): x (B, L, D) float, L <= window
    -> low(x) + beta * (x - low(x)) (B, L, D), beta (D,) = sqrt_beta ** 2 learned."""

    def __init__(self, window: int, low_freqs: int, d_model: int):
        super().__init__()
        # derived from (window, low_freqs) alone, so not stored in checkpoints
        self.register_buffer("low_pass", causal_low_pass(window, low_freqs), persistent=False)
        self.sqrt_beta = nn.Parameter(torch.randn(d_model))

    def forward(self, x: Tensor) -> Tensor:
        L = x.shape[1]
        low = torch.einsum("ts,bsd->btd", self.low_pass[:L, :L].to(x.dtype), x)
        return low + self.sqrt_beta.square() * (x - low)


class BSARecBlock(Block):
    """Block (:class:`.layers.Block`) whose attention sub-layer is mixed with the frequency
    filter's: h = alpha * LN(x + drop(filter(x))) + (1 - alpha) * LN(x + drop(attn(x)));
    out = LN(h + ffn(h, mask)). x (B, L, D) float, mask (B, L) bool -> (B, L, D)."""

    def __init__(self, config: ModelConfig, causal: bool = True):
        super().__init__(config, causal)
        self.filter = FrequencyFilter(config.max_len, config.low_freqs, config.d_model)
        self.filter_dropout = nn.Dropout(config.dropout)
        self.filter_norm = nn.LayerNorm(config.d_model)
        self.filter_weight = config.filter_weight

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        filtered = self.filter_norm(x + self.filter_dropout(self.filter(x)))
        attended = self.norm1(x + self.attn_dropout(self.attn(x, mask)))
        h = self.filter_weight * filtered + (1.0 - self.filter_weight) * attended
        return self.norm2(h + self.ffn(h, mask))


@register("bsarec")
class BSARec(TransformerBackbone):
    """Item + learned position embeddings -> LayerNorm -> dropout -> n_layers BSARecBlocks,
    causal (module docstring). Linear / Embedding weights ~ N(0, 0.02), HyMoE's included."""
    paper_defaults = {"ffn": "dense", "n_heads": 1, "dropout": 0.5, "lr": 5e-4}
    block_type = BSARecBlock

    def __init__(self, n_items: int, config: ModelConfig):
        super().__init__(n_items, config, n_positions=config.max_len, causal=True)
        init_normal(self)

    def encode(self, items: Tensor) -> Tensor:
        """items (B, L) int64 right-padded with 0, L <= max_len -> hidden (B, L, D) float32;
        position t depends on items 0..t only."""
        return self.run_blocks(items)
