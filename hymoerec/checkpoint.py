"""Atomic checkpoint writes and checked reads."""
from __future__ import annotations

import os
from pathlib import Path

import torch

FORMAT = "hymoerec-checkpoint-v1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Write ``state`` (plus a format tag) to ``path`` via a temp file and os.replace, so
    a crash never leaves a half-written checkpoint behind."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, **state}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, required: tuple[str, ...] = ("model", "config"),
                    map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; a missing, corrupt or foreign
    file raises CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for truncated / foreign files
        raise CheckpointError(f"checkpoint {path} is corrupt or not a HyMoERec checkpoint "
                              f"({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a HyMoERec checkpoint "
                              f"(expected format {FORMAT!r})")
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}")
    return state


def load_model_state(model: torch.nn.Module, state_dict: dict, path: str | os.PathLike) -> None:
    """model.load_state_dict with the checkpoint's name in the error."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {path} does not fit the model: {err}") from None
