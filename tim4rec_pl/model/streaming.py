"""Streaming inference: add one interaction to a user's state in time independent of the history length.

For TiM4Rec with ``time_path: causal`` and for the time-less SSD4Rec* every operation along the sequence is a
recurrence with a finite memory, so a user's state is, per layer, the SSD state (H, P, N) and the last K - 1
inputs of the causal convolution, plus the last K - 1 gap features and the last timestamp. One `step` does the
work of one position of the full forward pass: the scores after each step equal `score_all` over the whole
history (eval mode), whatever its length.

    model.eval()
    state = model.init_state(batch_size=2)
    with torch.inference_mode():
        state, scores = model.step(state, torch.tensor([17, 4]), torch.tensor([1.6e9, 1.7e9]))  # (2, num_items)

Rows whose item is 0 are left unchanged (their previous output is returned), so a batch of users can be stepped
together when only some of them have a new interaction.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from tim4rec_pl.errors import UserError
from tim4rec_pl.model.ssd import ssd_step
from tim4rec_pl.model.time_path import step_gap

if TYPE_CHECKING:
    from tim4rec_pl.model.tim4rec import TiM4Rec, TiSSD


@dataclass
class StreamState:
    """The streaming state of B users; every field has the batch first."""

    conv: list[Tensor]  # per layer (B, K - 1, D_in + 2N): the last K - 1 inputs of the xBC convolution
    ssd: list[Tensor]  # per layer (B, H, P, N): the SSD state, float32 (float64 for a float64 model)
    gaps: Tensor  # (B, K - 1): the last K - 1 gap features (the time convolution's memory)
    last_time: Tensor  # (B,) float64: timestamp of the last interaction
    started: Tensor  # (B,) bool: the user has at least one interaction
    count: Tensor  # (B,) long: interactions seen
    output: Tensor  # (B, d): the representation after the last interaction (zeros before the first)

    def to(self, device: torch.device | str) -> StreamState:
        """The same state on another device."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = [v.to(device) for v in value] if isinstance(value, list) else value.to(device)
        return StreamState(**moved)


def _check(model: TiM4Rec) -> None:
    if not getattr(model, "supports_streaming", False):
        raise UserError(
            "streaming needs a causal network: the reference time path mixes all positions; "
            "build TiM4Rec with time_path='causal' (or is_time=False for SSD4Rec*)"
        )


def init_state(model: TiM4Rec, batch_size: int, device: torch.device | str | None = None) -> StreamState:
    """An empty state (no interactions yet) for `batch_size` users on the model's device (or `device`)."""
    _check(model)
    weight = model.item_embedding.weight
    device = weight.device if device is None else torch.device(device)
    dtype = weight.dtype
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    conv, ssd = [], []
    k = 1
    for layer in model.ssd_layers:
        mixer = layer.ssd
        k = mixer.conv1d.weight.shape[-1]
        conv.append(torch.zeros(batch_size, k - 1, mixer.conv1d.weight.shape[0], dtype=dtype, device=device))
        ssd.append(
            torch.zeros(batch_size, mixer.nheads, mixer.head_dim, mixer.d_state, dtype=state_dtype, device=device)
        )
    return StreamState(
        conv=conv,
        ssd=ssd,
        gaps=torch.zeros(batch_size, k - 1, device=device),
        last_time=torch.zeros(batch_size, dtype=torch.float64, device=device),
        started=torch.zeros(batch_size, dtype=torch.bool, device=device),
        count=torch.zeros(batch_size, dtype=torch.long, device=device),
        output=torch.zeros(batch_size, model.d_model, dtype=dtype, device=device),
    )


def step(
    model: TiM4Rec,
    state: StreamState,
    item: Tensor,
    timestamp: Tensor,
    output: Literal["scores", "repr"] = "scores",
) -> tuple[StreamState, Tensor]:
    """Add one interaction per user.

    Args:
        model: TiM4Rec with time_path "causal" or is_time False, normally in eval mode.
        state: from `init_state` or a previous `step`; not modified.
        item: (B,) long item ids; 0 leaves that user's state unchanged.
        timestamp: (B,) seconds of the interactions (same units as in training).
        output: "scores" for (B, num_items) scores of every item, or "repr" for the (B, d) representation.

    Returns:
        The new state and the scores or representation after the interaction.
    """
    _check(model)
    if item.dim() != 1 or timestamp.shape != item.shape or item.shape[0] != state.count.shape[0]:
        raise ValueError(f"item {tuple(item.shape)} and timestamp must both be (B,) with B = {state.count.shape[0]}")
    valid = item != 0  # (B,)
    h = model.in_layer_norm(model.dropout(model.item_embedding(item)))  # (B, d)
    g = step_gap(state.last_time, state.started, timestamp).masked_fill(~valid, 0.0)  # (B,)
    gap_window = torch.cat([state.gaps, g[:, None]], dim=1)  # (B, K), oldest first
    convs, ssds = [], []
    for i, layer in enumerate(model.ssd_layers):
        out, conv, ssd = _mixer_step(layer.ssd, h, valid, gap_window, state.conv[i], state.ssd[i])
        convs.append(conv)
        ssds.append(ssd)
        out = layer.dropout(out)
        if layer.residual:
            out = out + h
        out = layer.layer_norm(out)
        h = layer.ffn(out) if layer.ffn is not None else out  # (B, d)

    def keep(new: Tensor, old: Tensor) -> Tensor:  # rows with item 0 keep their old state
        return torch.where(valid.view(-1, *([1] * (new.dim() - 1))), new, old)

    new = replace(
        state,
        conv=[keep(c, o) for c, o in zip(convs, state.conv)],
        ssd=[keep(s, o) for s, o in zip(ssds, state.ssd)],
        gaps=keep(gap_window[:, 1:], state.gaps),
        last_time=keep(timestamp.to(torch.float64), state.last_time),
        started=state.started | valid,
        count=state.count + valid.long(),
        output=keep(h.to(state.output.dtype), state.output),
    )
    if output == "repr":
        return new, new.output
    return new, new.output @ model.item_embedding.weight.T  # (B, num_items)


def _mixer_step(
    mixer: TiSSD, u: Tensor, valid: Tensor, gap_window: Tensor, conv_in: Tensor, ssd_in: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """One position of TiSSD: u (B, d) -> out (B, d), the shifted conv memory and the new SSD state."""
    b = u.shape[0]
    h, p, n, d_inner = mixer.nheads, mixer.head_dim, mixer.d_state, mixer.d_inner
    z, xbc, dt = torch.split(mixer.in_proj(u), [d_inner, d_inner + 2 * n, h], dim=-1)
    xbc = xbc * valid[:, None].to(xbc.dtype)  # padding enters the convolution as zeros
    window = torch.cat([conv_in, xbc[:, None]], dim=1)  # (B, K, C), oldest first
    weight = mixer.conv1d.weight[:, 0, :]  # (C, K)
    xbc = mixer.act((window * weight.T).sum(1) + mixer.conv1d.bias)  # (B, C)
    x, bmat, cmat = torch.split(xbc, [d_inner, n, n], dim=-1)
    if mixer.is_time:
        dt = dt + mixer.time_scale.step(gap_window)  # (B, H)
    dtype = torch.promote_types(dt.dtype, torch.float32)
    delta = F.softplus(dt.to(dtype) + mixer.dt_bias.to(dtype)) * valid[:, None]  # (B, H), 0: state unchanged
    y, ssd_out = ssd_step(
        ssd_in,
        x.reshape(b, h, p),  # (B, H, P)
        delta.to(ssd_in.dtype),
        -torch.exp(mixer.A_log),  # (H,)
        bmat[:, None],  # (B, 1, N)
        cmat[:, None],  # (B, 1, N)
        D=mixer.D,
    )
    out = mixer.out_proj(mixer.norm(y.reshape(b, d_inner), z))  # (B, d)
    return out, window[:, 1:], ssd_out
