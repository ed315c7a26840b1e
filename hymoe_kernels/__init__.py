"""HyMoE: a hybrid mixture-of-experts feed-forward layer (dense shared FFN + top-k experts).

Data flow: tokens -> router (top-k softmax) -> permutation by expert -> grouped expert
FFNs -> combine with the dense FFN, y = y_dense + alpha * y_moe.
"""
from .layer import HyMoEFFN
from .loss import linear_cross_entropy, streaming_rank, streaming_topk
from .reference import hymoe_reference

__all__ = ["HyMoEFFN", "hymoe_reference", "linear_cross_entropy", "streaming_rank",
           "streaming_topk"]
__version__ = "0.1.0"
