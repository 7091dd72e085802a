"""The training speed paths compute what the plain paths compute.

- `ssd_output_at` (the last layer's SSD at one position per sequence) against the plain recurrence
  (`tim4rec_pl.model.ssd_minimal`) in float64, values and gradients;
- the networks' `forward` (last layer evaluated at the output position only) against `encode` read at that
  position, values and parameter gradients, for both time paths and without time.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from tim4rec_pl.model.layers import Dropout, ssd_output_at
from tim4rec_pl.model.ssd_minimal import ssd_recurrence, step_sizes
from tim4rec_pl.model.tim4rec import TiM4Rec

F64 = torch.float64


def recurrence_outputs(x, dt, A, B, C, D, dt_bias) -> Tensor:
    """y_t for every t by the definition (`ssd_minimal.ssd_recurrence`), from raw step sizes."""
    return ssd_recurrence(x, step_sizes(dt, dt_bias), A, B, C, D)[0]  # (b, L, H, P)


def inputs(b=4, length=37, h=4, p=8, g=2, n=6, D="h", seed=0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    return dict(
        x=r(b, length, h, p),
        dt=r(b, length, h),
        A=-torch.rand(h, generator=gen, dtype=F64) * 15 - 1,  # A = -exp(A_log), A_log = log U[1, 16]
        B=r(b, length, g, n) / n**0.25,
        C=r(b, length, g, n) / n**0.25,
        D={None: None, "h": r(h), "hp": r(h, p)}[D],
        dt_bias=r(h) - 3,
    )


@pytest.mark.parametrize("D", [None, "h", "hp"])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_ssd_output_at_matches_the_recurrence(D: str | None, dtype: torch.dtype) -> None:
    args = inputs(D=D)
    index = torch.tensor([0, 36, 17, 5])
    want = recurrence_outputs(**args)[torch.arange(4), index]  # (b, H, P)
    cast = {k: (v.to(dtype) if v is not None else None) for k, v in args.items()}
    got = ssd_output_at(**cast, index=index, dt_softplus=True)
    assert got.dtype == dtype and got.shape == want.shape
    tol = 1e-12 if dtype == F64 else 2e-5
    torch.testing.assert_close(got.to(F64), want, rtol=tol, atol=tol)


def test_ssd_output_at_gradients_match_the_recurrence() -> None:
    args = {k: v.requires_grad_() for k, v in inputs(D="hp", seed=1).items() if v is not None}
    index = torch.tensor([3, 36, 0, 20])
    weights = torch.randn(4, 4, 8, dtype=F64)
    leaves = list(args.values())
    want = torch.autograd.grad((recurrence_outputs(**args)[torch.arange(4), index] * weights).sum(), leaves)
    got = torch.autograd.grad((ssd_output_at(**args, index=index, dt_softplus=True) * weights).sum(), leaves)
    for name, w, g in zip(args, want, got):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=name)


def test_ssd_output_at_takes_ready_step_sizes() -> None:
    """The causal time path passes delta itself (softplus applied, 0 at padding): no bias, no softplus."""
    args = inputs(D="h", seed=2)
    delta = F.softplus(args["dt"] + args["dt_bias"])
    delta[:, 30:] = 0.0  # padding: the state passes unchanged
    index = torch.tensor([29, 29, 10, 36])
    want, _ = ssd_recurrence(args["x"], delta, args["A"], args["B"], args["C"], args["D"])
    got = ssd_output_at(args["x"], delta, args["A"], args["B"], args["C"], index, D=args["D"])
    torch.testing.assert_close(got, want[torch.arange(4), index], rtol=1e-9, atol=1e-9)


def _batch(b: int, length: int, num_items: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (b,), generator=gen)
    lengths[0] = length
    item_seq = torch.randint(1, num_items, (b, length), generator=gen)
    item_seq[torch.arange(length) >= lengths[:, None]] = 0  # right padding
    ts = 1.0e9 + torch.cumsum(torch.rand(b, length, generator=gen) * 5000, 1)
    ts[item_seq == 0] = 0
    return item_seq, lengths, ts.float()


@pytest.mark.parametrize(
    "kwargs", [{}, {"is_time": False}, {"time_path": "causal"}], ids=["faithful", "no-time", "causal"]
)
def test_forward_equals_encode_at_the_last_position(kwargs: dict) -> None:
    torch.manual_seed(0)
    net = TiM4Rec(60, max_seq_len=24, d_model=16, head_dim=8, d_state=8, ssd_backend="torch", **kwargs).double()
    net.eval()  # dropout off: both paths see the same inputs
    item_seq, lengths, ts = _batch(6, 24, 60)
    rows = torch.arange(6)
    fast = net(item_seq, lengths, ts)  # (B, d)
    slow = net.encode(item_seq, lengths, ts)[rows, lengths - 1]  # (B, d)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)
    weights = torch.randn(6, 16, dtype=F64)
    params = [p for p in net.parameters() if p.requires_grad]
    g_fast = torch.autograd.grad((fast * weights).sum(), params, allow_unused=True)
    g_slow = torch.autograd.grad((slow * weights).sum(), params, allow_unused=True)
    for (name, _), a, b in zip(net.named_parameters(), g_fast, g_slow):
        if a is None or b is None:  # the last layer's next time state: unused by both outputs
            assert a is None or not a.abs().any(), name
            continue
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_dropout_rate_scale_and_gradient(p: float) -> None:
    drop = Dropout(p)
    x = torch.rand(400, 2500) + 0.5  # no zeros of its own
    torch.manual_seed(3)
    x.requires_grad_()
    y = drop(x)
    kept = y != 0
    p_eff = round(p * 65536) / 65536
    rate = 1 - kept.float().mean().item()
    assert abs(rate - p_eff) < 5 * (p_eff * (1 - p_eff) / x.numel()) ** 0.5  # 5 sigma of a binomial proportion
    torch.testing.assert_close(y[kept], x.detach()[kept] / (1 - p_eff))  # kept elements scaled by exactly 1/(1-p')
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad, kept.float() / (1 - p_eff))  # d out / d in is the mask itself
    # whole rows are not dropped together: the mask is elementwise
    assert 0.5 * p_eff < (1 - kept.float().mean(0)).mean().item() < 1.5 * p_eff


def test_dropout_is_seeded_by_torch_and_inert_in_eval() -> None:
    drop = Dropout(0.3)
    x = torch.ones(64, 64)
    torch.manual_seed(7)
    a = drop(x)
    torch.manual_seed(7)
    b = drop(x)
    c = drop(x)
    assert torch.equal(a, b) and not torch.equal(b, c)  # same seed, same mask; the stream moves on
    drop.eval()
    assert torch.equal(drop(x), x)
    assert torch.equal(Dropout(0.0)(x), x) and not Dropout(1.0)(x).any()
