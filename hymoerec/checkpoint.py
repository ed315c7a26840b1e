"""Atomic checkpoint writes and checked reads.

Every checkpoint carries a SHA-256 digest of its state (each tensor's dtype, shape and
bytes, and every other value's repr, in order), checked on load: flipped bytes in a file
that still unpickles are found as surely as a truncated one.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import torch

from .atomic_write import replaced_atomically

FORMAT = "hymoerec-checkpoint-v2"
UNCHECKED_FORMATS = ("hymoerec-checkpoint-v1",)  # written before digests; loaded unchecked


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


def state_digest(state) -> str:
    """Hex SHA-256 of a checkpoint state: nested dicts / lists / tuples of tensors and plain
    values (str, int, float, bool, None), walked in order."""
    digest = hashlib.sha256()

    def walk(value) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            digest.update(f"tensor {t.dtype} {tuple(t.shape)};".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            digest.update(f"dict {len(value)};".encode())
            for key, item in value.items():
                walk(key)
                walk(item)
        elif isinstance(value, (list, tuple)):
            digest.update(f"{type(value).__name__} {len(value)};".encode())
            for item in value:
                walk(item)
        else:
            digest.update(f"{type(value).__name__} {value!r};".encode())

    walk(state)
    return digest.hexdigest()


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Write ``state`` (plus a format tag and its digest) to ``path`` via a temp file and
    os.replace, so a crash never leaves a half-written checkpoint behind."""
    with replaced_atomically(path) as tmp:
        torch.save({"format": FORMAT, "sha256": state_digest(state), **state}, tmp)


def load_checkpoint(path: str | os.PathLike, required: tuple[str, ...] = ("model", "config"),
                    map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; a missing, corrupt (unreadable
    or failing its digest) or foreign file raises CheckpointError naming it. Returns the
    state without the format tag and digest."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:  # torch's text advises weights_only=False: never do that
        raise CheckpointError(f"checkpoint {path} is corrupt or not a HyMoERec checkpoint "
                              f"(it does not unpickle as tensors and plain values only)") from None
    except Exception as err:  # torch raises many types for truncated / foreign files
        reason = str(err).split(". ")[0].splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or not a HyMoERec checkpoint "
                              f"({type(err).__name__}: {reason})") from None
    if not isinstance(state, dict) or state.get("format") not in (FORMAT, *UNCHECKED_FORMATS):
        raise CheckpointError(f"checkpoint {path} is not a HyMoERec checkpoint "
                              f"(expected format {FORMAT!r})")
    stored = state.pop("sha256", None)
    if state.pop("format") == FORMAT and stored != state_digest(state):
        raise CheckpointError(f"checkpoint {path} is corrupt (its contents do not match the "
                              f"SHA-256 digest stored when it was written)")
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
