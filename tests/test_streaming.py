"""Streaming inference: one interaction at a time equals a full recomputation over the whole history."""

from __future__ import annotations

import math

import pytest
import torch

from tim4rec_pl.errors import UserError
from tim4rec_pl.model.tim4rec import StreamState, TiM4Rec

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one intra-op thread


def net(seed: int = 0, **kw) -> TiM4Rec:
    """A small network with O(1) random parameters (every path carries signal), in eval mode."""
    torch.manual_seed(seed)
    args = dict(max_seq_len=8, d_model=16, d_state=8, head_dim=8, chunk_size=4, time_path="causal", time_dim=6)
    model = TiM4Rec(60, **{**args, **kw})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.rand_like(p) * 1.5 - 1.5)  # slow decays: early items still matter after 40 steps
            elif name.endswith("dt_bias"):
                p.copy_(torch.rand_like(p) * 2.0 - 2.0)
            elif "time_scale.proj.weight" in name:
                p.copy_(torch.randn_like(p) * 0.5)
            elif p.dim() > 1:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]))
    return model.eval()


def histories(users: int, steps: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(users, steps) items, some 0 (no interaction for that user at that step), and float32 Unix seconds."""
    gen = torch.Generator().manual_seed(seed)
    items = torch.randint(1, 60, (users, steps), generator=gen)
    items[torch.rand(users, steps, generator=gen) < 0.2] = 0  # users interact at different steps
    gaps = torch.randint(0, 20000, (users, steps), generator=gen).double()
    gaps[torch.rand(users, steps, generator=gen) < 0.3] = 0.0  # same-second interactions are common (ML-1M)
    ts = (1.6e9 + gaps.cumsum(1)).float()
    return items, ts


@pytest.mark.parametrize(
    "kw", [{}, {"is_time": False}, {"num_layers": 1, "is_ffn": False}, {"time_path": "reference", "is_time": False}],
    ids=["causal", "ssd4rec-masked", "one-layer-no-ffn", "ssd4rec-reference"],
)  # fmt: skip
def test_steps_equal_full_recomputation(kw):
    model = net(**kw)
    users, steps = 3, 40  # 5 x max_seq_len and 10 x chunk_size: nothing is tied to either
    items, ts = histories(users, steps)
    state = model.init_state(users)
    shapes = [tuple(t.shape) for t in state.conv + state.ssd + [state.gaps]]
    worst = 0.0
    with torch.no_grad():
        for t in range(steps):
            state, scores = model.step(state, items[:, t], ts[:, t])  # (users, num_items)
            assert [tuple(x.shape) for x in state.conv + state.ssd + [state.gaps]] == shapes  # constant size
            for u in range(users):
                seen = items[u, : t + 1] != 0
                n = int(seen.sum())
                if n == 0:
                    continue
                full = model.score_all(items[u, : t + 1][seen][None], torch.tensor([n]), ts[u, : t + 1][seen][None])
                worst = max(worst, float((scores[u] - full[0]).abs().max()))
    assert worst < 1e-4, worst
    assert state.count.tolist() == (items != 0).sum(1).tolist()


def test_padded_batch_recomputation_and_repr_output():
    """The same check against one right-padded batch, and `output="repr"` is the scores' factor."""
    model = net(seed=1)
    items, ts = histories(2, 12, seed=1)
    items[:, 0] = torch.tensor([3, 4])
    state = model.init_state(2)
    with torch.no_grad():
        for t in range(12):
            state, rep = model.step(state, items[:, t], ts[:, t], output="repr")  # (2, d)
        lens = (items != 0).sum(1)
        seq = torch.zeros_like(items)
        times = torch.zeros_like(ts)
        for u in range(2):
            seq[u, : lens[u]], times[u, : lens[u]] = items[u][items[u] != 0], ts[u][items[u] != 0]
        assert torch.allclose(rep, model(seq, lens, times), atol=1e-4)
        assert torch.allclose(rep @ model.item_embedding.weight.T, model.score_all(seq, lens, times), atol=1e-4)


def test_item_zero_leaves_the_state_unchanged():
    model = net()
    state = model.init_state(2)
    with torch.no_grad():
        state, first = model.step(state, torch.tensor([5, 7]), torch.tensor([1.6e9, 1.6e9]))
        after, again = model.step(state, torch.tensor([0, 9]), torch.tensor([0.0, 1.6e9 + 60]))
    for old, new in zip(state.conv + state.ssd, after.conv + after.ssd):
        assert torch.equal(old[0], new[0]) and not torch.equal(old[1], new[1])
    assert torch.equal(again[0], first[0]) and after.last_time[0] == state.last_time[0]
    assert after.count.tolist() == [1, 2] and isinstance(after.to("cpu"), StreamState)


def test_reference_time_path_cannot_stream():
    model = TiM4Rec(60, max_seq_len=8, d_model=16, d_state=8, head_dim=8)
    assert not model.supports_streaming
    with pytest.raises(UserError, match="time_path='causal'"):
        model.init_state(1)
