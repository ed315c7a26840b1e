"""Host helpers of the package's Triton launches: the device guard, the
choice of a block configuration by padded width and dtype, a configuration's launch
parameters, and the size bound of per-split partial weight gradients.
"""
import contextlib

import torch

# Most fp32 elements of the per-split partial weight gradients one backward launch writes
# (2^26 = 256 MiB): the weight-gradient passes split the tokens over fewer programs rather
# than exceed it (one split is always allowed).
MAX_PARTIAL_ELEMENTS = 1 << 26


def on_device_of(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Context making ``tensor``'s CUDA device the current one: Triton launches on the
    current device, not on the one the pointers belong to. A no-op for CPU tensors (the
    interpreter)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def pick_width_config(configs: tuple, block_d: int, fp32: bool):
    """The first of ``configs`` (each with ``max_block_d`` and ``fp32`` fields) for fp32 (or
    16-bit) inputs whose max_block_d covers the padded width ``block_d``; None if none does."""
    return next((config for config in configs
                 if config.fp32 == fp32 and block_d <= config.max_block_d), None)


# Fields of a config NamedTuple that choose it (by padded width and input dtype) rather than
# being passed to the kernel.
SELECTION_FIELDS = ("max_block_d", "fp32")


def launch_params(config) -> dict:
    """The launch parameters of a block-configuration NamedTuple (the ``*_CONFIGS`` entries
    of the kernel modules): every field but SELECTION_FIELDS, named as the kernel's
    constexprs and Triton's num_warps / num_stages."""
    return {name: value for name, value in config._asdict().items()
            if name not in SELECTION_FIELDS}
