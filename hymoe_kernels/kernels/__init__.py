"""Triton kernels of the HyMoE layer.

* :mod:`.router` -- top-k softmax routing, full-softmax sums, loads; and backward.
* :mod:`.permute` -- on-device counting sort of token slots by expert (padded groups).
* :mod:`.grouped_gemm` -- gather-fused grouped GEMMs with fused epilogues, weight gradients.
* :mod:`.combine` -- the combine epilogue y = y_dense + alpha * sum_j g_j f_j and its backward.
* :mod:`.fused_tile` -- the small-D path: one kernel per token tile from router to combine.
* :mod:`.linear_cross_entropy` -- the full-catalog cross-entropy without stored scores.
* :mod:`.device_math` -- device functions the kernels share (dot, rounding cast, GELU).
"""
import os

# True under Triton's CPU interpreter (TRITON_INTERPRET=1, read when this package is first
# imported). Every program is then a slow Python call, so the pick_*config functions choose
# their largest tiles (fewest programs).
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
