"""TiM4Rec: a time-aware structured state space duality (Mamba-2 SSD) sequential recommender.

Fan et al., "TiM4Rec: An Efficient Sequential Recommendation Model Based on Time-Aware Structured State Space
Duality Model", Neurocomputing 2025 (arXiv 2409.16182). This is the reference behaviour of SPEC §3, step by step,
including its quirks (SPEC §9): the time path LayerNorms over the sequence axis, mixes positions with
Linear(L -> L) layers, and sees the large negative gap right after the last item. Module and parameter names
follow the reference checkpoints, so their state dicts load with `load_state_dict(strict=True)`.

`time_path: causal` swaps that time path for a causal, scale-free one (`tim4rec_pl.model.time_path`, issue #8):
gap features log1p(gap seconds) modulate the step size through causal, position-free layers, padding is masked
out of the convolutions and the scan, so the network trains on all positions of a window at once, runs on any
window length and steps one interaction at a time (`init_state` / `step`, `tim4rec_pl.model.streaming`).

Inputs (the RecBole layout, owned by `tim4rec_pl.data`): `item_seq` (B, L) long, left-aligned and right-padded
with item 0; `item_seq_len` (B,) long; `timestamps` (B, L) float32 seconds, 0 on padding. The causal path also
accepts left padding (it finds real positions from item != 0).
Shapes: d = d_model, D_in = expand * d, H = D_in / head_dim heads of width P = head_dim, N = d_state.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tim4rec_pl.errors import UserError
from tim4rec_pl.model import parallel
from tim4rec_pl.model.base import SequenceEncoder
from tim4rec_pl.model.layers import (
    Dropout,
    FeedForward,
    GatedRMSNorm,
    autocast_on,
    causal_conv_channels_first,
    causal_conv_channels_last,
    gated_norm_linear,
    init_recsys_weights,
    inplace_activation,
    inverse_softplus_dt,
    ssd_output_at,
)
from tim4rec_pl.model.ssd import ssd_scan
from tim4rec_pl.model.time_path import CausalTimeScale, TimeContext, gap_features

if TYPE_CHECKING:
    from tim4rec_pl.model.streaming import StreamState

ConvActivation = Literal["hardswish", "silu"]
SSDBackend = Literal["auto", "torch", "triton"]
TimePath = Literal["reference", "causal"]
_ACTIVATIONS = {"hardswish": nn.Hardswish, "silu": nn.SiLU}
_FFN_EPS = 1e-12  # the reference FFN LayerNorm ignores norm_eps


class TiSSD(nn.Module):
    """The time-aware SSD mixer (SPEC §3 "TiSSD mixer"): u (B, L, d), tau (B, H, L) -> out (B, L, d), tau_next.

    With ``time_path="causal"`` the time state is a `TimeContext` (valid mask, gap features), returned unchanged.
    """

    def __init__(
        self,
        d_model: int,
        max_seq_len: int,
        d_state: int,
        d_conv: int,
        expand: int,
        head_dim: int,
        chunk_size: int,
        norm_eps: float,
        time_dropout: float,
        is_time: bool,
        p2p_residual: bool,
        conv_activation: ConvActivation,
        ssd_backend: SSDBackend,
        time_path: TimePath = "reference",
        time_dim: int = 16,
    ) -> None:
        super().__init__()
        self.causal = time_path == "causal"
        self.d_inner = expand * d_model
        self.nheads = self.d_inner // head_dim
        self.head_dim, self.d_state = head_dim, d_state
        self.chunk_size, self.ssd_backend = chunk_size, ssd_backend
        self.is_time = is_time
        h, n, length = self.nheads, d_state, max_seq_len
        conv_dim = self.d_inner + 2 * n

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * n + h)  # -> z, xBC, dt
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, padding=d_conv - 1)
        self.act = _ACTIVATIONS[conv_activation]()
        if is_time and self.causal:
            self.time_scale = CausalTimeScale(h, time_dim, d_conv, time_dropout)
        elif is_time:
            self.conv1d4time_1 = nn.Conv1d(h, h, d_conv, groups=h, padding=d_conv - 1)
            self.conv1d4time_2 = nn.Conv1d(h, h, d_conv, groups=h, padding=d_conv - 1)
            self.time_act = nn.Hardswish()
            self.mlp4time_scale = nn.Sequential(
                Dropout(time_dropout), nn.Linear(length, length), nn.SiLU(), nn.Linear(length, length)
            )
            gate_out = length if p2p_residual else 1
            self.time_gate_residual = nn.Sequential(Dropout(time_dropout), nn.Linear(length, gate_out), nn.Sigmoid())
            self.time_layer_norm = nn.LayerNorm(length, eps=norm_eps)
        self.dt_bias = nn.Parameter(inverse_softplus_dt(h))  # softplus(dt_bias) ~ logU[1e-3, 0.1]
        self.A_log = nn.Parameter(torch.empty(h).uniform_(1, 16).log())  # A = -exp(A_log) in [-16, -1]
        self.D = nn.Parameter(torch.ones(h))
        self.norm = GatedRMSNorm(self.d_inner, eps=norm_eps)
        self.out_proj = nn.Linear(self.d_inner, d_model)

    def forward(
        self,
        u: Tensor,
        tau: Tensor | TimeContext | None,
        index: Tensor | None = None,
        projected: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor | TimeContext | None]:
        """Mix the sequence.

        Args:
            u: input, (B, L, d).
            tau: time state, (B, H, L); None without the time path; a TimeContext on the causal path.
            index: optional (B,) positions; when given, only those outputs are produced, (B, d), and the next
                time state is skipped (the last layer needs neither).
            projected: in_proj(u) already split into z, xBC, dt (each (B, L, *), contiguous), e.g. looked up from
                a per-item table (see `TiM4Rec._item_table`); `u` then only feeds the residual.

        Returns:
            out (B, L, d) or (B, d), and the next time state (B, H, L) or None.
        """
        # 1-2. Project, causal depthwise conv + activation, split into x, B, C (one group).
        valid = tau.valid.unsqueeze(-1) if self.causal else None  # (B, L, 1)
        z, x, bmat, cmat, dt = self._inputs(u, index, projected, valid)
        if self.causal:
            return self._forward_causal(z, x, bmat, cmat, dt, tau, index)
        # 3. Time-aware step sizes.
        q = None
        if self.is_time:
            q = self._time_scale(tau)  # (B, H, L)
            dt = dt * q.transpose(1, 2)  # (B, L, H)
        # 4. SSD: delta = softplus(dt + dt_bias), S_t = exp(delta A) S_(t-1) + delta x B^T, y = S C + D x.
        y = self._scan(x, dt, bmat, cmat, index, dt_bias=self.dt_bias, dt_softplus=True)  # (B, L, D_in) or (B, D_in)
        # 5-6. Gate, RMSNorm over the whole D_in, project out.
        out = self._norm_out(y, z)  # (B, L, d) or (B, d)
        # 7. Next time state.
        tau_next = None
        if self.is_time and index is None:
            gate = self.time_gate_residual(tau[:, :1] if self._heads_share(tau) else tau)  # (B, H or 1, 1 or L)
            tau_next = self.time_layer_norm(gate * tau + (1 - gate) * q)  # (B, H, L)
        return out, tau_next

    def _inputs(
        self, u: Tensor, index: Tensor | None, projected: tuple[Tensor, Tensor, Tensor] | None, valid: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Steps 1-2: in_proj into z, xBC, dt; causal depthwise conv + activation of xBC, split into x, B, C.

        Each projection is its own matmul with a contiguous result: the element-wise work downstream (convolution,
        gate, norm) runs about twice as fast on contiguous tensors as on slices of one wide projection (measured on
        CPU). With `index` (the last layer) z and C are read at index only, so C is convolved from just the K
        inputs that reach it. `valid` (B, L, 1) zeroes the convolution's inputs at padding (causal path).

        Returns:
            z (B, L, D_in) or (B, D_in), x (B, L, D_in), B (B, L, N), C (B, L, N) or (B, N), dt (B, L, H).
        """
        n, d_in = self.d_state, self.d_inner
        rows = None if index is None else torch.arange(u.shape[0], device=u.device)
        parts = self.in_proj_parts()
        if projected is not None:
            z, xbc, dt = projected
            z = z if rows is None else z[rows, index]
        else:
            z = F.linear(u if rows is None else u[rows, index], *parts[0])  # (B, L, D_in) or (B, D_in)
            dt = F.linear(u, *parts[2])  # (B, L, H)
            w, bias = parts[1]
            c_too = index is None
            xbc = F.linear(u, w if c_too else w[: d_in + n], bias if c_too or bias is None else bias[: d_in + n])
        if valid is not None:
            xbc = xbc * valid.to(xbc.dtype)
        if xbc.shape[-1] == d_in + 2 * n:  # C at every position
            x, bmat, cmat = torch.split(self._act(causal_conv_channels_last(xbc, self.conv1d)), [d_in, n, n], -1)
            return z, x, bmat, cmat, dt
        xb = self._act(causal_conv_channels_last(xbc, self.conv1d, channels=d_in + n))  # (B, L, D_in + N)
        x, bmat = torch.split(xb, [d_in, n], dim=-1)
        return z, x, bmat, self._c_at(u, index, valid, *parts[1]), dt

    def _c_at(self, u: Tensor, index: Tensor, valid: Tensor | None, w: Tensor, bias: Tensor | None) -> Tensor:
        """C at `index` only, (B, N): the K projected inputs that reach it, convolved (zeros before position 0).
        `w`, `bias`: in_proj's xBC rows."""
        n, d_in = self.d_state, self.d_inner
        k = self.conv1d.weight.shape[-1]
        rows = torch.arange(u.shape[0], device=u.device)[:, None]
        pos = index[:, None] + torch.arange(1 - k, 1, device=u.device)  # (B, K), oldest first
        keep = pos >= 0
        pos = pos.clamp(min=0)
        if valid is not None:
            keep = keep & valid[rows, pos, 0]
        c_in = F.linear(u[rows, pos], w[d_in + n :], None if bias is None else bias[d_in + n :])  # (B, K, N)
        c = torch.einsum("bkn,nk->bn", c_in * keep.unsqueeze(-1).to(c_in.dtype), self.conv1d.weight[d_in + n :, 0])
        return self.act(c if self.conv1d.bias is None else c + self.conv1d.bias[d_in + n :])  # (B, N)

    def in_proj_parts(self) -> list[tuple[Tensor, Tensor | None]]:
        """(weight, bias) of in_proj's z, xBC and dt rows."""
        n, h, d_in = self.d_state, self.nheads, self.d_inner
        w, bias = self.in_proj.weight, self.in_proj.bias
        bounds = [(0, d_in), (d_in, 2 * d_in + 2 * n), (2 * d_in + 2 * n, 2 * d_in + 2 * n + h)]
        return [(w[a:b], None if bias is None else bias[a:b]) for a, b in bounds]

    def _scan(self, x: Tensor, dt: Tensor, bmat: Tensor, cmat: Tensor, index: Tensor | None, **step) -> Tensor:
        """The SSD over whole sequences, (B, L, D_in), or only at `index` (the last layer: O(L)), (B, D_in)."""
        b, length = x.shape[:2]
        args = (
            x.reshape(b, length, self.nheads, self.head_dim),  # (B, L, H, P)
            dt,  # (B, L, H)
            -torch.exp(self.A_log),  # (H,)
            bmat.unsqueeze(2),  # (B, L, 1, N)
            cmat.unsqueeze(-2),  # (B, L, 1, N), or (B, 1, N) at index
        )
        if index is not None:
            return ssd_output_at(*args, index, D=self.D, **step).reshape(b, self.d_inner)
        y = ssd_scan(*args, D=self.D, chunk_size=self.chunk_size, backend=self.ssd_backend, **step)
        return y.reshape(b, length, self.d_inner)

    def _forward_causal(
        self, z: Tensor, x: Tensor, bmat: Tensor, cmat: Tensor, dt: Tensor, ctx: TimeContext, index: Tensor | None
    ) -> tuple[Tensor, TimeContext]:
        """Steps 3-6 with padding masked out (the conv inputs were zeroed there; delta = 0 there, so the state
        passes unchanged)."""
        valid = ctx.valid.unsqueeze(-1)  # (B, L, 1)
        if self.is_time:
            dt = dt + self.time_scale(ctx.gaps)  # (B, L, H): the gaps shift the step size
        dtype = torch.promote_types(dt.dtype, torch.float32)  # step sizes in >= float32, like ssd_scan's
        delta = F.softplus(dt.to(dtype) + self.dt_bias.to(dtype)) * valid  # (B, L, H), 0 at padding
        y = self._scan(x, delta, bmat, cmat, index)  # (B, L, D_in) or (B, D_in)
        return self._norm_out(y, z), ctx

    def _norm_out(self, y: Tensor, z: Tensor) -> Tensor:
        """Steps 5-6, out_proj(RMSNorm(y * SiLU(z))); in inference with the norm's scales moved past out_proj."""
        if torch.is_grad_enabled():
            return self.out_proj(self.norm(y, z))
        return gated_norm_linear(self.norm, y, z, self.out_proj)  # z: a fresh projection, overwritten

    def _act(self, x: Tensor) -> Tensor:
        """The convolution's activation; in place without autograd (x is the convolution's fresh output)."""
        return self.act(x) if torch.is_grad_enabled() else inplace_activation(self.act, x)

    def _heads_share(self, tau: Tensor) -> bool:
        """Inference with the first layer's tau, one row expanded over the heads: per-head work can run once."""
        return not self.training and tau.shape[1] > 1 and tau.stride(1) == 0

    def _time_scale(self, tau: Tensor) -> Tensor:
        """SPEC §3 TiSSD step 3: q = act(conv_t2(act(conv_t1(tau * MLP_L(tau))))), all (B, H, L)."""
        if self._heads_share(tau):
            one = tau[:, :1]  # (B, 1, L): the MLP once instead of once per identical head
            q = (one * self.mlp4time_scale(one)).expand_as(tau)  # (B, H, L)
        else:
            q = tau * self.mlp4time_scale(tau)  # (B, H, L); the MLP mixes positions
        q = self.time_act(causal_conv_channels_first(q, self.conv1d4time_1))  # (B, H, L)
        return self.time_act(causal_conv_channels_first(q, self.conv1d4time_2))  # (B, H, L)


class TiM4RecLayer(nn.Module):
    """One encoder layer: TiSSD, dropout + residual + LayerNorm, then the optional FFN."""

    def __init__(self, d_model: int, dropout: float, norm_eps: float, residual: bool, is_ffn: bool, **ssd_kwargs):
        super().__init__()
        self.ssd = TiSSD(d_model=d_model, norm_eps=norm_eps, **ssd_kwargs)
        self.dropout = Dropout(dropout)
        self.layer_norm = nn.LayerNorm(d_model, eps=norm_eps)
        self.residual = residual  # the reference drops `+ E` when there is a single layer
        self.ffn = FeedForward(d_model, 4 * d_model, dropout, _FFN_EPS, nn.Hardswish()) if is_ffn else None

    def forward(
        self,
        h: Tensor,
        tau: Tensor | TimeContext | None,
        index: Tensor | None = None,
        projected: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor | TimeContext | None]:
        out, tau = self.ssd(h, tau, index, projected)  # (B, L, d) or (B, d)
        out = self.dropout(out)
        if self.residual:
            skip = h if index is None else h[torch.arange(h.shape[0], device=h.device), index]
            out = out + skip if torch.is_grad_enabled() else out.add_(skip)  # out: a fresh buffer
        out = self.layer_norm(out)
        if self.ffn is not None:
            out = self.ffn(out)
        return out, tau


class TiM4Rec(SequenceEncoder):
    """TiM4Rec sequence encoder with a tied item-embedding output layer (SPEC §3)."""

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
            time_path: "reference": the paper's time path (SPEC §3), tied to L and not causal, so prefix training
                only. "causal": log1p gap features modulate the step size through causal, position-free layers,
                padding is masked out (any window length, all-position training, streaming with `step`).
                Both keep `is_time: false` as the time-less SSD4Rec*.
            time_dim: Width T of the causal time path's gap-feature convolution (time_path "causal" only).
        """
        super().__init__()
        _validate(locals())
        self.num_items, self.max_seq_len, self.d_model = num_items, max_seq_len, d_model
        self.is_time, self.time_path = is_time, time_path
        self.nheads = expand * d_model // head_dim
        # The reference time path mixes positions: no all-position training, no streaming (see lightning_module.py).
        self.supports_all_positions = self.supports_streaming = time_path == "causal" or not is_time

        self.item_embedding = nn.Embedding(num_items, d_model, padding_idx=0)
        self.dropout = Dropout(dropout)
        self.in_layer_norm = nn.LayerNorm(d_model, eps=norm_eps)
        if is_time and time_path == "reference":
            self.layer_norm_time = nn.LayerNorm(max_seq_len, eps=norm_eps)
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

    def _embed(
        self, item_seq: Tensor, timestamps: Tensor
    ) -> tuple[Tensor, Tensor | TimeContext | None, tuple[Tensor, Tensor, Tensor] | None]:
        """Encoder steps 1-2: item embeddings (B, L, d), the initial time state (B, H, L) (a TimeContext or None),
        and, in inference, the first layer's input projection looked up per item (else None)."""
        if item_seq.dim() != 2 or timestamps.shape != item_seq.shape:
            raise ValueError(f"item_seq {tuple(item_seq.shape)} and timestamps must both be (B, L)")
        if self.time_path == "reference" and self.is_time and item_seq.shape[1] != self.max_seq_len:
            raise UserError(
                f"TiM4Rec was built with max_seq_len={self.max_seq_len} but got sequences of length "
                f"{item_seq.shape[1]}: the time path is tied to L, so set the data's and the model's max_seq_len equal"
            )
        table = self._item_table()
        if table is None:
            h, projected = self.in_layer_norm(self.dropout(self.item_embedding(item_seq))), None  # (B, L, d)
        else:
            h, *parts = (F.embedding(item_seq, t) for t in table)  # (B, L, d), then z, xBC, dt (B, L, *)
            projected = tuple(parts)
        if self.time_path == "causal":
            return h, gap_features(item_seq, timestamps), projected
        if not self.is_time:
            return h, None, projected
        t = timestamps.to(torch.promote_types(h.dtype, torch.float32))  # differences of Unix seconds need >= fp32
        gaps = torch.diff(t, dim=1, prepend=t[:, :1]).to(h.dtype)  # (B, L): [0, t1 - t0, ...], padding included
        tau = self.layer_norm_time(self.dropout(gaps))  # (B, L), normalised over the sequence axis
        return h, tau.unsqueeze(1).expand(-1, self.nheads, -1), projected  # (B, H, L)

    def _item_table(self) -> tuple[Tensor, ...] | None:
        """Inference only: per-item rows of the first layer's input and its in_proj parts, cached per weight version.

        In eval mode without gradients the first layer's input, LayerNorm(item embedding), and its projection
        in_proj(...) depend on the item alone, so a table of num_items rows replaces a (B * L, d) x (d, 2 D_in + 2N + H)
        matmul by a row lookup (5-6x cheaper at ML-1M's catalogue, L = 200). Rebuilt when any weight it reads
        changes (in-place updates bump a tensor's version); not used in training, under autocast, or when the
        table would exceed _ITEM_TABLE_BYTES.
        """
        if self.training or torch.is_grad_enabled() or autocast_on(self.item_embedding.weight.device):
            return None
        ssd = self.ssd_layers[0].ssd
        weights = [self.item_embedding.weight, self.in_layer_norm.weight, self.in_layer_norm.bias]
        weights += [t for pair in ssd.in_proj_parts() for t in pair if t is not None]
        width = self.d_model + ssd.in_proj.out_features
        if self.num_items * width * weights[0].element_size() > _ITEM_TABLE_BYTES:
            return None
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in weights)
        cached = self.__dict__.get("_item_table_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable outside inference mode too
            h = self.in_layer_norm(self.item_embedding.weight)  # (num_items, d)
            table = (h, *(F.linear(h, *part) for part in ssd.in_proj_parts()))
        self.__dict__["_item_table_cache"] = (key, table)  # not a buffer: never saved, never moved
        return table

    def encode(self, item_seq: Tensor, item_seq_len: Tensor, timestamps: Tensor) -> Tensor:
        """Hidden states at every position, (B, L, d). `item_seq_len` is unused (kept for a uniform API)."""
        h, tau, projected = self._embed(item_seq, timestamps)
        for i, layer in enumerate(self.ssd_layers):
            h, tau = layer(h, tau, projected=projected if i == 0 else None)  # (B, L, d), (B, H, L)
        return h

    def forward(self, item_seq: Tensor, item_seq_len: Tensor, timestamps: Tensor) -> Tensor:
        """Sequence representation: the hidden state at position item_seq_len - 1, (B, d).

        In inference on a multi-core CPU, slices of the batch run side by side (`tim4rec_pl.model.parallel`).
        """
        ranges = parallel.slices(item_seq.shape[0], item_seq.shape[-1], item_seq.device) if not self.training else []
        if len(ranges) > 1:
            self._item_table()  # build the shared cache once, before the slices read it
            return parallel.run_sliced(self._forward, ranges, item_seq, item_seq_len, timestamps)
        return self._forward(item_seq, item_seq_len, timestamps)

    def _forward(self, item_seq: Tensor, item_seq_len: Tensor, timestamps: Tensor) -> Tensor:
        h, tau, projected = self._embed(item_seq, timestamps)
        last = len(self.ssd_layers) - 1
        for i, layer in enumerate(self.ssd_layers):
            # The last layer's position-wise part runs on the gathered positions only.
            index = item_seq_len - 1 if i == last else None
            h, tau = layer(h, tau, index=index, projected=projected if i == 0 else None)  # (B, L, d) or (B, d)
        return h

    def score_all(self, item_seq: Tensor, item_seq_len: Tensor, timestamps: Tensor) -> Tensor:
        """Scores of every item, padding item 0 included, (B, num_items)."""
        return self.forward(item_seq, item_seq_len, timestamps) @ self.item_embedding.weight.T

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> StreamState:
        """An empty streaming state for `batch_size` users (see `tim4rec_pl.model.streaming.init_state`)."""
        from tim4rec_pl.model.streaming import init_state

        return init_state(self, batch_size, device)

    def step(
        self, state: StreamState, item: Tensor, timestamp: Tensor, output: Literal["scores", "repr"] = "scores"
    ) -> tuple[StreamState, Tensor]:
        """Add one interaction per user; returns the new state and scores (B, num_items) or the representation (B, d).

        Constant time in the history length; equals a full recomputation over the history (eval mode). Item 0
        leaves a user's state unchanged. See `tim4rec_pl.model.streaming.step`.
        """
        from tim4rec_pl.model.streaming import step

        return step(self, state, item, timestamp, output)


# Largest per-item inference table (`TiM4Rec._item_table`): about 170,000 items at the 64-d defaults.
_ITEM_TABLE_BYTES = 256 << 20


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
        args["conv_activation"] in _ACTIVATIONS,
        f"unknown conv_activation {args['conv_activation']!r}: use one of {', '.join(_ACTIVATIONS)}",
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
