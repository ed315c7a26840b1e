"""What every sequential backbone shares: its hyper-parameters, the interface the trainer
and evaluator use, and the loss / scoring built on :mod:`.scoring`."""
from __future__ import annotations

import math
from dataclasses import Field, asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hymoe_kernels import HyMoEFFN
from hymoe_kernels.backend import BACKENDS
from hymoe_kernels.config import HYMOE_DEFAULTS
from hymoe_kernels.cross_entropy import streaming_rank, streaming_topk

from .scoring import full_item_scores, full_softmax_loss, sampled_softmax_loss, seen_items

FFN_KINDS = ("hymoe", "dense")
POSITION_ANCHORS = ("first", "last")


class ConfigError(ValueError):
    """A model setting that cannot be honoured; ``setting`` names the ModelConfig field."""

    def __init__(self, setting: str, message: str):
        super().__init__(message)
        self.setting = setting


def setting(default, help: str, **cli) -> Field:
    """A ModelConfig field with its command-line help; ``cli`` holds how train.py's flag
    differs from the plain ``--name`` of the field's type (``flag``, ``action``, ``choices``,
    ``data_default=True``: unset on the command line, filled in from the data) and
    ``older_runs``: the value a run saved before the field existed trained with, where that
    is not the default (see :func:`older_runs_value`)."""
    return field(default=default, metadata={"help": help, **cli})


def older_runs_value(f: Field):
    """The value of ModelConfig field ``f`` for a run whose saved config lacks it (it was
    saved before the field existed): the model that run trained, so it resumes and loads
    as it ran."""
    return f.metadata.get("older_runs", f.default)


@dataclass
class ModelConfig:
    """Backbone hyper-parameters (defaults: the paper's / SASRec's public config, the HyMoE
    layer's from HYMOE_DEFAULTS, plus our seen-item offset). The one source of the model's
    settings: train.py makes a flag of every field."""
    max_len: int = setting(50, "most recent items the model sees (default from the data: "
                               "enough for 80%% of the users' whole sequences, 50..200; ML-1M "
                               "200, Beauty 50)", data_default=True)
    d_model: int = setting(64, "embedding / hidden width d")
    n_layers: int = setting(2, "transformer blocks")
    n_heads: int = setting(2, "attention heads")
    ffn_mult: int = setting(4, "FFN width = ffn_mult * d_model")
    dropout: float = setting(0.2, "dropout rate (default: the model's paper value; sasrec, as "
                                  "in the SASRec paper: 0.2 on dense data such as ML-1M and the "
                                  "synthetic data, 0.5 on sparse data such as Amazon's, told "
                                  "apart by the data's density)", data_default=True)
    ffn: str = setting("hymoe", "position-wise FFN: HyMoE or the plain dense ablation",
                       choices=FFN_KINDS)
    num_experts: int = setting(HYMOE_DEFAULTS.num_experts, "sparse experts E")
    top_k: int = setting(HYMOE_DEFAULTS.top_k, "experts per token k")
    warmup_steps: int = setting(HYMOE_DEFAULTS.warmup_steps, "alpha warm-up T_warmup")
    lb_weight: float = setting(HYMOE_DEFAULTS.lb_weight, "load-balance lambda_lb")
    backend: str = setting("auto", "HyMoEFFN backend", choices=BACKENDS)
    fused_loss: bool = setting(True, "score all items with one (positions x items) matrix "
                                     "instead of the fused linear cross-entropy that never "
                                     "stores it", flag="--plain-loss", action="store_false")
    rnn_hidden: int = setting(128, "GRU width (gru4rec, narm)")
    d_state: int = setting(32, "SSM state size N (mamba4rec)")
    d_conv: int = setting(4, "causal depthwise conv width (mamba4rec)")
    expand: int = setting(2, "inner width = expand * d_model (mamba4rec)")
    mask_prob: float = setting(0.6, "Cloze masking probability (bert4rec; default: the "
                                    "BERT4Rec paper's values, 0.2 on dense data such as ML-1M, "
                                    "0.6 on sparse data such as Amazon's, told apart as for "
                                    "--dropout)", data_default=True)
    output_head: bool = setting(False, "sasrec: pass the last block's output through "
                                       "LayerNorm(GELU(Linear)) before scoring it against the "
                                       "tied item embeddings, so the item just consumed no "
                                       "longer scores highest")
    head_skip: float = setting(0.0, "with --output-head: add the last block's output, times "
                                    "this weight, to the head's (query = head(h) + w * h)")
    filter_weight: float = setting(0.7, "bsarec: weight alpha of the frequency-filter "
                                        "branch, self-attention's being 1 - alpha (BSARec's "
                                        "alpha, its Beauty value by default)")
    low_freqs: int = setting(5, "bsarec: low frequencies its filter keeps, rfft bins "
                                "0..c // 2 of a max_len window (BSARec's c, its Beauty value "
                                "by default)")
    seen_bias: bool = setting(True, "learn one score offset (starting at 0) added to every "
                                    "item already in the input, so the model can learn to "
                                    "rank items the user has seen lower (data without "
                                    "repeats: ML-1M, Beauty) or higher (data with repeats); "
                                    "bert4rec's Cloze loss offsets each masked position's "
                                    "unmasked window items; our addition, not the paper's "
                                    "(it trained better models on both datasets)",
                              older_runs=False)
    positions: str = setting("first", "sasrec, bert4rec, bsarec: position embeddings counted "
                                      "from each sequence's first item ('first') or back from "
                                      "its most recent item, which always has the last position "
                                      "('last', as left-padded SASRec / BSARec code has it)",
                             choices=POSITION_ANCHORS)
    negatives: int = setting(0, "sasrec and the other next-item backbones: score each target "
                                "against this many items drawn uniformly for the step (sampled "
                                "softmax) instead of all items (0: full softmax)")

    def __post_init__(self):
        def check(ok: bool, setting: str, message: str) -> None:
            if not ok:
                raise ConfigError(setting, message)

        check(self.ffn in FFN_KINDS, "ffn", f"ffn must be one of {FFN_KINDS}, got {self.ffn!r}")
        check(self.positions in POSITION_ANCHORS, "positions",
              f"positions must be one of {POSITION_ANCHORS}, got {self.positions!r}")
        check(self.backend in BACKENDS, "backend",
              f"backend must be one of {BACKENDS}, got {self.backend!r}")
        for name in ("max_len", "d_model", "n_layers", "n_heads", "ffn_mult", "rnn_hidden",
                     "d_state", "d_conv", "expand", "num_experts", "low_freqs"):
            check(getattr(self, name) >= 1, name, f"{name} must be >= 1, got {getattr(self, name)}")
        check(self.d_model % self.n_heads == 0, "d_model",
              f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        check(1 <= self.top_k <= self.num_experts, "top_k",
              f"top_k={self.top_k} must be in 1..num_experts={self.num_experts}")
        check(self.negatives >= 0, "negatives", f"negatives must be >= 0, got {self.negatives}")
        check(self.warmup_steps >= 0, "warmup_steps",
              f"warmup_steps must be >= 0, got {self.warmup_steps}")
        check(0.0 <= self.dropout < 1.0, "dropout", f"dropout must be in [0, 1), got {self.dropout}")
        check(math.isfinite(self.lb_weight) and self.lb_weight >= 0, "lb_weight",
              f"lb_weight must be a finite number >= 0, got {self.lb_weight}")
        check(0.0 <= self.filter_weight <= 1.0, "filter_weight",
              f"filter_weight must be in [0, 1], got {self.filter_weight}")
        check(0.0 < self.mask_prob < 1.0, "mask_prob",
              f"mask_prob must be in (0, 1), got {self.mask_prob}")
        check(math.isfinite(self.head_skip), "head_skip",
              f"head_skip must be a finite number, got {self.head_skip}")
        check(not self.head_skip or self.output_head, "head_skip",
              f"head_skip={self.head_skip} needs output_head=True (it weighs the last block's "
              "output added to the head's)")

    def to_dict(self) -> dict:
        return asdict(self)


class DenseFFN(nn.Module):
    """(..., D) float -> (..., D): D -> F -> D with exact-erf GELU and output dropout, with
    ``hidden_dropout`` also on the F hidden units (the official Mamba4Rec FFN,
    dropout(W2 dropout(GELU(W1 x)))); ``forward(x, mask)`` ignores mask."""

    def __init__(self, d_model: int, d_ff: int, dropout: float, hidden_dropout: bool = False):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)
        self.hidden_dropout = hidden_dropout

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        hidden = F.gelu(self.fc1(x))
        return self.dropout(self.fc2(self.dropout(hidden) if self.hidden_dropout else hidden))


def make_ffn(config: ModelConfig, hidden_dropout: bool = False) -> nn.Module:
    """The position-wise FFN of a block, D -> ffn_mult * D -> D, called as ``ffn(x, mask)``
    with x (B, L, D) float and mask (B, L) bool (True = real item): HyMoE for
    ``config.ffn == "hymoe"`` (output dropout only), else the plain dense FFN (with
    ``hidden_dropout`` as :class:`DenseFFN`). Every backbone builds its FFN here."""
    d_ff = config.d_model * config.ffn_mult
    if config.ffn == "hymoe":
        return HyMoEFFN(config.d_model, d_ff, config.num_experts, config.top_k,
                        config.warmup_steps, config.lb_weight, config.dropout, config.backend)
    return DenseFFN(config.d_model, d_ff, config.dropout, hidden_dropout)


def init_normal(model: nn.Module, std: float = 0.02) -> None:
    """SASRec / BERT4Rec's and the official Mamba4Rec's (RecBole's) init: Linear and
    Embedding weights ~ N(0, std), Linear biases 0, every HyMoEFFN likewise (so HyMoE and the
    dense FFN start alike), padding row 0 zero; other modules (Conv1d, GRU, Mamba's A_log
    and D) keep their own init."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, HyMoEFFN):
            module.reset_parameters(std)
    model.item_emb.weight.data[0].zero_()


class SequentialRecommender(nn.Module):
    """Base class: subclasses implement ``encode(items (B, L) int64) -> (B, L, D)`` (right
    padded with 0, causal: position t sees items 0..t) and own ``item_emb`` (nn.Embedding
    with n_items + 1 rows, row 0 = padding).

    ``paper_defaults`` holds the ModelConfig fields (and training flags) where the
    backbone's published configuration differs from the shared defaults; the command line
    applies them unless overridden. ``has_ffn`` is False for backbones without a
    position-wise FFN (``--ffn`` must then stay "dense", meaning: the model as published);
    ``has_output_head`` is True for backbones that implement ``config.output_head``. A
    subclass that replaces ``loss`` passes ``seen_offset`` (config.seen_bias) to the scoring
    with the items each position sees.
    """
    paper_defaults: dict = {}
    has_ffn: bool = True
    has_output_head: bool = False

    @classmethod
    def check_config(cls, config: ModelConfig) -> None:
        """Raise ConfigError for settings this backbone cannot honour."""
        if not cls.has_ffn and config.ffn != "dense":
            raise ConfigError("ffn", f"{cls.__name__} has no position-wise FFN to replace: "
                              f"ffn must be 'dense' (the published model), got {config.ffn!r}")
        if config.output_head and not cls.has_output_head:
            raise ConfigError("output_head", f"{cls.__name__} has no output head option: "
                              "output_head must be False (only sasrec implements it)")

    def __init__(self, n_items: int, config: ModelConfig):
        super().__init__()
        self.check_config(config)
        self.n_items, self.config = n_items, config
        self.item_emb = nn.Embedding(n_items + 1, config.d_model, padding_idx=0)
        # config.seen_bias: the score offset of items already in the input, learned
        self.seen_offset = nn.Parameter(torch.zeros(())) if config.seen_bias else None

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
        offsets = {} if self.seen_offset is None else {
            "offset_items": seen_items(inputs, targets), "offset": self.seen_offset}
        if self.config.negatives:
            n_items = self.item_emb.num_embeddings - 1
            negatives = torch.randint(1, n_items + 1, (self.config.negatives,),
                                      device=targets.device)
            task = sampled_softmax_loss(hidden[real], self.item_emb.weight, targets[real],
                                        negatives, **offsets)
        else:
            task = full_softmax_loss(hidden[real], self.item_emb.weight, targets[real],
                                     self.config.fused_loss, **offsets)
        return task, self.aux_loss()

    def query(self, inputs: Tensor) -> Tensor:
        """Representation (B, D) that scores the item after each right-padded history
        (B, L) int64 (every history non-empty): the output at its last real position."""
        hidden = self.encode(inputs)
        last = (inputs > 0).sum(dim=1) - 1
        return hidden[torch.arange(inputs.shape[0], device=inputs.device), last]

    def candidates(self) -> Tensor:
        """Embedding rows (V + 1, D) the queries are scored against; row 0 = padding."""
        return self.item_emb.weight

    def score_offsets(self, inputs: Tensor) -> dict:
        """The ``offset_items`` / ``offset`` arguments of the scoring functions for inputs
        (B, L): the input's items and the learned seen-item offset (config.seen_bias), or
        none."""
        if self.seen_offset is None:
            return {}
        return {"offset_items": inputs, "offset": self.seen_offset.detach()}

    def score_next(self, inputs: Tensor) -> Tensor:
        """Full-ranking scores (B, n_items + 1) of the item after each right-padded history
        (B, L) int64; column 0 is -inf."""
        return full_item_scores(self.query(inputs), self.candidates(), **self.score_offsets(inputs))

    def rank_next(self, inputs: Tensor, targets: Tensor, history: Tensor | None = None) -> Tensor:
        """Rank counts (B, 2) int64 ``[above, tied]`` of each target (B,) among all items
        after each history (B, L) (see :mod:`hymoerec.metrics`), streamed over item chunks
        so no (B, n_items) score matrix is stored. ``history`` (B, H) right-padded with 0:
        items left out of the ranking (the target itself always counts)."""
        return streaming_rank(self.query(inputs), self.candidates(), targets, exclude=history,
                              padding_idx=0, **self.score_offsets(inputs))

    def top_next(self, inputs: Tensor, k: int, exclude: Tensor | None = None
                 ) -> tuple[Tensor, Tensor]:
        """(scores, ids) (B, k) of the k best items after each history (B, L), streamed
        (:func:`hymoe_kernels.streaming_topk`); ``exclude`` (B, H): items never returned."""
        return streaming_topk(self.query(inputs), self.candidates(), k, exclude=exclude,
                              padding_idx=0, **self.score_offsets(inputs))
