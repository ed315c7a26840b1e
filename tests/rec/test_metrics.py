"""Full-ranking metrics on hand-computed rankings, popularity groups, and the evaluation
loop's batching, on rank counts of full scores (target_ranks)."""
import math

import numpy as np
import pytest
import torch

from hymoe_kernels.cross_entropy import target_ranks
from hymoerec.metrics import (evaluate_ranking, expected_rank, head_items, hit_rates, ndcg_gains,
                              popularity_metrics, rank_metrics, rank_targets)


def test_rank_metrics_by_hand():
    m = rank_metrics(np.array([[0, 0], [3, 0], [7, 0], [30, 0]]))
    assert m["HR@5"] == pytest.approx(2 / 4) and m["HR@10"] == pytest.approx(3 / 4)
    assert m["HR@20"] == pytest.approx(3 / 4)
    assert m["NDCG@5"] == pytest.approx((1 + 1 / math.log2(5)) / 4)
    assert m["NDCG@10"] == pytest.approx((1 + 1 / math.log2(5) + 1 / math.log2(9)) / 4)
    assert math.isnan(rank_metrics(np.zeros((0, 2), dtype=int))["HR@10"])


def test_ties_are_broken_at_random_in_expectation():
    # 3 items above and 4 tied: the rank is uniform on 3..7
    ranks = np.array([[3, 4]])
    assert hit_rates(ranks, 5)[0] == pytest.approx(2 / 5)  # ranks 3 and 4 are in the top 5
    assert hit_rates(ranks, 10)[0] == 1.0 and hit_rates(ranks, 3)[0] == 0.0
    assert ndcg_gains(ranks, 5)[0] == pytest.approx((1 / math.log2(5) + 1 / math.log2(6)) / 5)
    assert ndcg_gains(ranks, 20)[0] == pytest.approx(
        np.mean([1 / math.log2(r + 2) for r in range(3, 8)]))
    assert expected_rank(ranks)[0] == 5.0


def test_a_model_with_equal_scores_ranks_like_chance_never_perfectly():
    n_items, n_users = 500, 40
    scores = torch.zeros(n_users, n_items + 1)  # e.g. a collapsed model: every item ties
    targets = torch.randint(1, n_items + 1, (n_users,))
    m = rank_metrics(target_ranks(scores, targets).numpy())
    assert m["HR@10"] == pytest.approx(10 / n_items) and m["HR@20"] == pytest.approx(20 / n_items)
    assert m["NDCG@10"] < m["HR@10"]


def test_an_evaluation_needs_users_and_a_positive_batch_size():
    def rank_fn(inputs, targets, excluded):
        return torch.zeros(len(targets), 2, dtype=torch.long)
    with pytest.raises(ValueError, match="no users"):
        rank_targets(rank_fn, [], np.zeros(0, dtype=np.int64), max_len=5)
    for batch_size in (0, -1):
        with pytest.raises(ValueError, match="batch size"):
            rank_targets(rank_fn, [np.array([1, 2])], np.array([3]), 5, batch_size=batch_size)


def test_head_items_are_the_top_fifth_by_training_frequency():
    counts = np.array([0, 5, 1, 9, 1, 0, 2, 2, 3, 1, 4])   # 10 items -> 2 head items
    assert np.flatnonzero(head_items(counts)).tolist() == [1, 3]
    m = popularity_metrics(np.array([[0, 0], [40, 0], [2, 0]]), np.array([3, 2, 1]),
                           head_items(counts))
    assert (m["n_head"], m["n_tail"]) == (2, 1)
    assert m["head/HR@5"] == 1.0 and m["tail/HR@5"] == 0.0 and m["HR@5"] == pytest.approx(2 / 3)


def test_evaluate_ranking_matches_a_direct_computation_for_any_batching():
    rng = np.random.default_rng(0)
    n_items, n_users = 30, 25
    table = torch.from_numpy(rng.standard_normal((n_items + 1, n_items + 1))).float()
    histories = [rng.integers(1, n_items + 1, size=rng.integers(1, 8)) for _ in range(n_users)]
    targets = rng.integers(1, n_items + 1, size=n_users)
    head = head_items(np.bincount(np.concatenate(histories), minlength=n_items + 1))

    def score_fn(inputs):  # scores depend on the last real item of each padded row
        last = inputs.gather(1, ((inputs > 0).sum(1) - 1).unsqueeze(1)).squeeze(1)
        return table[last]

    for exclude in (False, True):
        expected = []
        for h, t in zip(histories, targets):
            s = table[h[-3:][-1]].clone()
            s[0] = -math.inf
            if exclude:
                s[[i for i in h if i != t]] = -math.inf
            expected.append([int((s > s[t]).sum()), 0])
        want = popularity_metrics(np.array(expected), targets, head)
        for batch_size in (1, 7, 100):
            got = evaluate_ranking(lambda inputs, t, h: target_ranks(score_fn(inputs), t, h),
                                   histories, targets, head, max_len=3,
                                   exclude_history=exclude, batch_size=batch_size)
            assert got == pytest.approx(want, nan_ok=True)
