"""Triton device functions shared by the kernels: the tensor-core dot, the rounding cast
to 16-bit types and the exact GELU with its derivative.

Triton's CPU interpreter (3.9) has two bf16 faults, worked around under TRITON_INTERPRET=1
only (the branches are compiled away on a GPU): it keeps bf16 as uint16 and multiplies the
raw bits in ``tl.dot``, and its fp32 -> bf16 cast truncates instead of rounding to nearest.
"""
import torch
import triton
import triton.language as tl

from . import INTERPRETING

_INTERPRETER_BF16_FIXES = tl.constexpr(INTERPRETING)


def dot_precision(dtype: torch.dtype) -> str:
    """``FP32_PRECISION`` of :func:`mma` for operands of ``dtype``: exact ("ieee") for fp32
    (16-bit operands ignore it)."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def mma(a, b, acc, FP32_PRECISION: tl.constexpr):
    """acc + a @ b (just a @ b when acc is None), accumulated in fp32; a and b share a
    dtype; fp32 operands multiply with ``FP32_PRECISION`` ("ieee", "tf32x3" or "tf32")."""
    if _INTERPRETER_BF16_FIXES:
        if a.dtype == tl.bfloat16:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc, input_precision=FP32_PRECISION)


@triton.jit
def cast_to(x, dtype: tl.constexpr):
    """x cast to ``dtype``, fp32 -> bf16/fp16 rounding to nearest even (as on the GPU)."""
    if _INTERPRETER_BF16_FIXES:
        if dtype == tl.bfloat16:
            if x.dtype == tl.float32:
                bits = x.to(tl.uint32, bitcast=True)
                bits = bits + 0x7FFF + ((bits >> 16) & 1)
                x = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def gelu(x):
    """Exact (erf) GELU of an fp32 tensor."""
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def gelu_and_grad(x):
    """Exact (erf) GELU of an fp32 tensor and its derivative."""
    cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
    return x * cdf, cdf + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
