"""Upcycle a trained dense backbone in place: its dense FFNs become HyMoE layers that start
as those FFNs (:func:`hymoe_kernels.replace_ffn`), every other parameter is kept."""
from __future__ import annotations

from dataclasses import fields

from hymoe_kernels import replace_ffn
from hymoe_kernels.config import HYMOE_DEFAULTS

from .base import ModelConfig, SequentialRecommender

# the ModelConfig fields that may differ between the dense model and its upcycled config
HYMOE_SETTINGS = ("ffn", "num_experts", "top_k", "warmup_steps", "lb_weight", "backend")


def upcycle_to_hymoe(model: SequentialRecommender, config: ModelConfig, *,
                     expert_init: str = HYMOE_DEFAULTS.expert_init,
                     drop_ratio: float = HYMOE_DEFAULTS.drop_ratio,
                     noise_std: float = 0.0) -> list[str]:
    """Turn ``model``, built with ``ffn="dense"`` (typically trained), into the model that
    ``build_model(name, n_items, config)`` builds for ``config.ffn == "hymoe"``, in place.

    Every dense FFN becomes ``HyMoEFFN.from_dense`` of it with the HyMoE settings of
    ``config`` (num_experts, top_k, warmup_steps, lb_weight, backend; the output dropout is
    ``config.dropout``, as ``make_ffn`` gives) and ``expert_init`` / ``drop_ratio`` /
    ``noise_std`` (see ``from_dense``); every other parameter and buffer is kept, and
    ``model.config`` becomes ``config``. The state_dict then has exactly the keys and shapes
    of a freshly built HyMoE model, so saving, ``--resume`` and evaluation work unchanged.
    At warm-up step 0 the model computes what the dense one did at every real position
    (up to the rounding of the same GEMMs; padded positions' outputs differ, as HyMoE
    computes them from zeros, and never reach the real ones); the warm-up then adds the
    experts. Build a new optimizer afterwards: the new layers' parameters are new tensors.

    Returns the names of the new HyMoE modules (e.g. ``["blocks.0.ffn", "blocks.1.ffn"]``).
    Raises ValueError when ``model`` is not dense, ``config.ffn`` is not "hymoe", the backbone
    has no FFN to replace, or ``config`` differs from ``model.config`` in any field but
    :data:`HYMOE_SETTINGS` (each differing field is named).
    """
    if model.config.ffn != "dense":
        raise ValueError(f"only a model built with ffn='dense' can be upcycled, this one has "
                         f"ffn={model.config.ffn!r}")
    if config.ffn != "hymoe":
        raise ValueError(f"the upcycled config must have ffn='hymoe', got {config.ffn!r}")
    differing = [f"{f.name} ({getattr(model.config, f.name)!r} -> {getattr(config, f.name)!r})"
                 for f in fields(config) if f.name not in HYMOE_SETTINGS
                 and getattr(config, f.name) != getattr(model.config, f.name)]
    if differing:
        raise ValueError("the upcycled config may change only the HyMoE settings "
                         f"{HYMOE_SETTINGS}; it also changes " + ", ".join(differing))
    type(model).check_config(config)
    names = replace_ffn(model, num_experts=config.num_experts, top_k=config.top_k,
                        warmup_steps=config.warmup_steps, lb_weight=config.lb_weight,
                        backend=config.backend, dropout=config.dropout,
                        expert_init=expert_init, drop_ratio=drop_ratio, noise_std=noise_std)
    model.config = config
    return names
