"""Backbone registry: ``register("name")`` on a SequentialRecommender subclass makes it
available as ``--model name``; ``build_model`` constructs one."""
from __future__ import annotations

from .base import FFN_KINDS, ConfigError, ModelConfig, SequentialRecommender
from .scoring import full_item_scores, full_softmax_loss

MODELS: dict[str, type[SequentialRecommender]] = {}


def register(name: str):
    """Class decorator adding a backbone to MODELS under ``name``."""
    def add(cls: type[SequentialRecommender]) -> type[SequentialRecommender]:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = cls
        return cls
    return add


def build_model(name: str, n_items: int, config: ModelConfig) -> SequentialRecommender:
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    return MODELS[name](n_items, config)


from . import sasrec  # noqa: E402,F401  (registers "sasrec")
from . import bert4rec, bsarec, gru4rec, mamba4rec, narm  # noqa: E402,F401  (the baselines)

__all__ = ["MODELS", "register", "build_model", "ConfigError", "ModelConfig",
           "SequentialRecommender", "FFN_KINDS", "full_softmax_loss", "full_item_scores"]
