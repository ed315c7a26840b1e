"""HyMoE: a hybrid mixture-of-experts feed-forward layer (dense shared FFN + top-k experts).

Data flow: tokens -> router (top-k softmax) -> permutation by expert -> grouped expert
FFNs -> combine with the dense FFN, y = y_dense + alpha * y_moe.

Into an existing model: ``replace_ffn`` upcycles its dense FFNs in place
(``HyMoEFFN.from_dense``); ``hymoe_aux_loss`` and ``hymoe_stats`` serve its training loop.

The Triton parts (``HyMoEFunction``, ``hymoe``) are imported on first use, so the package
and its PyTorch backends work where Triton is not installed.
"""
from .layer import HyMoEFFN
from .loss import linear_cross_entropy, streaming_rank, streaming_topk
from .reference import hymoe_reference
from .torch_backend import hymoe_torch
from .upcycle import hymoe_aux_loss, hymoe_stats, replace_ffn

__all__ = ["HyMoEFFN", "HyMoEFunction", "hymoe", "hymoe_aux_loss", "hymoe_reference",
           "hymoe_stats", "hymoe_torch", "hymoe_triton", "linear_cross_entropy",
           "replace_ffn", "streaming_rank", "streaming_topk"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """Lazy Triton exports: HyMoEFunction, hymoe_triton and its alias hymoe."""
    if name in ("HyMoEFunction", "hymoe_triton", "hymoe"):
        from . import function
        return function.HyMoEFunction if name == "HyMoEFunction" else function.hymoe_triton
    raise AttributeError(f"module 'hymoe_kernels' has no attribute {name!r}")
