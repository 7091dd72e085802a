"""Metrics against hand-computed ranks and values (docs/evaluation.md)."""

import math

import pytest
import torch

from tim4rec_pl.errors import UserError
from tim4rec_pl.metrics import FullRankMetrics, full_ranks, topk_items


def test_ranks_hand_computed_with_ties_and_padding():
    # 1-d representations make the scores readable: score(item) = weight[item].
    weight = torch.tensor([[100.0], [0.5], [0.9], [0.1], [0.9], [0.3]])  # item 0 is padding and must never count
    user = torch.ones(4, 1)
    target = torch.tensor([2, 4, 3, 1])
    # item 2 (0.9) ties with item 4: a tie is not strictly higher -> rank 0 for both; item 3 (0.1): 4 items above;
    # item 1 (0.5): items 2 and 4 above -> 2.
    expected = torch.tensor([0, 0, 4, 2])
    for block in (1, 2, 3, 100):
        assert torch.equal(full_ranks(user, weight, target, block_size=block), expected)


def test_block_ranks_equal_brute_force_on_random_data():
    gen = torch.Generator().manual_seed(0)
    user = torch.randn(37, 16, generator=gen)
    weight = torch.randn(1001, 16, generator=gen)
    target = torch.randint(1, 1001, (37,), generator=gen)
    scores = user @ weight.T
    scores[:, 0] = -math.inf
    brute = (scores > scores.gather(1, target[:, None])).sum(1)
    for block in (7, 64, 1000, 5000):
        assert torch.equal(full_ranks(user, weight, target, block_size=block), brute)


def test_metric_values_hand_computed():
    metric = FullRankMetrics(ks=[10, 20, 50])
    ranks = torch.tensor([0, 3, 9, 10, 49, 50])
    metric.update(ranks[:2])
    metric.update(ranks[2:])  # several updates accumulate
    out = metric.compute()
    n = 6.0
    assert out["hr@10"].item() == pytest.approx(3 / n)
    assert out["hr@20"].item() == pytest.approx(4 / n)
    assert out["hr@50"].item() == pytest.approx(5 / n)
    assert out["ndcg@10"].item() == pytest.approx((1 / math.log2(2) + 1 / math.log2(5) + 1 / math.log2(11)) / n)
    assert out["ndcg@20"].item() == pytest.approx(
        (1 / math.log2(2) + 1 / math.log2(5) + 1 / math.log2(11) + 1 / math.log2(12)) / n
    )
    assert out["mrr@10"].item() == pytest.approx((1 + 1 / 4 + 1 / 10) / n)
    assert out["mrr@50"].item() == pytest.approx((1 + 1 / 4 + 1 / 10 + 1 / 11 + 1 / 50) / n)


def test_metric_is_exact_when_split_across_processes():
    ranks = torch.randint(0, 200, (1000,), generator=torch.Generator().manual_seed(1))
    whole = FullRankMetrics()
    whole.update(ranks)
    parts = [FullRankMetrics() for _ in range(3)]
    for i, part in enumerate(parts):
        part.update(ranks[i::3])
    merged = FullRankMetrics()  # what dist_reduce_fx="sum" does across ranks
    for name in ("hr_sum", "ndcg_sum", "mrr_sum", "count"):
        setattr(merged, name, sum(getattr(p, name) for p in parts))
    a, b = whole.compute(), merged.compute()
    assert all(abs(a[k].item() - b[k].item()) < 1e-12 for k in a)


def test_bad_cutoffs_are_user_errors():
    with pytest.raises(UserError):
        FullRankMetrics(ks=[0, 10])


def test_topk_matches_sort_and_excludes():
    gen = torch.Generator().manual_seed(2)
    user = torch.randn(5, 8, generator=gen)
    weight = torch.randn(300, 8, generator=gen)
    scores = user @ weight.T
    scores[:, 0] = -math.inf
    exclude = torch.tensor([[1, 2, 0], [5, 0, 0], [0, 0, 0], [299, 17, 18], [3, 3, 3]])
    masked = scores.clone()
    for row in range(5):
        for item in exclude[row]:
            if item > 0:
                masked[row, item] = -math.inf
    ref_s, ref_i = masked.topk(10, dim=1)
    for block in (13, 64, 1000):
        got_s, got_i = topk_items(user, weight, 10, exclude=exclude, block_size=block)
        assert torch.equal(got_i, ref_i)
        assert torch.allclose(got_s, ref_s)
