"""Counting sort of token slots by expert (hymoe_op/stage2_permutation.py)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from hymoe_kernels.hymoe_op.stage2_permutation import (GROUP_PAD, PERMUTE_CONFIGS, padded_rows,
                                                      sort_slots_by_expert)
from kernel_cases import DEVICE, poisoned_outputs, random_ids

# Token counts of the sort sweep: 0 and 1 tokens, block edges; on a GPU also the sizes where
# the large config takes over (4096 slots) and many blocks (the offsets pass loops over them).
SWEEP_TOKENS = (0, 1, 2, 65, 300) + ((2047, 2048, 2049, 70_000, 600_000) if DEVICE == "cuda"
                                     else ())


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


@pytest.mark.skipif(DEVICE != "cuda", reason="the interpreter runs a launch's programs one "
                    "after another, so an order-dependent result could not show; on a GPU "
                    "they run concurrently")
def test_deterministic():
    """The same ids give the same layout, bit for bit, run after run (no atomics, no
    order-dependent writes), over many concurrently running blocks of slots."""
    ids = random_ids(20_000, 7, 3, torch.Generator().manual_seed(1))
    first = sort_slots_by_expert(ids, 7)
    for _ in range(3):
        again = sort_slots_by_expert(ids, 7)
        for a, b in zip(first[:4], again[:4]):
            assert torch.equal(a, b)


def sweep_ids(N: int, E: int, pattern: str) -> torch.Tensor:
    """(N, top_k) int32 ids: "random" (top_k = min(2, E), distinct per token), "one_expert"
    (top_k = 1, every slot to the last expert), "two_experts" (top_k = 2, every token to
    experts E-1 and 0)."""
    if pattern == "random":
        return random_ids(N, E, min(2, E), torch.Generator().manual_seed(N + E))
    columns = [E - 1] if pattern == "one_expert" else [E - 1, 0]
    return torch.tensor(columns, dtype=torch.int32, device=DEVICE).repeat(N, 1).contiguous()


@pytest.mark.parametrize("N", SWEEP_TOKENS)
@pytest.mark.parametrize("E", [1, 3, 5, 16, 33])
@pytest.mark.parametrize("pattern", ["random", "one_expert", "two_experts"])
def test_sort_sweep(pattern, E, N):
    """Sizes and skews the GPU must sort like the interpreter: E not a power of two (and
    beyond 32), every slot to one expert, 0 and 1 tokens; the picker's own config."""
    if pattern == "two_experts" and E == 1:
        pytest.skip("two distinct experts need E >= 2")
    check_layout(sweep_ids(N, E, pattern), E, None)
