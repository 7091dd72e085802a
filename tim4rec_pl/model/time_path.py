"""The causal, scale-free time path of TiM4Rec (``time_path: causal``; issue #8, beyond SPEC §3).

The reference time path (SPEC §3, §9) normalises absolute gaps over the padded sequence axis and mixes positions
with Linear(L -> L) layers. This one keeps its idea — the time gap before an interaction modulates the SSD step
size, so it reshapes the structured mask ``M[t, s] = C_t.B_s exp(A sum(delta_(s+1..t)))`` — with causal,
position-free operations only:

    g_t     = log1p(max(t_t - t_(t-1), 0))            0 at the first real position and at padding
    e_t     = Dropout(SiLU(causal depthwise conv_K(g)_t))        (T channels; sees g_(t-K+1..t))
    delta_t = softplus(dt_t + W e_t + b + dt_bias) * valid_t     per head; 0 at padding

With ``delta_t = 0`` the SSD state passes a padding position unchanged (decay exp(0) = 1, no input), and the
convolution inputs are zeroed at padding, so the output at a real position depends on neither how much padding
precedes or follows it nor on anything later: the path runs on any window length and steps one interaction at a
time (`tim4rec_pl.model.streaming`). Since softplus(v) ~ e^v for small v, the additive term scales the step
size multiplicatively: ``delta ~ softplus(dt + dt_bias) * exp(W e_t + b)``; a continuous-time discretisation
(``delta`` proportional to elapsed time) is the special case ``W e_t ~ g_t``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tim4rec_pl.model.layers import causal_conv_channels_last


class TimeContext(NamedTuple):
    """What the causal path carries through the layers: which positions are real, and their gap features."""

    valid: Tensor  # (B, L) bool, item != 0
    gaps: Tensor  # (B, L) float32 or float64, g_t = log1p(gap seconds); 0 at the first real position and at padding


def gap_features(item_seq: Tensor, timestamps: Tensor) -> TimeContext:
    """Scale-free, padding-free gap features of a batch in any padding layout (left, right or none).

    Args:
        item_seq: (B, L) long, 0 = padding.
        timestamps: (B, L) seconds (any value on padding).

    Returns:
        TimeContext with ``valid`` (B, L) bool and ``gaps`` (B, L), float32 (float64 for float64 timestamps).
    """
    valid = item_seq != 0  # (B, L)
    t = timestamps.to(torch.promote_types(timestamps.dtype, torch.float32))  # (B, L)
    diff = torch.zeros_like(t)
    diff[:, 1:] = t[:, 1:] - t[:, :-1]  # exact in float32 for nearby Unix seconds (Sterbenz)
    has_prev = torch.zeros_like(valid)
    has_prev[:, 1:] = valid[:, :-1]
    keep = valid & has_prev  # a gap needs a real previous interaction inside the window
    gaps = torch.log1p(diff.clamp(min=0).masked_fill(~keep, 0.0))  # (B, L)
    return TimeContext(valid, gaps)


def step_gap(last_time: Tensor, started: Tensor, timestamp: Tensor) -> Tensor:
    """The gap feature of one new interaction per row, (B,): as `gap_features` computes it in a window.

    Args:
        last_time: (B,) timestamp of each row's previous interaction.
        started: (B,) bool, whether the row has a previous interaction.
        timestamp: (B,) timestamp of the new interaction.
    """
    dtype = torch.promote_types(timestamp.dtype, torch.float32)
    diff = timestamp.to(dtype) - last_time.to(dtype)
    return torch.log1p(diff.clamp(min=0).masked_fill(~started, 0.0))  # (B,)


class CausalTimeScale(nn.Module):
    """Per-layer step-size modulation from the gap features: g (B, L) -> additive dt term (B, L, H)."""

    def __init__(self, nheads: int, time_dim: int, d_conv: int, time_dropout: float) -> None:
        super().__init__()
        # Conv1d(1 -> T) over time, written as a depthwise conv of g copied to T channels (the fast CPU kernel).
        self.conv = nn.Conv1d(time_dim, time_dim, d_conv, groups=time_dim)
        self.dropout = nn.Dropout(time_dropout)
        self.proj = nn.Linear(time_dim, nheads)
        self.time_dim = time_dim

    def forward(self, gaps: Tensor) -> Tensor:
        g = gaps.to(self.proj.weight.dtype).unsqueeze(-1).expand(-1, -1, self.time_dim).contiguous()  # (B, L, T)
        e = self.dropout(F.silu(causal_conv_channels_last(g, self.conv)))  # (B, L, T)
        return self.proj(e)  # (B, L, H)

    def step(self, window: Tensor) -> Tensor:
        """One position from the last K gap features, (B, K) oldest first -> (B, H) (eval mode)."""
        w = self.conv.weight[:, 0, :]  # (T, K)
        e = F.silu(window.to(w.dtype) @ w.T + self.conv.bias)  # (B, T)
        return self.proj(self.dropout(e))  # (B, H)
