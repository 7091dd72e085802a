"""TiM4Rec's time paths: how the gap before each interaction changes the SSD's step size.

Every path is two small modules with one interface, so the network and its layers never ask which one they have:

- at network level, ``time(item_seq, timestamps) -> TimeState``: what the layers are told about time;
- in each layer, ``time_scale(dt, state, advance) -> (dt, next state)``: the raw step sizes (B, L, H) changed by
  time, and the state the next layer reads (``advance=False`` for the last layer, whose next state nothing reads);
  ``time_scale.step(dt, state)`` is the same for one position (streaming).

`TimeState.mask` zeroes padding where the path masks it (the causal path), and is the identity otherwise.

The reference path (`ReferenceTime`, `ReferenceTimeScale`) is the paper's, quirks included: the gaps are
LayerNorm-ed over the sequence axis, the step-size scale mixes positions through Linear(L -> L) layers, and the
padding is processed like items (see docs/model.md, "The reference time path"). The causal path (`CausalTime`,
`CausalTimeScale`) keeps its idea with causal, position-free operations only:

    g_t     = log1p(max(t_t - t_(t-1), 0))            0 at the first real position and at padding
    e_t     = Dropout(SiLU(causal depthwise conv_K(g)_t))        (T channels; sees g_(t-K+1..t))
    delta_t = softplus(dt_t + W e_t + b + dt_bias) * valid_t     per head; 0 at padding

With ``delta_t = 0`` the SSD state passes a padding position unchanged, and the convolution inputs are zeroed at
padding, so the output at a real position depends on neither padding nor anything later: the path runs on any
window length and steps one interaction at a time (see docs/model.md, "The causal time path"). The time-less
SSD4Rec* uses `NoTimeScale` in its layers and either network-level module (masked padding with the causal one).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tim4rec_pl.model.layers import Dropout, causal_conv_channels_first, causal_conv_channels_last


class TimeState(NamedTuple):
    """What the time path carries through the layers (fields a path does not use are None)."""

    tau: Tensor | None = None  # reference: (B, H, L) time features, changed by each layer
    valid: Tensor | None = None  # causal: (B, L) bool, item != 0 ((B,) in a streaming step); None: no masking
    gaps: Tensor | None = None  # causal: (B, L) log1p gap seconds ((B, K) last K of them in a streaming step)

    def mask(self, t: Tensor, pos: Tensor | None = None) -> Tensor:
        """t (B, L, *) (or (B, *) in a step) with zeros at padding where the path masks it; else t itself.
        `pos` (B, K): t holds positions gathered at pos, (B, K, *)."""
        if self.valid is None:
            return t
        valid = self.valid if pos is None else self.valid.gather(1, pos)
        return t * valid.unsqueeze(-1).to(t.dtype)


# ------------------------------------------------------------------------------------------------- network level
class ReferenceTime(nn.Module):
    """tau = LayerNorm_L(Dropout(gaps)) per sequence, the same for every head: (B, L) timestamps -> (B, H, L)."""

    def __init__(self, max_seq_len: int, nheads: int, norm_eps: float, dropout: float) -> None:
        super().__init__()
        self.nheads = nheads
        self.dropout = Dropout(dropout)
        self.layer_norm_time = nn.LayerNorm(max_seq_len, eps=norm_eps)

    def forward(self, item_seq: Tensor, timestamps: Tensor) -> TimeState:
        dtype = self.layer_norm_time.weight.dtype
        t = timestamps.to(torch.promote_types(dtype, torch.float32))  # differences of Unix seconds need >= fp32
        gaps = torch.diff(t, dim=1, prepend=t[:, :1]).to(dtype)  # (B, L): [0, t1 - t0, ...], padding included
        tau = self.layer_norm_time(self.dropout(gaps))  # (B, L), normalised over the sequence axis
        return TimeState(tau=tau.unsqueeze(1).expand(-1, self.nheads, -1))  # (B, H, L)


class NoTime(nn.Module):
    """SSD4Rec* on the reference layout: no time features, padding processed like items."""

    def forward(self, item_seq: Tensor, timestamps: Tensor) -> TimeState:
        return TimeState()


class CausalTime(nn.Module):
    """Gap features and the mask of real positions, in any padding layout (left, right or none)."""

    def forward(self, item_seq: Tensor, timestamps: Tensor) -> TimeState:
        return gap_features(item_seq, timestamps)


def gap_features(item_seq: Tensor, timestamps: Tensor) -> TimeState:
    """The causal path's state for a window: ``valid`` (B, L) bool and ``gaps`` (B, L) float32 (float64 for
    float64 timestamps).

    Args:
        item_seq: (B, L) long, 0 = padding.
        timestamps: (B, L) seconds (any value on padding).
    """
    valid = item_seq != 0  # (B, L)
    t = timestamps.to(torch.promote_types(timestamps.dtype, torch.float32))  # (B, L)
    diff = torch.zeros_like(t)
    diff[:, 1:] = t[:, 1:] - t[:, :-1]  # exact in float32 for nearby Unix seconds (Sterbenz)
    has_prev = torch.zeros_like(valid)
    has_prev[:, 1:] = valid[:, :-1]
    keep = valid & has_prev  # a gap needs a real previous interaction inside the window
    gaps = torch.log1p(diff.clamp(min=0).masked_fill(~keep, 0.0))  # (B, L)
    return TimeState(valid=valid, gaps=gaps)


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


# ------------------------------------------------------------------------------------------------- per layer
class ReferenceTimeScale(nn.Module):
    """The paper's step-size scale: q = act(conv2(act(conv1(tau * MLP_L(tau))))), dt * q; the next tau mixes tau
    and q through a sigmoid gate and a LayerNorm over the sequence axis. All of tau, q are (B, H, L)."""

    def __init__(self, nheads: int, max_seq_len: int, d_conv: int, norm_eps: float, dropout: float, p2p: bool):
        super().__init__()
        h, length = nheads, max_seq_len
        self.conv1d4time_1 = nn.Conv1d(h, h, d_conv, groups=h, padding=d_conv - 1)
        self.conv1d4time_2 = nn.Conv1d(h, h, d_conv, groups=h, padding=d_conv - 1)
        self.time_act = nn.Hardswish()
        self.mlp4time_scale = nn.Sequential(
            Dropout(dropout), nn.Linear(length, length), nn.SiLU(), nn.Linear(length, length)
        )
        self.time_gate_residual = nn.Sequential(Dropout(dropout), nn.Linear(length, length if p2p else 1), nn.Sigmoid())
        self.time_layer_norm = nn.LayerNorm(length, eps=norm_eps)

    def forward(self, dt: Tensor, state: TimeState, advance: bool = True) -> tuple[Tensor, TimeState]:
        tau = state.tau  # (B, H, L)
        q = self.scale(tau * self.mlp4time_scale(tau))  # (B, H, L); the MLP mixes positions
        dt = dt * q.transpose(1, 2)  # (B, L, H)
        if not advance:
            return dt, state
        gate = self.time_gate_residual(tau)  # (B, H, 1 or L)
        return dt, TimeState(tau=self.time_layer_norm(gate * tau + (1 - gate) * q))  # (B, H, L)

    def scale(self, mixed: Tensor) -> Tensor:
        """The two causal convolutions over the MLP-mixed tau, (B, H, L) -> q (B, H, L)."""
        q = self.time_act(causal_conv_channels_first(mixed, self.conv1d4time_1))  # (B, H, L)
        return self.time_act(causal_conv_channels_first(q, self.conv1d4time_2))  # (B, H, L)


class CausalTimeScale(nn.Module):
    """The causal step-size modulation: dt + W e_t + b, with e_t from the last K gap features (B, L) -> (B, L, H)."""

    def __init__(self, nheads: int, time_dim: int, d_conv: int, time_dropout: float) -> None:
        super().__init__()
        # Conv1d(1 -> T) over time, written as a depthwise conv of g copied to T channels (the fast CPU kernel).
        self.conv = nn.Conv1d(time_dim, time_dim, d_conv, groups=time_dim)
        self.dropout = nn.Dropout(time_dropout)
        self.proj = nn.Linear(time_dim, nheads)
        self.time_dim = time_dim

    def forward(self, dt: Tensor, state: TimeState, advance: bool = True) -> tuple[Tensor, TimeState]:
        g = state.gaps.to(self.proj.weight.dtype).unsqueeze(-1).expand(-1, -1, self.time_dim).contiguous()  # (B, L, T)
        e = self.dropout(F.silu(causal_conv_channels_last(g, self.conv)))  # (B, L, T)
        return dt + self.proj(e), state  # (B, L, H); the gaps pass to the next layer unchanged

    def step(self, dt: Tensor, state: TimeState) -> Tensor:
        """One position: dt (B, H), state.gaps the last K gap features (B, K), oldest first -> dt (B, H)."""
        w = self.conv.weight[:, 0, :]  # (T, K)
        e = F.silu(state.gaps.to(w.dtype) @ w.T + self.conv.bias)  # (B, T)
        return dt + self.proj(self.dropout(e))  # (B, H)


class NoTimeScale(nn.Module):
    """SSD4Rec*: the step sizes as projected."""

    def forward(self, dt: Tensor, state: TimeState, advance: bool = True) -> tuple[Tensor, TimeState]:
        return dt, state

    def step(self, dt: Tensor, state: TimeState) -> Tensor:
        return dt


# Reference checkpoints (and ours from before the time paths were modules) hold these parameters directly on the
# network and on each TiSSD; `upgrade_state_dict` moves them into the modules above.
_NETWORK_TIME_KEYS = ("layer_norm_time.",)
_LAYER_TIME_KEYS = ("conv1d4time_1.", "conv1d4time_2.", "mlp4time_scale.", "time_gate_residual.", "time_layer_norm.")


def upgrade_state_dict(state: dict, prefix: str = "") -> None:
    """Rename, in place, a TiM4Rec state dict's reference time-path keys to this package's (no-op for new keys):
    ``layer_norm_time.*`` -> ``time.layer_norm_time.*``, ``ssd_layers.i.ssd.conv1d4time_1.*`` ->
    ``ssd_layers.i.ssd.time_scale.conv1d4time_1.*`` and likewise for the other per-layer time parameters."""
    for key in list(state):
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix) :]
        if rest.startswith(_NETWORK_TIME_KEYS):
            state[prefix + "time." + rest] = state.pop(key)
            continue
        parts = rest.split(".", 3)  # ssd_layers, i, ssd, name...
        if len(parts) == 4 and parts[0] == "ssd_layers" and parts[2] == "ssd" and parts[3].startswith(_LAYER_TIME_KEYS):
            state[prefix + ".".join(parts[:3]) + ".time_scale." + parts[3]] = state.pop(key)
