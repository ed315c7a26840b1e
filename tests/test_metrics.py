"""Full-ranking metrics on hand-computed rankings, history masking, popularity groups."""
import math

import numpy as np
import pytest
import torch

from hymoerec.data import pad_right
from hymoerec.metrics import (evaluate_ranking, head_items, popularity_metrics, rank_metrics,
                              target_ranks)


def test_target_ranks_count_strictly_higher_items_and_ignore_padding():
    scores = torch.tensor([[9.0, 0.1, 0.5, 0.3, 0.9],
                           [9.0, 0.4, 0.3, 0.2, 0.1]])
    ranks = target_ranks(scores, torch.tensor([2, 4]))
    assert ranks.tolist() == [1, 3]  # column 0 (padding) never outranks a target


def test_history_is_removed_from_the_ranking_but_never_the_target():
    scores = torch.tensor([[0.0, 0.9, 0.8, 0.7, 0.6, 0.5]])
    assert target_ranks(scores, torch.tensor([5])).tolist() == [4]
    history = pad_right([np.array([1, 3, 5])], length=4)  # padded with 0
    assert target_ranks(scores, torch.tensor([5]), history).tolist() == [2]  # items 2 and 4
    history_with_target_only = pad_right([np.array([2])])
    assert target_ranks(scores, torch.tensor([2]), history_with_target_only).tolist() == [1]


def test_rank_metrics_by_hand():
    m = rank_metrics(np.array([0, 3, 7, 30]))
    assert m["HR@5"] == pytest.approx(2 / 4) and m["HR@10"] == pytest.approx(3 / 4)
    assert m["HR@20"] == pytest.approx(3 / 4)
    assert m["NDCG@5"] == pytest.approx((1 + 1 / math.log2(5)) / 4)
    assert m["NDCG@10"] == pytest.approx((1 + 1 / math.log2(5) + 1 / math.log2(9)) / 4)
    assert math.isnan(rank_metrics(np.array([], dtype=int))["HR@10"])


def test_head_items_are_the_top_fifth_by_training_frequency():
    counts = np.array([0, 5, 1, 9, 1, 0, 2, 2, 3, 1, 4])   # 10 items -> 2 head items
    assert np.flatnonzero(head_items(counts)).tolist() == [1, 3]
    m = popularity_metrics(np.array([0, 40, 2]), np.array([3, 2, 1]), head_items(counts))
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
            expected.append(int((s > s[t]).sum()))
        want = popularity_metrics(np.array(expected), targets, head)
        for batch_size in (1, 7, 100):
            got = evaluate_ranking(lambda inputs, t, h: target_ranks(score_fn(inputs), t, h),
                                   histories, targets, head, max_len=3,
                                   exclude_history=exclude, batch_size=batch_size)
            assert got == pytest.approx(want, nan_ok=True)
