"""TiSSD, TiM4Rec's time-aware SSD mixer: u (B, L, d) -> out (B, L, d), with the time path changing the step sizes.

Shapes: d = d_model, D_in = expand * d, H = D_in / head_dim heads of width P = head_dim, N = d_state, K = d_conv.
Module and parameter names follow the reference checkpoints (the time path's parameters sit in `time_scale`; see
`time_path.upgrade_state_dict` for the reference names). See docs/model.md, "One TiSSD layer".
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tim4rec_pl.model.layers import GatedRMSNorm, causal_conv_channels_last, inverse_softplus_dt, ssd_output_at
from tim4rec_pl.model.ssd import ssd_scan, ssd_step
from tim4rec_pl.model.ssd_minimal import step_sizes
from tim4rec_pl.model.time_path import CausalTimeScale, NoTimeScale, ReferenceTimeScale, TimeState

ConvActivation = Literal["hardswish", "silu"]
SSDBackend = Literal["auto", "torch", "triton"]
TimePath = Literal["reference", "causal"]
ACTIVATIONS = {"hardswish": nn.Hardswish, "silu": nn.SiLU}


class TiSSD(nn.Module):
    """The time-aware SSD mixer. `forward` runs whole windows; `step` adds one position (streaming)."""

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
        self.d_inner = expand * d_model
        self.nheads = self.d_inner // head_dim
        self.head_dim, self.d_state = head_dim, d_state
        self.chunk_size, self.ssd_backend = chunk_size, ssd_backend
        h, n = self.nheads, d_state
        conv_dim = self.d_inner + 2 * n

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * n + h)  # -> z, xBC, dt
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, padding=d_conv - 1)
        self.act = ACTIVATIONS[conv_activation]()
        if not is_time:
            self.time_scale = NoTimeScale()
        elif time_path == "causal":
            self.time_scale = CausalTimeScale(h, time_dim, d_conv, time_dropout)
        else:
            self.time_scale = ReferenceTimeScale(h, max_seq_len, d_conv, norm_eps, time_dropout, p2p_residual)
        self.dt_bias = nn.Parameter(inverse_softplus_dt(h))  # softplus(dt_bias) ~ logU[1e-3, 0.1]
        self.A_log = nn.Parameter(torch.empty(h).uniform_(1, 16).log())  # A = -exp(A_log) in [-16, -1]
        self.D = nn.Parameter(torch.ones(h))
        self.norm = GatedRMSNorm(self.d_inner, eps=norm_eps)
        self.out_proj = nn.Linear(self.d_inner, d_model)

    def forward(self, u: Tensor, time: TimeState, index: Tensor | None = None) -> tuple[Tensor, TimeState]:
        """Mix the sequence.

        Args:
            u: input, (B, L, d).
            time: the time path's state (see `tim4rec_pl.model.time_path`).
            index: optional (B,) positions; when given, only the outputs there are produced, (B, d), and the time
                path's next state is not computed (the network's last layer needs neither).

        Returns:
            out (B, L, d) or (B, d), and the time state for the next layer.
        """
        b, length = u.shape[:2]
        n, d_in = self.d_state, self.d_inner
        (w_z, b_z), (w_xbc, b_xbc), (w_dt, b_dt) = self.in_proj_parts()
        rows = torch.arange(b, device=u.device)

        # 1. Input projection into the gate z, the SSD inputs xBC and the raw step sizes dt, each its own matmul
        #    (element-wise work runs about 2x faster on contiguous results than on slices of one wide projection).
        z = F.linear(u if index is None else u[rows, index], w_z, b_z)  # (B, L, D_in) or (B, D_in)
        dt = F.linear(u, w_dt, b_dt)  # (B, L, H)

        # 2. Causal depthwise convolution + activation of xBC (padding enters as zeros on the causal path), split
        #    into x (B, L, D_in), B (B, L, N) and C (B, L, N); with `index`, C only there, from the K inputs it sees.
        if index is None:
            xbc = time.mask(F.linear(u, w_xbc, b_xbc))  # (B, L, D_in + 2N)
            x, bmat, cmat = torch.split(self.act(causal_conv_channels_last(xbc, self.conv1d)), [d_in, n, n], -1)
        else:
            xb = time.mask(F.linear(u, w_xbc[: d_in + n], None if b_xbc is None else b_xbc[: d_in + n]))
            x, bmat = torch.split(
                self.act(causal_conv_channels_last(xb, self.conv1d, channels=d_in + n)), [d_in, n], -1
            )
            cmat = self._c_at(u, index, time)  # (B, N)

        # 3. The time path changes the raw step sizes: dt (B, L, H).
        dt, time_next = self.time_scale(dt, time, advance=index is None)

        # 4. Step sizes delta = softplus(dt + dt_bias) (B, L, H), in >= float32; 0 at padding on the causal path.
        delta = time.mask(step_sizes(dt.to(torch.promote_types(dt.dtype, torch.float32)), self.dt_bias))

        # 5. SSD: S_t = exp(delta_t A) S_(t-1) + delta_t x_t B_t^T, y_t = S_t C_t + D x_t, heads of width P.
        args = (x.reshape(b, length, self.nheads, self.head_dim), delta, -torch.exp(self.A_log), bmat.unsqueeze(2))
        if index is None:
            y = ssd_scan(*args, cmat.unsqueeze(2), D=self.D, chunk_size=self.chunk_size, backend=self.ssd_backend)
        else:  # the last layer: the scan's output at `index` only, O(L)
            y = ssd_output_at(*args, cmat.unsqueeze(1), index, D=self.D)  # (B, H, P)
        y = y.reshape(*z.shape)  # (B, L, D_in) or (B, D_in)

        # 6. Gate with SiLU(z), RMSNorm over D_in, project out: (B, L, d) or (B, d).
        return self.out_proj(self.norm(y, z)), time_next

    def _c_at(self, u: Tensor, index: Tensor, time: TimeState) -> Tensor:
        """C at `index` only, (B, N): the K projected inputs that reach it, convolved (zeros before position 0)."""
        n, d_in = self.d_state, self.d_inner
        _, (w, bias), _ = self.in_proj_parts()
        k = self.conv1d.weight.shape[-1]
        rows = torch.arange(u.shape[0], device=u.device)[:, None]
        pos = index[:, None] + torch.arange(1 - k, 1, device=u.device)  # (B, K), oldest first
        keep = (pos >= 0).unsqueeze(-1)  # (B, K, 1)
        pos = pos.clamp(min=0)
        c_in = F.linear(u[rows, pos], w[d_in + n :], None if bias is None else bias[d_in + n :])  # (B, K, N)
        c_in = time.mask(c_in, pos) * keep.to(c_in.dtype)
        c = torch.einsum("bkn,nk->bn", c_in, self.conv1d.weight[d_in + n :, 0])
        return self.act(c if self.conv1d.bias is None else c + self.conv1d.bias[d_in + n :])  # (B, N)

    def in_proj_parts(self) -> list[tuple[Tensor, Tensor | None]]:
        """(weight, bias) of in_proj's z, xBC and dt rows."""
        n, h, d_in = self.d_state, self.nheads, self.d_inner
        w, bias = self.in_proj.weight, self.in_proj.bias
        bounds = [(0, d_in), (d_in, 2 * d_in + 2 * n), (2 * d_in + 2 * n, 2 * d_in + 2 * n + h)]
        return [(w[a:b], None if bias is None else bias[a:b]) for a, b in bounds]

    # ------------------------------------------------------------------------------------------------ streaming
    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Empty memory: the last K - 1 convolution inputs (B, K - 1, D_in + 2N) and the SSD state (B, H, P, N)
        (float32; float64 for a float64 model)."""
        k, channels = self.conv1d.weight.shape[-1], self.conv1d.weight.shape[0]
        state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        conv = torch.zeros(batch_size, k - 1, channels, dtype=dtype, device=device)
        ssd = torch.zeros(batch_size, self.nheads, self.head_dim, self.d_state, dtype=state_dtype, device=device)
        return conv, ssd

    def step(self, state: tuple[Tensor, Tensor], u: Tensor, time: TimeState) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """One position of `forward`: u (B, d) -> out (B, d) and the new memory. `time`: valid (B,) and the last K
        gap features (B, K)."""
        conv_in, ssd_in = state
        b, n, d_in = u.shape[0], self.d_state, self.d_inner
        # 1. Input projection.
        z, xbc, dt = torch.split(self.in_proj(u), [d_in, d_in + 2 * n, self.nheads], dim=-1)
        # 2. The convolution over the last K inputs, oldest first.
        window = torch.cat([conv_in, time.mask(xbc)[:, None]], dim=1)  # (B, K, D_in + 2N)
        xbc = self.act((window * self.conv1d.weight[:, 0, :].T).sum(1) + self.conv1d.bias)  # (B, D_in + 2N)
        x, bmat, cmat = torch.split(xbc, [d_in, n, n], dim=-1)
        # 3-4. Step sizes (B, H); 0 for padding: the state passes unchanged.
        dt = self.time_scale.step(dt, time)
        delta = time.mask(step_sizes(dt.to(torch.promote_types(dt.dtype, torch.float32)), self.dt_bias))
        # 5. One step of the SSD recurrence.
        x = x.reshape(b, self.nheads, self.head_dim)  # (B, H, P)
        y, ssd = ssd_step(
            ssd_in, x, delta.to(ssd_in.dtype), -torch.exp(self.A_log), bmat[:, None], cmat[:, None], D=self.D
        )
        # 6. Gate, norm, out.
        return self.out_proj(self.norm(y.reshape(b, d_in), z)), (window[:, 1:], ssd)
