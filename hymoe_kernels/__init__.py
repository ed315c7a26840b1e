"""HyMoE: a hybrid mixture-of-experts feed-forward layer (dense shared FFN + top-k experts).

Data flow: tokens -> router (top-k softmax) -> permutation by expert -> grouped expert
FFNs -> combine with the dense FFN, y = y_dense + alpha * y_moe.
"""
from .function import HyMoEFunction, hymoe_triton
from .layer import HyMoEFFN
from .reference import hymoe_reference

hymoe = hymoe_triton  # the functional layer on the Triton kernels

__all__ = ["HyMoEFFN", "HyMoEFunction", "hymoe", "hymoe_reference", "hymoe_triton"]
__version__ = "0.1.0"
