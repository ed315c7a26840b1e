"""Counting sort of token slots by expert, on the device, with no host round trip.

Slot s = n*top_k + j is token n's j-th choice ``ids[n, j]``. The sort is stable (slots of an
expert keep slot order), deterministic and atomic-free, in three launches:

1. :func:`_slot_histogram_kernel` -- per block of BLOCK_S slots, the count of each expert;
2. :func:`_group_offsets_kernel` -- one program: per-expert totals, group starts padded to
   ``pad`` rows (exclusive prefix sum), and each block's first row for each expert;
3. :func:`_scatter_slots_kernel` -- each slot's row = its block's base for its expert + its
   rank among the block's earlier slots of that expert (a cumulative sum over a one-hot).

The result (:class:`Routing`) has a worst-case size fixed by the shapes:
N*top_k + E*(pad-1) rows, so grids never depend on the routing and no .item() is needed.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..backend import INTERPRETING
from ..kernel_launch import launch_params

# Expert groups start at multiples of GROUP_PAD rows, so that a tile of the grouped GEMMs
# (:mod:`.stage3_expert_gemms`, whose row tiles divide it) lies inside one expert's group.
GROUP_PAD = 64


class Routing(NamedTuple):
    """The expert-sorted slot layout, all int32 on the device.

    row_slot (P,): slot n*top_k + j held by each padded row (-1 on rows past a group's
    count); slot_row (N*top_k,): row of each slot; group_start (E+1,): first row of each
    expert's group (a multiple of GROUP_PAD), group_start[E] = padded total; group_count
    (E,): slots per expert; top_k: slots per token.
    """
    row_slot: Tensor
    slot_row: Tensor
    group_start: Tensor
    group_count: Tensor
    top_k: int


class PermuteConfig(NamedTuple):
    """Launch parameters of the histogram and scatter passes."""
    BLOCK_S: int       # slots per block
    num_warps: int


class OffsetsConfig(NamedTuple):
    """Launch parameters of the single-program offsets pass."""
    BLOCK_B: int       # blocks per step
    num_warps: int


PERMUTE_CONFIGS = (
    PermuteConfig(BLOCK_S=256, num_warps=4),
    PermuteConfig(BLOCK_S=64, num_warps=2),
)
OFFSETS_CONFIGS = (
    OffsetsConfig(BLOCK_B=64, num_warps=4),
)


@triton.jit
def _slot_histogram_kernel(ids_ptr, block_counts_ptr, num_slots,
                           E_POW2: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)
    slots = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    experts = tl.load(ids_ptr + slots, mask=slots < num_slots, other=-1)
    onehot = (experts[:, None] == tl.arange(0, E_POW2)[None, :]).to(tl.int32)
    tl.store(block_counts_ptr + pid * E_POW2 + tl.arange(0, E_POW2), tl.sum(onehot, axis=0))


@triton.jit
def _group_offsets_kernel(block_counts_ptr, block_base_ptr, group_start_ptr, group_count_ptr,
                          num_blocks, num_experts, PAD: tl.constexpr, E_POW2: tl.constexpr,
                          BLOCK_B: tl.constexpr):
    experts = tl.arange(0, E_POW2)
    totals = tl.zeros((E_POW2,), dtype=tl.int32)
    for b0 in range(0, num_blocks, BLOCK_B):
        blocks = b0 + tl.arange(0, BLOCK_B)
        counts = tl.load(block_counts_ptr + blocks[:, None] * E_POW2 + experts[None, :],
                         mask=(blocks < num_blocks)[:, None], other=0)
        totals += tl.sum(counts, axis=0)
    padded = (totals + PAD - 1) // PAD * PAD
    starts = tl.cumsum(padded, axis=0) - padded
    expert_ok = experts < num_experts
    tl.store(group_start_ptr + experts, starts, mask=expert_ok)
    tl.store(group_start_ptr + num_experts, tl.sum(padded, axis=0))
    tl.store(group_count_ptr + experts, totals, mask=expert_ok)
    running = starts
    for b0 in range(0, num_blocks, BLOCK_B):
        blocks = b0 + tl.arange(0, BLOCK_B)
        block_ok = (blocks < num_blocks)[:, None]
        counts = tl.load(block_counts_ptr + blocks[:, None] * E_POW2 + experts[None, :],
                         mask=block_ok, other=0)
        bases = running[None, :] + tl.cumsum(counts, axis=0) - counts
        tl.store(block_base_ptr + blocks[:, None] * E_POW2 + experts[None, :], bases, mask=block_ok)
        running += tl.sum(counts, axis=0)


@triton.jit
def _scatter_slots_kernel(ids_ptr, block_base_ptr, row_slot_ptr, slot_row_ptr, num_slots,
                          E_POW2: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)
    slots = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    slot_ok = slots < num_slots
    experts = tl.load(ids_ptr + slots, mask=slot_ok, other=-1)
    onehot = (experts[:, None] == tl.arange(0, E_POW2)[None, :]).to(tl.int32)
    rank = tl.sum((tl.cumsum(onehot, axis=0) - onehot) * onehot, axis=1)
    bases = tl.load(block_base_ptr + pid * E_POW2 + tl.arange(0, E_POW2))
    rows = tl.sum(onehot * bases[None, :], axis=1) + rank
    tl.store(slot_row_ptr + slots, rows, mask=slot_ok)
    tl.store(row_slot_ptr + rows, slots, mask=slot_ok)


def padded_rows(num_slots: int, num_experts: int) -> int:
    """Worst-case number of rows of the padded expert-sorted layout."""
    return num_slots + num_experts * (GROUP_PAD - 1)


def pick_permute_config(num_slots: int) -> PermuteConfig:
    """Config from :data:`PERMUTE_CONFIGS` for ``num_slots`` slots."""
    return PERMUTE_CONFIGS[0] if INTERPRETING or num_slots >= 4096 else PERMUTE_CONFIGS[1]


def sort_slots_by_expert(ids: Tensor, num_experts: int,
                         config: PermuteConfig | None = None) -> Routing:
    """Expert-sorted slot layout of ``ids`` (N, top_k) int32 contiguous (values in [0, E),
    as the routers guarantee: an id outside would collide with another slot's row).

    Returns a :class:`Routing` with row_slot of length :func:`padded_rows` (-1 on padding
    rows, i.e. rows beyond a group's count); groups start at multiples of ``GROUP_PAD``.
    config: one of :data:`PERMUTE_CONFIGS` (default :func:`pick_permute_config`).
    """
    num_tokens, top_k = ids.shape
    num_slots = num_tokens * top_k
    e_pow2 = triton.next_power_of_2(num_experts)
    config = config or pick_permute_config(num_slots)
    num_blocks = triton.cdiv(num_slots, config.BLOCK_S)
    device = ids.device
    block_counts = torch.empty(num_blocks, e_pow2, device=device, dtype=torch.int32)
    block_base = torch.empty(num_blocks, e_pow2, device=device, dtype=torch.int32)
    group_start = torch.empty(num_experts + 1, device=device, dtype=torch.int32)
    group_count = torch.empty(num_experts, device=device, dtype=torch.int32)
    row_slot = torch.full((padded_rows(num_slots, num_experts),), -1, device=device,
                          dtype=torch.int32)
    slot_row = torch.empty(num_slots, device=device, dtype=torch.int32)
    if num_blocks > 0:
        _slot_histogram_kernel[(num_blocks,)](ids, block_counts, num_slots, E_POW2=e_pow2,
                                              **launch_params(config))
    _group_offsets_kernel[(1,)](block_counts, block_base, group_start, group_count, num_blocks,
                                num_experts, PAD=GROUP_PAD, E_POW2=e_pow2,
                                **launch_params(OFFSETS_CONFIGS[0]))
    if num_blocks > 0:
        _scatter_slots_kernel[(num_blocks,)](ids, block_base, row_slot, slot_row, num_slots,
                                             E_POW2=e_pow2, **launch_params(config))
    return Routing(row_slot, slot_row, group_start, group_count, top_k)
