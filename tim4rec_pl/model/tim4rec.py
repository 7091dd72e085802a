"""TiM4Rec: a time-aware structured state space duality (Mamba-2 SSD) sequential recommender.

Fan et al., "TiM4Rec: An Efficient Sequential Recommendation Model Based on Time-Aware Structured State Space
Duality Model", Neurocomputing 2025 (arXiv 2409.16182). With ``time_path: reference`` this is the paper's network
step by step, including its quirks (docs/model.md, "The reference time path"); reference checkpoints load with
`load_state_dict(strict=True)` (their time-path keys are renamed on load, `time_path.upgrade_state_dict`).
``time_path: causal`` swaps in a causal, scale-free time path (docs/model.md, "The causal time path") that trains on
all positions of a window at once, runs on any window length and streams one interaction at a time (`step`).

Inputs (the RecBole layout, owned by `tim4rec_pl.data`): `item_seq` (B, L) long, left-aligned and right-padded
with item 0; `item_seq_len` (B,) long; `timestamps` (B, L) float32 seconds, 0 on padding. The causal path also
accepts left padding (it finds real positions from item != 0). Fast CPU inference: `tim4rec_pl.inference`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from functools import partial
from typing import Literal

import torch
from torch import Tensor, nn

from tim4rec_pl.errors import UserError
from tim4rec_pl.model.base import SequenceEncoder
from tim4rec_pl.model.layers import Dropout, FeedForward, init_recsys_weights
from tim4rec_pl.model.time_path import CausalTime, NoTime, ReferenceTime, TimeState, step_gap, upgrade_state_dict
from tim4rec_pl.model.tissd import ACTIVATIONS, ConvActivation, SSDBackend, TimePath, TiSSD

__all__ = ["StreamState", "TiM4Rec", "TiM4RecLayer", "TiSSD"]

_FFN_EPS = 1e-12  # the reference FFN LayerNorm ignores norm_eps


class TiM4RecLayer(nn.Module):
    """One encoder layer: TiSSD, dropout + residual + LayerNorm, then the optional FFN."""

    def __init__(self, d_model: int, dropout: float, norm_eps: float, residual: bool, is_ffn: bool, **ssd_kwargs):
        super().__init__()
        self.ssd = TiSSD(d_model=d_model, norm_eps=norm_eps, **ssd_kwargs)
        self.dropout = Dropout(dropout)
        self.layer_norm = nn.LayerNorm(d_model, eps=norm_eps)
        self.residual = residual  # the reference drops `+ E` when there is a single layer
        self.ffn = FeedForward(d_model, 4 * d_model, dropout, _FFN_EPS, nn.Hardswish()) if is_ffn else nn.Identity()

    def forward(self, h: Tensor, time: TimeState, index: Tensor | None = None) -> tuple[Tensor, TimeState]:
        """h (B, L, d) -> (B, L, d), or (B, d) at `index` (see `TiSSD.forward`)."""
        out, time = self.ssd(h, time, index)  # (B, L, d) or (B, d)
        if self.residual:
            skip = h if index is None else h[torch.arange(h.shape[0], device=h.device), index]  # (B, L, d) or (B, d)
            out = self.dropout(out) + skip
        else:
            out = self.dropout(out)
        return self.ffn(self.layer_norm(out)), time

    def step(self, state: tuple[Tensor, Tensor], h: Tensor, time: TimeState) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """One position: h (B, d) -> (B, d) and the layer's new memory (see `TiSSD.step`)."""
        out, state = self.ssd.step(state, h, time)
        out = self.dropout(out) + h if self.residual else self.dropout(out)
        return self.ffn(self.layer_norm(out)), state


@dataclass
class StreamState:
    """The streaming state of B users (`TiM4Rec.init_state` / `step`); every field has the batch first."""

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


class TiM4Rec(SequenceEncoder):
    """TiM4Rec sequence encoder with a tied item-embedding output layer."""

    def __init__(
        self,
        num_items: int,
        max_seq_len: int = 50,
        d_model: int = 64,
        num_layers: int = 2,
        dropout: float = 0.2,
        time_dropout: float = 0.2,
        d_state: int = 32,
        d_conv: int = 4,
        expand: int = 2,
        head_dim: int = 32,
        chunk_size: int = 32,
        norm_eps: float = 1e-12,
        is_time: bool = True,
        is_ffn: bool = True,
        p2p_residual: bool = False,
        kaiming_init: bool = True,
        conv_activation: ConvActivation = "hardswish",
        ssd_backend: SSDBackend = "auto",
        time_path: TimePath = "reference",
        time_dim: int = 16,
    ) -> None:
        """Build TiM4Rec.

        Args:
            num_items: Catalogue size including the padding item 0 (filled in from the data).
            max_seq_len: History length L; the reference time path's Linear(L -> L) and LayerNorm(L) are tied to it
                (the causal path and SSD4Rec* run on any length).
            d_model: Hidden size d (reference `hidden_size`).
            num_layers: Number of TiSSD layers.
            dropout: Dropout on embeddings, time gaps, layer outputs and the FFN (reference `dropout_prob`).
            time_dropout: Dropout inside the time path's MLP and gate (reference `time_drop_out`).
            d_state: SSD state size N.
            d_conv: Kernel size of the causal depthwise convolutions.
            expand: Inner width factor: d_inner = expand * d_model.
            head_dim: SSD head width P; heads H = d_inner / head_dim.
            chunk_size: SSD chunk length; changes the cost, never the result.
            norm_eps: Epsilon of the embedding, layer and time LayerNorms and of the RMSNorm (the FFN uses 1e-12).
            is_time: Use the time-aware path; False gives the time-less SSD4Rec* ablation.
            is_ffn: Add the position-wise feed-forward block to each layer.
            p2p_residual: Time gate Linear(L -> L) (position-to-position) instead of Linear(L -> 1).
            kaiming_init: Kaiming-normal (fan_out, relu) Conv1d weights; False keeps PyTorch's default.
            conv_activation: Activation after the xBC convolution: "hardswish" (every published setting) or "silu".
            ssd_backend: SSD implementation: "auto" (Triton on CUDA when mamba-ssm imports), "torch" or "triton".
            time_path: "reference": the paper's time path, tied to L and not causal, so prefix training
                only. "causal": log1p gap features modulate the step size through causal, position-free layers,
                padding is masked out (any window length, all-position training, streaming with `step`).
                Both keep `is_time: false` as the time-less SSD4Rec*.
            time_dim: Width T of the causal time path's gap-feature convolution (time_path "causal" only).
        """
        super().__init__()
        _validate(locals())
        self.num_items, self.max_seq_len, self.d_model = num_items, max_seq_len, d_model
        self.is_time, self.time_path = is_time, time_path
        nheads = expand * d_model // head_dim
        # The reference time path mixes positions: no all-position training, no streaming (see lightning_module.py).
        self.supports_all_positions = self.supports_streaming = time_path == "causal" or not is_time

        self.item_embedding = nn.Embedding(num_items, d_model, padding_idx=0)
        self.dropout = Dropout(dropout)
        self.in_layer_norm = nn.LayerNorm(d_model, eps=norm_eps)
        if time_path == "causal":
            self.time = CausalTime()
        elif is_time:
            self.time = ReferenceTime(max_seq_len, nheads, norm_eps, dropout)
        else:
            self.time = NoTime()
        ssd_kwargs = dict(
            max_seq_len=max_seq_len,
            d_state=d_state,
            d_conv=d_conv,
            expand=expand,
            head_dim=head_dim,
            chunk_size=chunk_size,
            time_dropout=time_dropout,
            is_time=is_time,
            p2p_residual=p2p_residual,
            conv_activation=conv_activation,
            ssd_backend=ssd_backend,
            time_path=time_path,
            time_dim=time_dim,
        )
        self.ssd_layers = nn.ModuleList(
            TiM4RecLayer(d_model, dropout, norm_eps, residual=num_layers > 1, is_ffn=is_ffn, **ssd_kwargs)
            for _ in range(num_layers)
        )
        # The blanket pass leaves dt_bias, A_log, D and the RMSNorm weights (set in TiSSD) alone.
        self.apply(partial(init_recsys_weights, std=0.02, kaiming_conv=kaiming_init))
        self.register_load_state_dict_pre_hook(_reference_names)

    def forward(
        self, item_seq: Tensor, item_seq_len: Tensor, timestamps: Tensor, *, every_position: bool = False
    ) -> Tensor:
        """Sequence representation: the hidden state at position item_seq_len - 1, (B, d); with `every_position`,
        the hidden states at every position, (B, L, d) (`encode`)."""
        self._check_inputs(item_seq, timestamps)
        index = None if every_position else item_seq_len - 1  # (B,)
        # 1. Item embeddings: h = LayerNorm(Dropout(E[item])), (B, L, d).
        h = self.in_layer_norm(self.dropout(self.item_embedding(item_seq)))
        # 2. The time path's state: tau (B, H, L) on the reference path; gaps and real positions on the causal one.
        time = self.time(item_seq, timestamps)
        # 3. The layers; the last one computes its position-wise part at `index` only: (B, d).
        last = len(self.ssd_layers) - 1
        for i, layer in enumerate(self.ssd_layers):
            h, time = layer(h, time, index if i == last else None)  # (B, L, d), or (B, d) after the last
        return h

    def encode(self, item_seq: Tensor, item_seq_len: Tensor, timestamps: Tensor) -> Tensor:
        """Hidden states at every position, (B, L, d). `item_seq_len` is unused (kept for a uniform API)."""
        return self.forward(item_seq, item_seq_len, timestamps, every_position=True)

    def score_all(self, item_seq: Tensor, item_seq_len: Tensor, timestamps: Tensor) -> Tensor:
        """Scores of every item, padding item 0 included, (B, num_items)."""
        return self.forward(item_seq, item_seq_len, timestamps) @ self.item_embedding.weight.T

    def _check_inputs(self, item_seq: Tensor, timestamps: Tensor) -> None:
        if item_seq.dim() != 2 or timestamps.shape != item_seq.shape:
            raise ValueError(f"item_seq {tuple(item_seq.shape)} and timestamps must both be (B, L)")
        if isinstance(self.time, ReferenceTime) and item_seq.shape[1] != self.max_seq_len:
            raise UserError(
                f"TiM4Rec was built with max_seq_len={self.max_seq_len} but got sequences of length "
                f"{item_seq.shape[1]}: the time path is tied to L, so set the data's and the model's max_seq_len equal"
            )

    # ------------------------------------------------------------------------------------------------ streaming
    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> StreamState:
        """An empty streaming state (no interactions yet) for `batch_size` users on the model's device (or `device`).

        Streaming: `step` adds one interaction per user in time independent of the history length, and its
        scores equal `score_all` over the whole history (eval mode). Causal networks only (time_path "causal", or
        is_time False):

            model.eval()
            state = model.init_state(batch_size=2)
            with torch.inference_mode():
                state, scores = model.step(state, torch.tensor([17, 4]), torch.tensor([1.6e9, 1.7e9]))
        """
        self._check_streaming()
        weight = self.item_embedding.weight
        device = weight.device if device is None else torch.device(device)
        layers = [layer.ssd.init_state(batch_size, device, weight.dtype) for layer in self.ssd_layers]
        k = self.ssd_layers[0].ssd.conv1d.weight.shape[-1]
        return StreamState(
            conv=[conv for conv, _ in layers],
            ssd=[ssd for _, ssd in layers],
            gaps=torch.zeros(batch_size, k - 1, device=device),
            last_time=torch.zeros(batch_size, dtype=torch.float64, device=device),
            started=torch.zeros(batch_size, dtype=torch.bool, device=device),
            count=torch.zeros(batch_size, dtype=torch.long, device=device),
            output=torch.zeros(batch_size, self.d_model, dtype=weight.dtype, device=device),
        )

    def step(
        self, state: StreamState, item: Tensor, timestamp: Tensor, output: Literal["scores", "repr"] = "scores"
    ) -> tuple[StreamState, Tensor]:
        """Add one interaction per user; returns the new state and scores (B, num_items) or the representation (B, d).

        Args:
            state: from `init_state` or a previous `step`; not modified.
            item: (B,) long item ids; 0 leaves that user's state unchanged (its previous output is returned).
            timestamp: (B,) seconds of the interactions (same units as in training).
            output: "scores" for the scores of every item, or "repr" for the representation.
        """
        self._check_streaming()
        if item.dim() != 1 or timestamp.shape != item.shape or item.shape[0] != state.count.shape[0]:
            raise ValueError(f"item {tuple(item.shape)} and timestamp must be (B,) with B = {state.count.shape[0]}")
        valid = item != 0  # (B,)
        # 1. Item embedding, (B, d).
        h = self.in_layer_norm(self.dropout(self.item_embedding(item)))
        # 2. The time path's state for this position: the last K gap features, oldest first, (B, K).
        g = step_gap(state.last_time, state.started, timestamp).masked_fill(~valid, 0.0)  # (B,)
        time = TimeState(valid=valid, gaps=torch.cat([state.gaps, g[:, None]], dim=1))
        # 3. The layers, one position each.
        layers = []
        for i, layer in enumerate(self.ssd_layers):
            h, memory = layer.step((state.conv[i], state.ssd[i]), h, time)  # (B, d)
            layers.append(memory)

        def keep(new: Tensor, old: Tensor) -> Tensor:  # rows with item 0 keep their old state
            return torch.where(valid.view(-1, *([1] * (new.dim() - 1))), new, old)

        new = replace(
            state,
            conv=[keep(conv, old) for (conv, _), old in zip(layers, state.conv)],
            ssd=[keep(ssd, old) for (_, ssd), old in zip(layers, state.ssd)],
            gaps=keep(time.gaps[:, 1:], state.gaps),
            last_time=keep(timestamp.to(torch.float64), state.last_time),
            started=state.started | valid,
            count=state.count + valid.long(),
            output=keep(h.to(state.output.dtype), state.output),
        )
        if output == "repr":
            return new, new.output
        return new, new.output @ self.item_embedding.weight.T  # (B, num_items)

    def _check_streaming(self) -> None:
        if not self.supports_streaming:
            raise UserError(
                "streaming needs a causal network: the reference time path mixes all positions; "
                "build TiM4Rec with time_path='causal' (or is_time=False for SSD4Rec*)"
            )


def _reference_names(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load hook: reference checkpoints and older ones hold the time path's parameters under their old names."""
    upgrade_state_dict(state_dict, prefix)


def _validate(args: dict) -> None:
    """Raise a one-line UserError for hyperparameters the network cannot be built with."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UserError(f"TiM4Rec: {message}")

    for name in ("num_items", "max_seq_len", "d_model", "num_layers", "d_state", "d_conv", "expand", "head_dim"):
        need(isinstance(args[name], int) and args[name] >= 1, f"{name} must be a positive integer, got {args[name]!r}")
    need(args["num_items"] >= 2, f"num_items must count the padding item 0 and >= 1 real item, got {args['num_items']}")
    need(isinstance(args["chunk_size"], int) and args["chunk_size"] >= 1, "chunk_size must be a positive integer")
    for name in ("dropout", "time_dropout"):
        need(0.0 <= args[name] < 1.0, f"{name} must be in [0, 1), got {args[name]!r}")
    need(args["norm_eps"] > 0, f"norm_eps must be > 0, got {args['norm_eps']!r}")
    d_inner = args["expand"] * args["d_model"]
    need(
        d_inner % args["head_dim"] == 0,
        f"d_inner = expand * d_model = {d_inner} is not divisible by head_dim={args['head_dim']}: "
        "pick a head_dim that divides it",
    )
    need(
        args["conv_activation"] in ACTIVATIONS,
        f"unknown conv_activation {args['conv_activation']!r}: use one of {', '.join(ACTIVATIONS)}",
    )
    need(
        args["time_path"] in ("reference", "causal"),
        f"unknown time_path {args['time_path']!r}: use reference (the paper's) or causal",
    )
    need(isinstance(args["time_dim"], int) and args["time_dim"] >= 1, "time_dim must be a positive integer")
    need(
        args["ssd_backend"] in ("auto", "torch", "triton"),
        f"unknown ssd_backend {args['ssd_backend']!r}: use auto, torch or triton",
    )
