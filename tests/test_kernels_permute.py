"""Counting sort of token slots by expert (kernels/permute.py)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from hymoe_kernels.kernels.grouped_gemm import GROUP_PAD
from hymoe_kernels.kernels.permute import PERMUTE_CONFIGS, padded_rows, sort_slots_by_expert
from kernel_cases import poisoned_outputs, random_ids


def check_layout(ids: torch.Tensor, num_experts: int, config) -> None:
    with poisoned_outputs():
        routing = sort_slots_by_expert(ids, num_experts, config=config)
    N, top_k = ids.shape
    flat = ids.reshape(-1).long().cpu()
    row_slot, slot_row = routing.row_slot.long().cpu(), routing.slot_row.long().cpu()
    start, count = routing.group_start.long().cpu(), routing.group_count.long().cpu()
    assert routing.top_k == top_k and row_slot.shape == (padded_rows(N * top_k, num_experts),)
    assert torch.equal(count, torch.bincount(flat, minlength=num_experts))
    padded = (count + GROUP_PAD - 1) // GROUP_PAD * GROUP_PAD
    assert torch.equal(start, torch.cat([torch.zeros(1, dtype=torch.long), padded.cumsum(0)]))
    used = torch.zeros(row_slot.shape[0], dtype=torch.bool)
    for e in range(num_experts):
        slots = row_slot[start[e]:start[e] + count[e]]
        # exactly the slots routed to e, in slot order (stable sort)
        assert torch.equal(slots, (flat == e).nonzero().flatten())
        used[start[e]:start[e] + count[e]] = True
    assert (row_slot[~used] == -1).all()
    assert torch.equal(row_slot[slot_row], torch.arange(N * top_k))


@pytest.mark.parametrize("config", PERMUTE_CONFIGS)
@settings(max_examples=6, deadline=None)
@given(N=st.integers(0, 150), E=st.integers(1, 16), k_frac=st.floats(0, 1),
       seed=st.integers(0, 2 ** 31))
def test_sort_matches_stable_sort(config, N, E, k_frac, seed):
    top_k = 1 + int(k_frac * (E - 1))
    check_layout(random_ids(N, E, top_k, torch.Generator().manual_seed(seed)), E, config)


def test_many_blocks_and_skewed_experts():
    # > 64 blocks of slots (several steps of the offsets pass); expert 2 gets most slots,
    # expert 0 none
    gen = torch.Generator().manual_seed(0)
    ids = torch.where(torch.rand(2100, 2, generator=gen) < 0.9, 2, 1)
    ids[:, 1] = 3 - ids[:, 0] + (torch.rand(2100, generator=gen) < 0.5).long() * 2  # distinct
    check_layout(ids.to(torch.int32).to(random_ids(1, 1, 1).device).contiguous(), 5,
                 PERMUTE_CONFIGS[-1])


def test_deterministic():
    ids = random_ids(300, 7, 3, torch.Generator().manual_seed(1))
    first, second = sort_slots_by_expert(ids, 7), sort_slots_by_expert(ids, 7)
    for a, b in zip(first[:4], second[:4]):
        assert torch.equal(a, b)
