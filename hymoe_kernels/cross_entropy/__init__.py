"""Scores ``hidden @ weight.T`` over a whole catalog, never stored as a (rows x items) matrix.

* :mod:`.lce_dispatch` -- ``linear_cross_entropy``, the fused linear + cross-entropy loss
  (checks, the autograd Function, the choice of path);
* :mod:`.lce_torch_backend` -- its chunked PyTorch path;
* :mod:`.lce_triton_kernels` -- its Triton kernels and their launches;
* :mod:`.streaming_scores` -- ``streaming_rank`` / ``streaming_topk``: a target's rank, or the
  top-k items, streamed over the same item chunks (``target_ranks``: the readable
  definition on full scores);
* :mod:`.score_chunks` -- what the loss and the rankings share: the block budget, argument
  checks, each row's listed items and the seen-item offset.
"""
from .lce_dispatch import linear_cross_entropy
from .streaming_scores import NonFiniteScoresError, streaming_rank, streaming_topk, target_ranks

__all__ = ["NonFiniteScoresError", "linear_cross_entropy", "streaming_rank", "streaming_topk",
           "target_ranks"]
