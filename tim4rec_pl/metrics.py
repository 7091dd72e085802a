"""Exact full-ranking metrics (docs/evaluation.md), block-wise ranking, and top-K retrieval.

Every user has one target item. Its ``rank`` is the number of items that score strictly higher than the target;
the padding item 0 never counts (its score is treated as -inf), items already in the history are NOT removed:

    HR@K   = [rank < K]                                  (= Recall@K with one target)
    NDCG@K = 1 / log2(rank + 2)   if rank < K else 0
    MRR@K  = 1 / (rank + 1)       if rank < K else 0

Each value is averaged over users. ``FullRankMetrics`` keeps *sums* (and a count) as states reduced with
``dist_reduce_fx="sum"``, so the result under DDP is exactly the single-process result, provided that every
user is evaluated on exactly one rank (the data module's evaluation sampler guarantees it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from tim4rec_pl.errors import UserError

__all__ = ["FullRankMetrics", "full_ranks", "topk_items"]


def _blocks(num_items: int, block_size: int) -> list[tuple[int, int]]:
    """Item-id ranges ``[start, stop)`` covering 1..num_items-1 (the padding item 0 is never scored)."""
    return [(s, min(s + block_size, num_items)) for s in range(1, num_items, block_size)]


@torch.no_grad()
def full_ranks(user_repr: Tensor, item_weight: Tensor, target: Tensor, block_size: int = 65536) -> Tensor:
    """Rank of each target among all non-padding items, without sorting and in bounded memory.

    Args:
        user_repr: (B, d) sequence representations.
        item_weight: (num_items, d) output item embeddings; row 0 is the padding item.
        target: (B,) target item ids in 1..num_items-1.
        block_size: items scored at once; memory is O(B * block_size).

    Returns:
        (B,) long: the number of items scoring strictly higher than the target.
    """
    num_items = item_weight.shape[0]
    blocks = _blocks(num_items, block_size)
    user_repr = user_repr.to(item_weight.dtype)
    if len(blocks) == 1:  # one matmul: the target's score is read from the very scores it is compared with
        scores = user_repr @ item_weight[1:].T  # (B, num_items - 1)
        target_score = scores.gather(1, (target - 1).unsqueeze(1))  # (B, 1)
        return (scores > target_score).sum(1)
    # Several blocks: first read each target's score from the block that holds it (the same GEMM shape as the
    # counting pass, so the comparison is exact), then count the strictly higher scores block by block.
    target_score = torch.empty(target.shape[0], dtype=item_weight.dtype, device=item_weight.device)
    for start, stop in blocks:
        rows = ((target >= start) & (target < stop)).nonzero(as_tuple=True)[0]
        if rows.numel():
            scores = user_repr @ item_weight[start:stop].T  # (B, block)
            target_score[rows] = scores[rows, target[rows] - start]
    ranks = torch.zeros(target.shape[0], dtype=torch.long, device=item_weight.device)
    for start, stop in blocks:
        ranks += ((user_repr @ item_weight[start:stop].T) > target_score.unsqueeze(1)).sum(1)
    return ranks


@torch.no_grad()
def topk_items(
    user_repr: Tensor,
    item_weight: Tensor,
    k: int,
    exclude: Tensor | None = None,
    block_size: int = 65536,
) -> tuple[Tensor, Tensor]:
    """The ``k`` best-scoring non-padding items per row, merged block by block.

    Args:
        user_repr: (B, d) sequence representations.
        item_weight: (num_items, d) output item embeddings; row 0 is the padding item.
        k: how many items to return (at most num_items - 1).
        exclude: optional (B, M) long item ids to leave out per row (0 entries are ignored).
        block_size: items scored at once.

    Returns:
        (scores (B, k), items (B, k)) in descending score order.
    """
    num_items = item_weight.shape[0]
    k = min(k, num_items - 1)
    best_s = torch.full((user_repr.shape[0], 0), float("-inf"), device=item_weight.device)
    best_i = torch.zeros((user_repr.shape[0], 0), dtype=torch.long, device=item_weight.device)
    for start, stop in _blocks(num_items, block_size):
        scores = (user_repr.to(item_weight.dtype) @ item_weight[start:stop].T).float()  # (B, block)
        if exclude is not None:
            local = exclude - start
            valid = (exclude > 0) & (local >= 0) & (local < stop - start)
            rows = torch.arange(exclude.shape[0], device=exclude.device).unsqueeze(1).expand_as(exclude)
            scores[rows[valid], local[valid]] = float("-inf")
        ids = torch.arange(start, stop, device=item_weight.device).expand_as(scores)
        cat_s, cat_i = torch.cat([best_s, scores], 1), torch.cat([best_i, ids], 1)
        top_s, pos = cat_s.topk(min(k, cat_s.shape[1]), dim=1)
        best_s, best_i = top_s, cat_i.gather(1, pos)
    return best_s, best_i


class FullRankMetrics(Metric):
    """HR@K, NDCG@K and MRR@K from target ranks (formulas in the module docstring), exact under DDP.

    ``update(ranks)`` takes the (B,) ranks of :func:`full_ranks`; ``compute()`` returns ``{"hr@10": ..., ...}``.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, ks: Sequence[int] = (10, 20, 50)) -> None:
        super().__init__()
        if not ks or any(int(k) < 1 for k in ks):
            raise UserError(f"metric cut-offs must be positive integers, got {list(ks)}: set e.g. topk: [10, 20, 50]")
        self.ks = sorted({int(k) for k in ks})
        # float64 sums keep the averages exact to ~1e-12 whatever the number of users.
        for name in ("hr", "ndcg", "mrr"):
            self.add_state(f"{name}_sum", torch.zeros(len(self.ks), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, ranks: Tensor) -> None:
        ranks = ranks.to(torch.float64).unsqueeze(0)  # (1, B)
        ks = torch.tensor(self.ks, dtype=torch.float64, device=ranks.device).unsqueeze(1)  # (K, 1)
        hit = (ranks < ks).to(torch.float64)  # (K, B)
        self.hr_sum += hit.sum(1)
        self.ndcg_sum += (hit / torch.log2(ranks + 2.0)).sum(1)
        self.mrr_sum += (hit / (ranks + 1.0)).sum(1)
        self.count += ranks.shape[1]

    def compute(self) -> dict[str, Tensor]:
        count = self.count.clamp_min(1.0)
        out: dict[str, Tensor] = {}
        for name in ("hr", "ndcg", "mrr"):
            values = getattr(self, f"{name}_sum") / count
            for i, k in enumerate(self.ks):
                out[f"{name}@{k}"] = values[i]
        return out
