"""Which implementation runs: the backends of the layer and of the loss, one resolver for
both, and whether Triton runs in its CPU interpreter.

Imports no Triton, so the package's PyTorch backends work where Triton is not installed.
"""
from __future__ import annotations

import enum
import os
from typing import Callable

from torch import Tensor

# True under Triton's CPU interpreter: TRITON_INTERPRET=1 when hymoe_kernels is imported
# (Triton itself reads it when the kernels are decorated, so set it before either import).
# The Triton backends then run on CPU tensors, and the kernels' config pickers choose their
# largest tiles (each program is a slow Python call).
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


class Backend(str, enum.Enum):
    """An implementation: ``AUTO`` is resolved (:func:`resolve`) into one of the others."""

    AUTO = "auto"
    TORCH = "torch"            # PyTorch, any device
    REFERENCE = "reference"    # the readable spec (the layer only)
    TRITON = "triton"          # the Triton kernels: CUDA tensors, or the interpreter


BACKENDS = tuple(backend.value for backend in Backend)


def resolve(name: str, tensor: Tensor, choices: tuple[str, ...] = BACKENDS,
            triton_fits: Callable[[], bool] = lambda: True) -> Backend:
    """The backend that runs for ``name`` (one of ``choices``) on ``tensor``'s device.

    "auto" is TRITON for a CUDA tensor whose shape and dtype the kernels take
    (``triton_fits()``, asked only for CUDA tensors), else TORCH. "triton" needs a CUDA
    tensor, or :data:`INTERPRETING`. Raises ValueError for a name outside ``choices`` and for
    "triton" on a CPU tensor without the interpreter.
    """
    if name not in choices:
        raise ValueError(f"backend must be one of {choices}, got {name!r}")
    backend = Backend(name)
    if backend is Backend.AUTO:
        return Backend.TRITON if tensor.is_cuda and triton_fits() else Backend.TORCH
    if backend is Backend.TRITON and not tensor.is_cuda and not INTERPRETING:
        raise ValueError(f"backend 'triton' needs CUDA tensors (got one on {tensor.device}); "
                         "on the CPU set TRITON_INTERPRET=1 before triton is imported, or use "
                         "backend 'torch'")
    return backend
