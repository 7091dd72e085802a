"""The SSD (Mamba-2 "state space duality") as plain math: the definition every faster path is tested against.

Shapes: batch b, length L, heads H of width P, state size N, groups G (head h reads group h // (H // G)).

Per head, with a (P, N) state S and step sizes delta > 0:

    S_t = exp(delta_t A) S_(t-1) + delta_t x_t B_t^T          (1) the recurrence
    y_t = S_t C_t + D x_t

Unrolled, y = M (delta x) + D x with the 1-semiseparable mask

    M[t, s] = C_t . B_s exp(A (delta_(s+1) + ... + delta_t))  for s <= t, else 0      (2) the quadratic form

and the chunked form (3) applies (2) inside chunks of Q positions and (1) between chunks. All three give the same
y; `ssd_recurrence` is (1) one position at a time, `ssd_chunked` is (3) in a few einsums. Both compute in the
inputs' dtype (the tests use float64) and are slow on purpose: the fast scan lives in `tim4rec_pl.model.ssd`.
See docs/model.md for how TiM4Rec's time path changes delta, and with it the mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor


def step_sizes(dt: Tensor, dt_bias: Tensor | None = None, softplus: bool = True) -> Tensor:
    """delta = softplus(dt + dt_bias), per head: raw step sizes (..., H) -> positive step sizes (..., H).

    The one place the step-size rule is written; every SSD path (scan, streaming step, last-position read) calls it.
    """
    delta = dt if dt_bias is None else dt + dt_bias.to(dt.dtype)
    return F.softplus(delta) if softplus else delta


def _heads(t: Tensor, h: int) -> Tensor:
    """(b, L, G, N) -> (b, L, H, N): each head reads its group's B or C."""
    return repeat(t, "b l g n -> b l (g r) n", r=h // t.shape[2])


def ssd_recurrence(
    x: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(1): the SSD one position at a time.

    Args:
        x: (b, L, H, P) inputs.
        delta: (b, L, H) step sizes (after `step_sizes`).
        A: (H,) negative decay rates.
        B, C: (b, L, G, N) input and output projections.
        D: (H,) or (H, P) skip connection, or None.
        initial_state: (b, H, P, N) state before position 0; zeros when None.

    Returns:
        y (b, L, H, P) and the final state (b, H, P, N).
    """
    b, length, h, p = x.shape
    Bh, Ch = _heads(B, h), _heads(C, h)  # (b, L, H, N)
    state = x.new_zeros(b, h, p, B.shape[-1]) if initial_state is None else initial_state
    ys = []
    for t in range(length):
        decay = torch.exp(delta[:, t] * A)[..., None, None]  # (b, H, 1, 1)
        state = decay * state + torch.einsum("bh,bhp,bhn->bhpn", delta[:, t], x[:, t], Bh[:, t])  # (b, H, P, N)
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))  # (b, H, P)
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(x.shape)  # (b, L, H, P)
    if D is not None:
        y = y + x * (D[:, None] if D.dim() == 1 else D)
    return y, state


def segsum(a: Tensor) -> Tensor:
    """Segment sums: (..., Q) -> (..., Q, Q) with out[t, s] = a[s+1] + ... + a[t] for s <= t, -inf above."""
    q = a.shape[-1]
    cum = torch.cumsum(a, dim=-1)  # (..., Q)
    out = cum[..., :, None] - cum[..., None, :]  # (..., Q, Q)
    causal = torch.ones(q, q, dtype=torch.bool, device=a.device).tril()
    return out.masked_fill(~causal, -torch.inf)


def ssd_chunked(
    x: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
    chunk_size: int = 16,
) -> tuple[Tensor, Tensor]:
    """(3): the SSD in chunks, as einsums; arguments and results as `ssd_recurrence`."""
    b, length, h, p = x.shape
    pad = -length % chunk_size  # delta = 0 on padding: decay 1 and no input, so the state is unchanged
    xs, ds, Bs, Cs = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, delta, _heads(B, h), _heads(C, h)))
    xs, Bs, Cs = (rearrange(t, "b (c q) h k -> b c q h k", q=chunk_size) for t in (xs, Bs, Cs))
    a = rearrange(ds * A, "b (c q) h -> b h c q", q=chunk_size)  # (b, H, c, Q): log-decay per position
    xd = xs * rearrange(ds, "b (c q) h -> b c q h 1", q=chunk_size)  # (b, c, Q, H, P): delta_s x_s
    a_cum = torch.cumsum(a, dim=-1)  # (b, H, c, Q)

    # 1. Inside each chunk: the quadratic form (2).
    mask = torch.exp(segsum(a))  # (b, H, c, Q, Q)
    y_diag = torch.einsum("bcthn,bcshn,bhcts,bcshp->bcthp", Cs, Bs, mask, xd)  # (b, c, Q, H, P)

    # 2. The state each chunk ends with, from its own inputs only.
    to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (b, H, c, Q): decay from s to the chunk's end
    chunk_states = torch.einsum("bcshn,bhcs,bcshp->bchpn", Bs, to_end, xd)  # (b, c, H, P, N)

    # 3. Between chunks: the recurrence (1) over chunk-end states, one step per chunk.
    s0 = x.new_zeros(b, h, p, B.shape[-1]) if initial_state is None else initial_state
    states = torch.cat([s0[:, None], chunk_states], dim=1)  # (b, c + 1, H, P, N)
    chunk_decay = torch.exp(segsum(F.pad(a_cum[..., -1], (1, 0))))  # (b, H, c + 1, c + 1)
    states = torch.einsum("bhij,bjhpn->bihpn", chunk_decay, states)  # (b, c + 1, H, P, N): state after chunk i - 1
    entering, final = states[:, :-1], states[:, -1]  # (b, c, H, P, N), (b, H, P, N)

    # 4. Each position reads the state entering its chunk, decayed to it.
    y_off = torch.einsum("bcthn,bchpn,bhct->bcthp", Cs, entering, torch.exp(a_cum))  # (b, c, Q, H, P)

    y = rearrange(y_diag + y_off, "b c q h p -> b (c q) h p")[:, :length]  # (b, L, H, P)
    if D is not None:
        y = y + x * (D[:, None] if D.dim() == 1 else D)
    return y, final
