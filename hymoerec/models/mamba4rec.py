"""Mamba4Rec (Liu et al., 2024): a selective state-space (Mamba) layer followed by a
position-wise FFN, in pure PyTorch (the CUDA ``mamba-ssm`` package is not needed), written
to match the official implementation (github.com/chengkai-liu/Mamba4Rec, ``mamba4rec.py``
on RecBole with ``mamba_ssm.Mamba``; benchmarks/results/README.md lists the comparison).

Model: x = LayerNorm(dropout(emb(items))) (no position embedding: the scan is ordered);
per layer: h = Mamba(x); h = LayerNorm(dropout(h)) for one layer, LayerNorm(dropout(h) + x)
when stacked; out = LayerNorm(h + FFN(h)). The dense FFN is the official one,
dropout(W2 dropout(GELU(W1 h))) (:func:`.base.make_ffn` with hidden dropout); ``--ffn hymoe``
puts its HyMoE layer there instead (dropout on its output only), HyMoERec on the Mamba4Rec
backbone. Every LayerNorm has eps 1e-12. Init as the official code's (RecBole's init applied
to the whole model, the Mamba mixer included, :func:`.base.init_normal`): every Linear and
Embedding weight ~ N(0, 0.02), every Linear bias 0 (so also the dt projection's: delta
starts at softplus(0) = ln 2 instead of Mamba's [1e-3, 0.1]); the conv, A_log and D keep
Mamba's init.

Defaults (``paper_defaults``, the official config.yaml): one layer, d_model 64, d_state 32,
d_conv 4, expand 2, dropout 0.2, FFN of width 4 d_model (``max_len`` 50 for Amazon data and
200 for MovieLens-1M, batch 2048, Adam lr 1e-3, early stopping on validation NDCG@10 with
patience 10 are the trainer's defaults there).

Mamba block (Gu & Dao, 2023): [x, z] = in_proj(u); x = SiLU(causal depthwise conv(x));
(dt, B, C) = x_proj(x); delta = softplus(dt_proj(dt)); the selective scan
h_t = exp(delta_t A) h_{t-1} + delta_t B_t x_t, y_t = C_t h_t + D x_t (per channel, state
size N, A = -exp(A_log) diagonal); out = out_proj(y * SiLU(z)).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import register
from .base import ModelConfig, SequentialRecommender, init_normal, make_ffn

LOG_RANGE = 30.0           # most total log-decay inside one parallel chunk (exp(30) ~ 1e13)
MAX_SCAN_CHUNK = 64
CHECKPOINT_ELEMENTS = 1 << 26  # above this many (Bt, L, Din, N) elements, recompute in backward
LAYER_NORM_EPS = 1e-12     # the official code's (RecBole's) LayerNorm eps


def selective_scan_reference(x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
    """The recurrence, one step at a time (the executable spec of :func:`selective_scan`).
    x, delta (Bt, L, Din); A (Din, N); B, C (Bt, L, N) -> y (Bt, L, Din), without the D skip."""
    h = x.new_zeros(x.shape[0], x.shape[2], A.shape[1])
    ys = []
    for t in range(x.shape[1]):
        h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * x[:, t])[..., None] * B[:, t, None, :]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, t]))
    return torch.stack(ys, dim=1)


class SequentialScan(torch.autograd.Function):
    """The recurrence one step at a time with a hand-written backward (the CPU path of
    :func:`selective_scan`): each step works on one (Bt, Din, N) state, small enough to stay in
    cache, in place, and only the states are kept for the backward pass (Bt, L, Din, N).
    x, delta (Bt, L, Din); A (Din, N); B, C (Bt, L, N) -> y (Bt, L, Din), all one float dtype."""

    @staticmethod
    def forward(ctx, x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
        Bt, L, Din = x.shape
        drive = delta * x                                        # u_t = delta_t x_t
        state_shape = (Bt, Din, A.shape[1])
        states = x.new_empty(Bt, L, *state_shape[1:])
        h, decay, y = x.new_zeros(state_shape), x.new_empty(state_shape), torch.empty_like(x)
        for t in range(L):
            torch.mul(delta[:, t, :, None], A, out=decay).exp_()
            h.mul_(decay).addcmul_(drive[:, t, :, None], B[:, t, None, :])
            states[:, t] = h
            torch.sum(h * C[:, t, None, :], -1, out=y[:, t])
        ctx.save_for_backward(x, delta, A, B, C, states)
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        """h_t = exp(delta_t A) h_{t-1} + u_t B_t, y_t = h_t C_t, run backwards: grad_h carries
        dL/dh_t; dL/d(delta_t A) = grad_h_t * h_{t-1} * exp(delta_t A)."""
        x, delta, A, B, C, states = ctx.saved_tensors
        Bt, L, Din = x.shape
        drive = delta * x
        grad_drive, grad_B, grad_C = torch.empty_like(x), torch.empty_like(B), torch.empty_like(C)
        grad_log_decay_A = torch.zeros_like(x)                   # sum_n dL/d(delta_t A) A
        grad_A = torch.zeros_like(A)
        state_shape = (Bt, Din, A.shape[1])
        grad_h, decay, grad_log_decay = (x.new_zeros(state_shape), x.new_empty(state_shape),
                                         x.new_empty(state_shape))
        for t in range(L - 1, -1, -1):
            grad_h.addcmul_(grad_y[:, t, :, None], C[:, t, None, :])
            torch.sum(states[:, t] * grad_y[:, t, :, None], 1, out=grad_C[:, t])
            torch.sum(grad_h * B[:, t, None, :], -1, out=grad_drive[:, t])
            torch.sum(grad_h * drive[:, t, :, None], 1, out=grad_B[:, t])
            if t:   # h_{-1} = 0: step 0's decay has no gradient
                torch.mul(delta[:, t, :, None], A, out=decay).exp_()
                grad_h.mul_(decay)                               # now dL/dh_{t-1} from step t
                torch.mul(grad_h, states[:, t - 1], out=grad_log_decay)
                torch.sum(grad_log_decay * A, -1, out=grad_log_decay_A[:, t])
                grad_A.add_((grad_log_decay * delta[:, t, :, None]).sum(0))
        return (grad_drive * delta, grad_drive * x + grad_log_decay_A, grad_A, grad_B, grad_C)


def _scan_chunk(h0: Tensor, x: Tensor, delta: Tensor, A: Tensor, B: Tensor,
                C: Tensor) -> tuple[Tensor, Tensor]:
    """T steps at once in closed form: with S_t = sum_{s<=t} delta_s A (cumulative
    log-decay, <= 0) and u_s = delta_s x_s B_s, h_t = exp(S_t) (h0 + sum_{s<=t} exp(-S_s) u_s).
    The caller keeps |S_T| <= LOG_RANGE so exp(-S) cannot overflow.
    h0 (Bt, Din, N) state before the chunk; x, delta (Bt, T, Din); B, C (Bt, T, N).
    Returns y (Bt, T, Din) and the state after the chunk (Bt, Din, N)."""
    drive = (delta * x).unsqueeze(-1) * B.unsqueeze(2)                  # u_t (Bt, T, Din, N)
    if x.shape[1] == 1:   # one step: the recurrence itself
        states = torch.exp(delta.unsqueeze(-1) * A) * h0.unsqueeze(1) + drive
    else:
        log_decay = (delta.unsqueeze(-1) * A).cumsum(dim=1)             # S_t
        states = torch.exp(log_decay) * (h0.unsqueeze(1) + (torch.exp(-log_decay) * drive).cumsum(dim=1))
    return torch.einsum("btdn,btn->btd", states, C), states[:, -1]


def chunked_scan(x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                 max_chunk: int = MAX_SCAN_CHUNK) -> Tensor:
    """The GPU path of :func:`selective_scan`, same contract: each chunk of at most
    ``max_chunk`` steps is solved in parallel (:func:`_scan_chunk`), chunks run in sequence.
    A chunk is also at most the steps whose worst-case total decay max(delta) * max(-A)
    stays within LOG_RANGE, so the closed form is exact in float32 whatever delta grows to.
    For large inputs under autograd each chunk is recomputed in the backward pass instead of
    keeping its (Bt, T, Din, N) tensors."""
    Bt, L, Din = x.shape
    with torch.no_grad():
        step_bound = float(delta.amax() * (-A).amax()) if L else 0.0
    chunk = max(1, min(max_chunk, int(LOG_RANGE / step_bound) if step_bound > 0 else L))
    recompute = torch.is_grad_enabled() and Bt * L * Din * A.shape[1] > CHECKPOINT_ELEMENTS
    h = x.new_zeros(Bt, Din, A.shape[1])
    ys = []
    for start in range(0, L, chunk):
        part = (x[:, start:start + chunk], delta[:, start:start + chunk], A,
                B[:, start:start + chunk], C[:, start:start + chunk])
        y, h = (checkpoint(_scan_chunk, h, *part, use_reentrant=False) if recompute
                else _scan_chunk(h, *part))
        ys.append(y)
    return torch.cat(ys, dim=1)


def selective_scan(x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
    """The selective scan, same contract as :func:`selective_scan_reference`: on the GPU in
    parallel chunks (:func:`chunked_scan`); on the CPU, where the scan is memory-bound, one
    cache-sized step at a time (:class:`SequentialScan`, in the inputs' promoted dtype, as
    the chunked path computes, e.g. float32 for a bfloat16 model's float32 A)."""
    if x.is_cuda:
        return chunked_scan(x, delta, A, B, C)
    inputs = (x, delta, A, B, C)
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in inputs))
    return SequentialScan.apply(*(t.to(dtype) for t in inputs))


class MambaBlock(nn.Module):
    """Mamba mixer (B, L, d_model) -> (B, L, d_model), causal: position t depends only on
    positions <= t (causal conv + forward scan), so right padding cannot reach real items.
    A_log starts at log(1..d_state) (S4D-real) and D at 1; its Linear layers are initialised
    by the model (:func:`.base.init_normal`), not with Mamba's own dt init."""

    def __init__(self, d_model: int, d_state: int, d_conv: int, expand: int):
        super().__init__()
        d_inner, self.dt_rank, self.d_state = expand * d_model, math.ceil(d_model / 16), d_state
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32))
                                  .repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def forward(self, u: Tensor) -> Tensor:
        L = u.shape[1]
        x, z = self.in_proj(u).chunk(2, dim=-1)
        x = F.silu(self.conv(x.transpose(1, 2))[..., :L].transpose(1, 2))
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt))
        y = selective_scan(x, delta, -torch.exp(self.A_log.float()), B, C) + x * self.D
        return self.out_proj(y * F.silu(z))


class MambaLayer(nn.Module):
    """Mamba mixer (+ residual when stacked), LayerNorm, then FFN with residual + LayerNorm."""
    # the dense ffn for hymoe_kernels.replace_ffn: (up, down, output dropout)
    hymoe_ffn_slots = {"ffn": ("fc1", "fc2", "dropout")}

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.mamba = MambaBlock(config.d_model, config.d_state, config.d_conv, config.expand)
        self.residual = config.n_layers > 1
        self.dropout = nn.Dropout(config.dropout)
        self.norm = nn.LayerNorm(config.d_model, eps=LAYER_NORM_EPS)
        self.ffn_norm = nn.LayerNorm(config.d_model, eps=LAYER_NORM_EPS)
        self.ffn = make_ffn(config, hidden_dropout=True)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x (B, L, D) float, mask (B, L) bool (True = real item) -> (B, L, D)."""
        h = self.dropout(self.mamba(x))
        h = self.norm(h + x if self.residual else h)
        return self.ffn_norm(h + self.ffn(h, mask))


@register("mamba4rec")
class Mamba4Rec(SequentialRecommender):
    """Initialised as the official code (:func:`.base.init_normal`)."""
    paper_defaults = {"ffn": "dense", "n_layers": 1, "dropout": 0.2, "d_state": 32,
                      "d_conv": 4, "expand": 2}

    def __init__(self, n_items: int, config: ModelConfig):
        super().__init__(n_items, config)
        self.input_dropout = nn.Dropout(config.dropout)
        self.input_norm = nn.LayerNorm(config.d_model, eps=LAYER_NORM_EPS)
        self.layers = nn.ModuleList(MambaLayer(config) for _ in range(config.n_layers))
        init_normal(self)

    def encode(self, items: Tensor) -> Tensor:
        """items (B, L) int64 right-padded with 0 -> hidden (B, L, D) float32."""
        if items.shape[1] > self.config.max_len:
            raise ValueError(f"sequence length {items.shape[1]} exceeds max_len={self.config.max_len}")
        mask = items > 0
        x = self.input_norm(self.input_dropout(self.item_emb(items)))
        for layer in self.layers:
            x = layer(x, mask)
        return x
