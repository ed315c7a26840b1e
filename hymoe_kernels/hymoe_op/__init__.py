"""The HyMoE op: y = y_dense + alpha * sum_j g_j f_j(x) on a flat batch of tokens.

One function, three implementations with one signature
``(x, mask, weights, alpha_param, ramp, top_k) -> (y, prob_sum, load)``:

* :mod:`.reference` -- ``hymoe_reference``, the readable specification (plain PyTorch);
* :mod:`.torch_backend` -- ``hymoe_torch``, the fast PyTorch path (any device);
* :mod:`.triton_backend` -- ``hymoe_triton``, the Triton path: custom ops with autograd that
  launch the stage kernels below, or the fused token tile.

The Triton stage kernels, in the order the tokens pass through them:

* :mod:`.stage1_router` -- router logits, top-k softmax gates, full-softmax sums, loads;
* :mod:`.stage2_permutation` -- counting sort of the token slots by expert;
* :mod:`.stage3_expert_gemms` -- grouped GEMMs over the expert-sorted rows (the experts'
  FFNs; also the router's and the dense FFN's linear layers) and the weight gradients;
* :mod:`.stage4_combine` -- the combine epilogue y = y_dense + alpha * sum_j g_j f_j and the
  gate / alpha gradients;
* :mod:`.fused_tile` -- all four stages in one kernel per token tile, for small widths.

``hymoe_triton`` is not imported here (it needs Triton); ``hymoe_kernels.hymoe_triton``
imports it on first use.
"""
from .reference import hymoe_reference
from .torch_backend import hymoe_torch

__all__ = ["hymoe_reference", "hymoe_torch"]
