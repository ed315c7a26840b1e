"""The fused linear + cross-entropy: the softmax loss of ``hidden @ weight.T`` over a whole
catalog, never stored as a (rows x items) matrix.

* :mod:`.lce_dispatch` -- ``linear_cross_entropy``: checks, the autograd Function, the choice
  of path, and its chunked PyTorch path;
* :mod:`.lce_triton_kernels` -- its Triton kernels and their launches.
"""
from .lce_dispatch import linear_cross_entropy

__all__ = ["linear_cross_entropy"]
