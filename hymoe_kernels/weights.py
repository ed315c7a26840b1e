"""The twelve weights of a HyMoE layer: one type for their names, shapes and checks.

Every implementation (the reference, the torch backend, the Triton kernels) and the layer
take the weights as one :class:`HyMoEWeights`. Its field order is the order of the layer's
parameters and of the kernels' weight pointer arguments.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

# Input dtypes the Triton kernels take.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class HyMoEWeights(NamedTuple):
    """The weights of a HyMoE layer of token width D, router hidden width H, E experts and
    FFN hidden width F, every linear map stored as (in, out) (shapes: :meth:`shapes`):

    * router:    logits = gelu(x @ router_w1 + router_b1) @ router_w2 + router_b2
    * expert e:  gelu(x @ expert_w1[e] + expert_b1[e]) @ expert_w2[e] + expert_b2[e]
    * dense FFN: gelu(x @ dense_w1 + dense_b1) @ dense_w2 + dense_b2
    """

    router_w1: Tensor     # (D, H)
    router_b1: Tensor     # (H,)
    router_w2: Tensor     # (H, E)
    router_b2: Tensor     # (E,)
    expert_w1: Tensor     # (E, D, F)
    expert_b1: Tensor     # (E, F)
    expert_w2: Tensor     # (E, F, D)
    expert_b2: Tensor     # (E, D)
    dense_w1: Tensor      # (D, F)
    dense_b1: Tensor      # (F,)
    dense_w2: Tensor      # (F, D)
    dense_b2: Tensor      # (D,)

    @classmethod
    def shapes(cls, D: int, H: int, E: int, F: int) -> HyMoEWeights:
        """Each weight's shape, a tuple of ints in each field."""
        return cls((D, H), (H,), (H, E), (E,), (E, D, F), (E, F), (E, F, D), (E, D),
                   (D, F), (F,), (F, D), (D,))

    @classmethod
    def fan_in(cls, D: int, H: int, E: int, F: int) -> HyMoEWeights:
        """Each weight's fan-in, an int in each field: the input width of the linear map it
        belongs to (nn.Linear draws weight and bias from U(-b, b), b = fan_in ** -0.5)."""
        return cls(D, D, H, H, D, D, F, F, D, D, F, F)

    def sizes(self) -> tuple[int, int, int, int]:
        """(D, H, E, F) as router_w1 (D, H) and expert_w1 (E, D, F) give them (-1 for a size
        whose tensor has another number of dimensions)."""
        D, H = self.router_w1.shape if self.router_w1.dim() == 2 else (-1, -1)
        E, _, F = self.expert_w1.shape if self.expert_w1.dim() == 3 else (-1, -1, -1)
        return D, H, E, F

    def validate(self, x: Tensor, same_dtype: bool = False) -> tuple[int, int, int, int]:
        """Check the weights against tokens x (N, D): each of :meth:`shapes` for x's D and
        the H, E, F of :meth:`sizes`, on x's device (and of x's dtype if ``same_dtype``).
        Returns (D, H, E, F); raises ValueError naming the first weight that does not fit."""
        D = x.shape[-1]
        _, H, E, F = self.sizes()
        for name, weight, shape in zip(self._fields, self, self.shapes(D, H, E, F)):
            if tuple(weight.shape) != shape:
                raise ValueError(f"{name} must have shape {shape} for x of shape "
                                 f"{tuple(x.shape)}, got {tuple(weight.shape)}")
            if weight.device != x.device or (same_dtype and weight.dtype != x.dtype):
                raise ValueError(f"{name} must be {x.dtype if same_dtype else 'a tensor'} on "
                                 f"{x.device} like x, got {weight.dtype} on {weight.device}")
        return D, H, E, F

    def to(self, dtype: torch.dtype) -> HyMoEWeights:
        """Every weight cast to ``dtype`` (differentiably; no copy where it already is)."""
        return type(self)(*(weight.to(dtype) for weight in self))

    @property
    def router(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(router_w1, router_b1, router_w2, router_b2)."""
        return self[0:4]

    @property
    def experts(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(expert_w1, expert_b1, expert_w2, expert_b2), expert e at index e of each."""
        return self[4:8]

    @property
    def dense(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(dense_w1, dense_b1, dense_w2, dense_b2)."""
        return self[8:12]


def check_kernel_inputs(x: Tensor, mask: Tensor | None, weights: HyMoEWeights,
                        alpha_param: Tensor, ramp: Tensor, top_k: int,
                        same_dtype: bool = False) -> tuple[int, int, int, int, int]:
    """The argument checks of the Triton paths (ValueError naming the argument): x (N, D)
    float32/bfloat16/float16, ``weights.validate(x, same_dtype)``, mask (N,) bool on x's
    device or None, alpha_param and ramp 0-d tensors, top_k an int in 1..E.
    Returns (N, D, H, E, F)."""
    if x.dim() != 2 or x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"x must be a 2-d float32/bfloat16/float16 tensor, got "
                         f"{tuple(x.shape)} {x.dtype}")
    N = x.shape[0]
    D, H, E, F = weights.validate(x, same_dtype)
    if mask is not None and (mask.shape != (N,) or mask.dtype != torch.bool
                             or mask.device != x.device):
        raise ValueError(f"mask must be a bool tensor of shape ({N},) on {x.device}, got "
                         f"{tuple(mask.shape)} {mask.dtype} on {mask.device}")
    for name, scalar in (("alpha_param", alpha_param), ("ramp", ramp)):
        if not isinstance(scalar, Tensor) or scalar.dim() != 0:
            raise ValueError(f"{name} must be a 0-d tensor, got {scalar!r}")
    if not isinstance(top_k, int) or not 1 <= top_k <= E:
        raise ValueError(f"top_k must be an int in 1..{E} (the experts), got top_k={top_k!r}")
    return N, D, H, E, F
