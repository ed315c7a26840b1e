"""HyMoE: a hybrid mixture-of-experts feed-forward layer (dense shared FFN + top-k experts).

Data flow: tokens -> router (top-k softmax) -> permutation by expert -> grouped expert
FFNs -> combine with the dense FFN, y = y_dense + alpha * y_moe.

Into an existing model: ``replace_ffn`` upcycles its dense FFNs in place
(``HyMoEFFN.from_dense``); ``hymoe_aux_loss`` and ``hymoe_stats`` serve its training loop.

The weights travel as one :class:`HyMoEWeights`; ``HyMoEFFN.weights()`` returns them, and
every functional form takes ``(x, mask, weights, alpha_param, ramp, top_k)``.

The full-catalog scoring beside it: ``linear_cross_entropy`` (the softmax loss of
``hidden @ weight.T`` without the score matrix) and ``streaming_rank`` / ``streaming_topk``.

Layout: ``hymoe_op/`` holds the HyMoE op (readable reference, torch path, Triton path and its
stage kernels router -> permutation -> expert GEMMs -> combine), ``cross_entropy/`` the fused
loss and the streamed scoring; at the top are the layer (``layer``), ``replace_ffn``
(``upcycle``), the defaults (``config``), the weights, the backend choice and what both ops'
kernels share (``device_math``, ``kernel_launch``).

The Triton path (``hymoe_triton`` and its alias ``hymoe``) is imported on first use, so the
package and its PyTorch backends work where Triton is not installed.
"""
from .cross_entropy import linear_cross_entropy, streaming_rank, streaming_topk
from .hymoe_op import hymoe_reference, hymoe_torch
from .layer import HyMoEFFN
from .upcycle import hymoe_aux_loss, hymoe_stats, replace_ffn
from .weights import HyMoEWeights

__all__ = ["HyMoEFFN", "HyMoEWeights", "hymoe", "hymoe_aux_loss", "hymoe_reference",
           "hymoe_stats", "hymoe_torch", "hymoe_triton", "linear_cross_entropy",
           "replace_ffn", "streaming_rank", "streaming_topk"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """Lazy Triton exports: hymoe_triton and its alias hymoe."""
    if name in ("hymoe_triton", "hymoe"):
        from .hymoe_op.triton_backend import hymoe_triton
        return hymoe_triton
    raise AttributeError(f"module 'hymoe_kernels' has no attribute {name!r}")
