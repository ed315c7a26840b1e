"""The host side of the cross-entropy's Triton kernels: the split of the streamed tiles over
programs and the rows' item bitset."""
import torch
from hypothesis import given, settings, strategies as st

from hymoe_kernels.cross_entropy.lce_triton_kernels import MAX_SPLIT, listed_bitset, pick_split
from hymoe_kernels.cross_entropy.score_chunks import distinct_items


@settings(max_examples=50, deadline=None)
@given(n_tiles=st.integers(1, 3000), n_streamed=st.integers(1, 3000),
       target=st.integers(1, 2000))
def test_pick_split_covers_the_streamed_tiles(n_tiles, n_streamed, target):
    n_split, per_split = pick_split(n_tiles, n_streamed, target)
    assert (n_split - 1) * per_split < n_streamed <= n_split * per_split  # none empty
    # enough programs: the split wanted, capped, is met up to rounding to whole tiles
    wanted = min(MAX_SPLIT, n_streamed, -(-target // n_tiles))
    assert wanted / 2 <= n_split <= wanted


def test_distinct_items_and_their_bitset_hold_each_listed_item_once():
    items = torch.tensor([[0, 7, 8, 8, -1, 19], [3, 3, 3, 20, 25, -1]])
    ids = distinct_items(items, 20)
    assert ids.tolist() == [[-1, 0, 7, 8, -1, 19], [-1, -1, -1, 3, -1, -1]]
    bits = listed_bitset(ids, 20)
    assert bits.dtype == torch.uint8 and bits.shape == (2, 3)
    assert bits.tolist() == [[0b10000001, 0b00000001, 0b00001000], [0b00001000, 0, 0]]
