"""Streamed scoring: target_ranks (the rank counts of full scores) on hand-computed rankings,
and the streamed rankings (streaming_rank, streaming_topk) against target_ranks and full
scores."""
import pytest
import torch
import torch.nn.functional as F

from hymoe_kernels.cross_entropy import (NonFiniteScoresError, streaming_rank, streaming_topk,
                                         target_ranks)


def test_target_ranks_count_higher_and_tied_items_and_ignore_padding():
    scores = torch.tensor([[9.0, 0.1, 0.5, 0.3, 0.9],
                           [9.0, 0.4, 0.3, 0.2, 0.1],
                           [9.0, 0.3, 0.5, 0.3, 0.3]])
    ranks = target_ranks(scores, torch.tensor([2, 4, 1]))
    # column 0 (padding) never outranks a target; the target never ties with itself
    assert ranks.tolist() == [[1, 0], [3, 0], [1, 2]]


def test_history_is_removed_from_the_ranking_but_never_the_target():
    scores = torch.tensor([[0.0, 0.9, 0.8, 0.7, 0.6, 0.5]])
    assert target_ranks(scores, torch.tensor([5])).tolist() == [[4, 0]]
    history = torch.tensor([[1, 3, 5, 0]])  # padded with 0
    assert target_ranks(scores, torch.tensor([5]), history).tolist() == [[2, 0]]  # items 2, 4
    history_with_target_only = torch.tensor([[2]])
    assert target_ranks(scores, torch.tensor([2]), history_with_target_only).tolist() == [[1, 0]]
    tied = torch.tensor([[0.0, 0.5, 0.5, 0.5, 0.9, 0.5]])
    assert target_ranks(tied, torch.tensor([2]), torch.tensor([[3]])).tolist() == [[1, 2]]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scores_are_an_error_not_a_metric(bad):
    scores = torch.rand(3, 8)
    scores[1, 5] = bad
    with pytest.raises(NonFiniteScoresError):
        target_ranks(scores, torch.tensor([1, 2, 3]))
    scores[1, 5] = 0.5
    scores[:, 0] = -float("inf")  # padding's own score is never ranked
    assert target_ranks(scores, torch.tensor([1, 2, 3])).shape == (3, 2)


def scoring_inputs(n_rows, n_items, dim, seed):
    """hidden (n_rows, dim), item embeddings (n_items, dim) and targets (n_rows,) in
    [0, n_items)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_rows, dim, generator=gen)
    weight = torch.randn(n_items, dim, generator=gen) * 0.5
    return hidden, weight, torch.randint(0, n_items, (n_rows,), generator=gen)


def full_score_ranks(hidden, weight, target, exclude=None, padding_idx=None):
    """The oracle of streaming_rank: target_ranks of the full scores hidden @ weight.T. Item
    i is column i + 1 (target_ranks' column 0 is padding, never ranked); padding_idx and
    the entries of exclude (negative ones: padding) are the history it leaves out."""
    scores = F.pad(hidden @ weight.T, (1, 0))
    left_out = [] if exclude is None else [exclude.clamp(min=-1) + 1]
    if padding_idx is not None:
        left_out.append(torch.full((len(target), 1), padding_idx + 1))
    return target_ranks(scores, target + 1, torch.cat(left_out, 1) if left_out else None)


def masked_full_scores(hidden, weight, exclude=None, padding_idx=None):
    """The oracle of streaming_topk: the full scores (M, V), excluded items -inf."""
    scores = hidden.float() @ weight.float().T
    if padding_idx is not None:
        scores[:, padding_idx] = float("-inf")
    if exclude is not None:
        for row, ids in enumerate(exclude.tolist()):
            for item in ids:
                if item >= 0:
                    scores[row, item] = float("-inf")
    return scores


def make_history(n_rows, n_items, length, seed, pad=0):
    """(n_rows, length) item ids in [1, n_items), each row's tail padded with ``pad``."""
    gen = torch.Generator().manual_seed(seed)
    history = torch.randint(1, n_items, (n_rows, length), generator=gen)
    lengths = torch.randint(0, length + 1, (n_rows,), generator=gen)
    history[torch.arange(length)[None, :] >= lengths[:, None]] = pad
    return history


@pytest.mark.parametrize("chunk_size", [9, 50, None])
@pytest.mark.parametrize("with_exclusion", [False, True])
def test_streaming_topk_matches_topk(chunk_size, with_exclusion):
    hidden, weight, _ = scoring_inputs(33, 101, 12, seed=10)
    exclude = make_history(33, 101, 6, seed=11) if with_exclusion else None
    padding_idx = 0 if with_exclusion else None
    scores, ids = streaming_topk(hidden, weight, 10, exclude=exclude, padding_idx=padding_idx,
                                 chunk_size=chunk_size)
    full = masked_full_scores(hidden, weight, exclude, padding_idx)
    want_scores, want_ids = full.topk(10, dim=1)
    torch.testing.assert_close(scores, want_scores, rtol=1e-5, atol=1e-6)
    # ids where the score is unique in its row (random floats: all of them)
    gaps = (want_scores[:, :-1] - want_scores[:, 1:]).abs()
    unique = torch.ones_like(want_ids, dtype=torch.bool)
    unique[:, :-1] &= gaps > 1e-4
    unique[:, 1:] &= gaps > 1e-4
    assert unique.float().mean() > 0.9
    assert torch.equal(ids[unique], want_ids[unique])
    if with_exclusion:
        assert not (ids == 0).any()
        assert not (ids[:, :, None] == exclude[:, None, :]).any()


def test_streaming_topk_with_ties_returns_tied_scores():
    weight = torch.tensor([[1.0], [2.0], [2.0], [0.0], [2.0], [1.0]])
    hidden = torch.tensor([[1.0], [-1.0]])
    scores, ids = streaming_topk(hidden, weight, 3, chunk_size=2)
    assert torch.equal(scores, torch.tensor([[2.0, 2.0, 2.0], [0.0, -1.0, -1.0]]))
    assert sorted(ids[0].tolist()) == [1, 2, 4]
    assert ids[1, 0] == 3 and sorted(ids[1, 1:].tolist()) == [0, 5]


def test_streaming_topk_fewer_admissible_items_than_k():
    hidden, weight, _ = scoring_inputs(2, 5, 4, seed=12)
    exclude = torch.tensor([[1, 2, 3], [-1, -1, -1]])
    scores, ids = streaming_topk(hidden, weight, 3, exclude=exclude, padding_idx=0, chunk_size=2)
    assert ids[0, 0] == 4 and (ids[0, 1:] == -1).all() and torch.isinf(scores[0, 1:]).all()
    assert set(ids[1].tolist()) <= {1, 2, 3, 4} and not torch.isinf(scores[1]).any()


@pytest.mark.parametrize("chunk_size", [7, None])
@pytest.mark.parametrize("with_exclusion", [False, True])
def test_streaming_rank_equals_target_ranks_of_the_full_scores(chunk_size, with_exclusion):
    hidden, weight, target = scoring_inputs(40, 90, 10, seed=13)
    target[0] = 0
    exclude = make_history(40, 90, 5, seed=14) if with_exclusion else None
    padding_idx = 0 if with_exclusion else None
    if with_exclusion:
        exclude[1, 0] = target[1]  # a target listed in the history is still ranked
    got = streaming_rank(hidden, weight, target, exclude=exclude, padding_idx=padding_idx,
                         chunk_size=chunk_size)
    assert got.dtype == torch.int64
    assert torch.equal(got, full_score_ranks(hidden, weight, target, exclude, padding_idx))


def test_streaming_rank_counts_ties_apart_from_higher_items():
    # integer embeddings: every path computes the scores exactly
    weight = torch.tensor([[3.0, 0.0], [1.0, 1.0], [2.0, 0.0], [0.0, 2.0], [5.0, 0.0]])
    hidden = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    target = torch.tensor([2, 0])
    got = streaming_rank(hidden, weight, target, chunk_size=2)
    # row 0 scores 3,2,2,2,5 -> 3 and 5 beat the target's 2, items 1 and 3 tie with it;
    # row 1 scores 3,1,2,0,5 -> only 5 beats 3, nothing ties
    assert got.tolist() == [[2, 2], [1, 0]]
    got = streaming_rank(hidden, weight, target, exclude=torch.tensor([[4], [4]]), padding_idx=0)
    assert got.tolist() == [[0, 2], [0, 0]]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_streaming_eval_refuses_non_finite_scores(bad):
    hidden, weight, target = scoring_inputs(4, 10, 3, seed=16)
    weight[7, 1] = bad  # one item's score is not finite, in one chunk of several
    with pytest.raises(NonFiniteScoresError, match="NaN or infinite"):
        streaming_rank(hidden, weight, target, chunk_size=3)
    with pytest.raises(NonFiniteScoresError):
        streaming_topk(hidden, weight, 2, chunk_size=3)
    hidden[2, 0] = bad  # a non-finite query: the target's own score is not finite either
    with pytest.raises(NonFiniteScoresError):
        streaming_rank(hidden, weight[:5], target.clamp(max=4))


def test_eval_rejects_bad_input():
    hidden, weight, target = scoring_inputs(4, 10, 3, seed=15)
    with pytest.raises(ValueError, match="k must be"):
        streaming_topk(hidden, weight, 11)
    with pytest.raises(ValueError, match="exclude holds item id 10"):
        streaming_topk(hidden, weight, 2, exclude=torch.full((4, 2), 10))
    with pytest.raises(ValueError, match="exclude must be"):
        streaming_topk(hidden, weight, 2, exclude=torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="padding_idx"):
        streaming_rank(hidden, weight, target, padding_idx=10)
    with pytest.raises(ValueError, match="target ids"):
        streaming_rank(hidden, weight, torch.full((4,), -1))
    with pytest.raises(ValueError, match="offset_items holds item id 10"):
        streaming_rank(hidden, weight, target, offset_items=torch.full((4, 2), 10), offset=-1.0)
    with pytest.raises(ValueError, match="offset_items must be"):
        streaming_topk(hidden, weight, 2, offset_items=torch.zeros(3, 2, dtype=torch.long))


def offset_full_scores(hidden, weight, offset_items, offset):
    """The oracle of the seen-item offset: full scores (M, V) with ``offset`` added once to
    each row's listed items (duplicates and the padding id 0 listed or not, once)."""
    scores = hidden.float() @ weight.float().T
    for row, ids in enumerate(offset_items.tolist()):
        for item in set(ids):
            scores[row, item] += offset
    return scores


@pytest.mark.parametrize("chunk_size", [7, None])
def test_streamed_scoring_adds_the_offset_to_each_rows_listed_items(chunk_size):
    hidden, weight, target = scoring_inputs(30, 80, 10, seed=21)
    listed = make_history(30, 80, 6, seed=22)
    listed[:, 1] = listed[:, 0]              # a duplicate id counts once
    listed[2, 0] = target[2]                 # a listed target gets the offset too
    full = offset_full_scores(hidden, weight, listed, -1.5)
    got = streaming_rank(hidden, weight, target, chunk_size=chunk_size, offset_items=listed,
                         offset=torch.tensor(-1.5))
    want = target_ranks(F.pad(full, (1, 0)), target + 1)
    assert torch.equal(got, want)
    scores, ids = streaming_topk(hidden, weight, 5, chunk_size=chunk_size, offset_items=listed,
                                 offset=-1.5)
    want_scores, want_ids = full.topk(5, dim=1)
    torch.testing.assert_close(scores, want_scores, rtol=1e-5, atol=1e-5)
    assert (ids == want_ids).float().mean() > 0.95   # ids may swap only on near-ties
    assert not torch.equal(got, streaming_rank(hidden, weight, target, chunk_size=chunk_size))
