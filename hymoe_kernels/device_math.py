"""Triton device functions shared by the kernels: the tensor-core dot, the rounding cast
to 16-bit types, the fp16 range scale of a dot operand, the exact GELU with its derivative,
and the NaN-safe top-k step of the routers.

Triton's CPU interpreter (3.9) has two bf16 faults, worked around under TRITON_INTERPRET=1
only (the branches are compiled away on a GPU): it keeps bf16 as uint16 and multiplies the
raw bits in ``tl.dot``, and its fp32 -> bf16 cast truncates instead of rounding to nearest.
"""
import torch
import triton
import triton.language as tl

from .backend import INTERPRETING

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
def fp16_range_scale(x, dtype: tl.constexpr):
    """(s, 1 / s) for an fp32 tile x about to be rounded to ``dtype`` for a dot: fp32 powers
    of two with s * (largest finite |x|) in [1, 2) when ``dtype`` is float16 and that
    magnitude is below 1 (s <= 2^64), else 1. fp16's 5 exponent bits round values below
    2^-24 to zero, which fp32 gradients (a router's, scaled by 1 / tokens) reach; bf16 has
    fp32's range. Scaling by a power of two is exact, so dot(x * s, .) * (1 / s) loses
    nothing but the underflow. NaN and inf do not take part in the maximum."""
    if dtype == tl.float16:
        magnitude = tl.abs(x)
        largest = tl.max(tl.where(magnitude < float("inf"), magnitude, 0.0))
        biased_exponent = (largest.to(tl.int32, bitcast=True) >> 23) & 0xFF
        shift = tl.where(largest > 0.0, tl.minimum(tl.maximum(127 - biased_exponent, 0), 64), 0)
        return (((127 + shift) << 23).to(tl.float32, bitcast=True),
                ((127 - shift) << 23).to(tl.float32, bitcast=True))
    return 1.0, 1.0


@triton.jit
def without_nan(x):
    """x with NaN replaced by -inf (so a max or a comparison ranks it below every number)."""
    return tl.where(x != x, float("-inf"), x)


@triton.jit
def top_k_step(scores, taken, cols, NUM_COLS: tl.constexpr):
    """One step of a top-k selection along the rows of scores (R, NUM_COLS) fp32.

    taken: bool, broadcastable to scores, True for columns already chosen or not valid;
    every row must have a free column. Returns (best (R,) fp32, col (R,) int32): the
    largest free score (NaN ranks below every number) and its column, ties to the lowest
    column; a row whose free scores are all NaN or -inf gets its lowest free column. So
    TOP_K steps choose TOP_K distinct valid columns whatever the scores (a NaN token
    cannot pick a padding column, which would collide with another token's slot)."""
    free_scores = tl.where(taken, float("-inf"), without_nan(scores))
    best = tl.max(free_scores, axis=1)
    col = tl.min(tl.where(~taken & (free_scores == best[:, None]), cols[None, :], NUM_COLS),
                 axis=1)
    return best, col


@triton.jit
def gelu(x):
    """Exact (erf) GELU of an fp32 tensor."""
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def gelu_and_grad(x):
    """Exact (erf) GELU of an fp32 tensor and its derivative."""
    cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
    return x * cdf, cdf + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
