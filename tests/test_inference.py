"""The inference path (`tim4rec_pl.inference`) computes what the plain model computes.

- the encoder against the plain network's forward (eval mode, no autograd) for every network shape: 1-3 layers,
  time path on/off, p2p on/off, FFN on/off, both time paths, SSD4Rec* and SASRec;
- the forward-only scan against the plain SSD definition (`tim4rec_pl.model.ssd_minimal`), its block rules and
  its fallback;
- the kernels against the layers they replace; the per-item table cache; batch slices side by side.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor, nn

import tim4rec_pl.inference.network as fast
import tim4rec_pl.inference.scan as scan
from tim4rec_pl import inference
from tim4rec_pl.inference import kernels, parallel
from tim4rec_pl.model.layers import GatedRMSNorm, causal_conv_channels_last
from tim4rec_pl.model.sasrec import SASRec
from tim4rec_pl.model.ssd_minimal import ssd_recurrence, step_sizes
from tim4rec_pl.model.tim4rec import TiM4Rec

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one intra-op thread


def batch(lengths: list[int], max_len: int, n_items: int, seed: int = 0, left: bool = False):
    """Right-padded (or left-padded) item ids and increasing float32 Unix seconds, 0 on padding."""
    gen = torch.Generator().manual_seed(seed)
    b = len(lengths)
    item_seq = torch.randint(1, n_items, (b, max_len), generator=gen)
    ts = (1.6e9 + torch.randint(0, 5000, (b, max_len), generator=gen).double().cumsum(1)).float()
    pad = torch.arange(max_len) >= torch.tensor(lengths)[:, None]
    if left:
        pad = pad.flip(1)
    item_seq[pad], ts[pad] = 0, 0.0
    item_seq_len = torch.tensor(lengths) if not left else torch.full((b,), max_len)
    return item_seq, item_seq_len, ts


def signal(model: nn.Module, seed: int = 0) -> nn.Module:
    """O(1) random weights, so every path (time path included) carries signal at the tolerances below."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.rand(p.shape, generator=gen) * 2.0 - 1.0)
            elif name.endswith("dt_bias"):
                p.copy_(torch.rand(p.shape, generator=gen) * 2.0 - 2.0)
            elif p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    return model.eval()


# ------------------------------------------------------------------------------------------- the whole network
def _shapes():
    for layers, is_time, p2p, ffn in itertools.product([1, 2, 3], [True, False], [False, True], [True, False]):
        if is_time or not p2p:  # p2p only changes the time gate
            yield dict(num_layers=layers, is_time=is_time, p2p_residual=p2p, is_ffn=ffn)


SHAPES = [
    dict(s, time_path=path)
    for s in _shapes()
    for path in ("reference", "causal")
    if not (path == "causal" and s["p2p_residual"])
]


@pytest.mark.parametrize("kwargs", SHAPES, ids=lambda k: "-".join(f"{key}={v}" for key, v in k.items()))
def test_encoder_equals_the_plain_network(kwargs: dict) -> None:
    length = 60  # two blocks of the inference scan (more than 1.4 x 32 positions)
    torch.manual_seed(0)
    model = signal(TiM4Rec(50, max_seq_len=length, d_model=16, d_state=8, head_dim=8, chunk_size=32, **kwargs))
    encoder = inference.for_network(model)
    assert isinstance(encoder, inference.FastTiM4Rec)
    for left in (False, True) if kwargs["time_path"] == "causal" else (False,):
        item_seq, item_seq_len, ts = batch([60, 33, 1, 47], length, 50, seed=len(SHAPES), left=left)
        with torch.no_grad():
            want = model(item_seq, item_seq_len, ts)  # (B, d)
        assert want.abs().max() > 0.5
        with torch.inference_mode():
            got = encoder(item_seq, item_seq_len, ts)
        assert not got.requires_grad and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_sasrec_uses_its_plain_forward_without_autograd() -> None:
    torch.manual_seed(0)
    model = SASRec(40, max_seq_len=12, d_model=16, num_heads=2, inner_size=32).eval()
    item_seq, item_seq_len, ts = batch([12, 5, 1], 12, 40)
    encoder = inference.for_network(model)
    got = encoder(item_seq, item_seq_len, ts)  # autograd on outside: the encoder turns it off
    assert not got.requires_grad
    with torch.no_grad():
        assert torch.equal(got, model(item_seq, item_seq_len, ts))


def test_compiled_network_shares_the_encoder_of_its_module() -> None:
    model = TiM4Rec(30, max_seq_len=6, d_model=16, d_state=8, head_dim=8)
    wrapped = nn.Module()
    wrapped._orig_mod = model  # what torch.compile's wrapper exposes
    assert inference.for_network(wrapped).network is model


# ------------------------------------------------------------------------------------ the per-item table, slices
@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(is_time=False), dict(time_path="causal"), dict(num_layers=1), dict(num_layers=3, is_ffn=False)],
    ids=["reference", "ssd4rec", "causal", "one-layer", "three-layers"],
)
def test_inference_equals_the_training_computation(kwargs: dict) -> None:
    """The encoder reads the first layer's input projection from a per-item table and runs the factorised scan;
    its scores equal the plain network's training-mode computation (autograd on)."""
    seq, lens, ts = batch([12, 7, 1, 12], 12, 40, seed=3)
    torch.manual_seed(1)
    model = TiM4Rec(40, max_seq_len=12, d_model=16, d_state=8, head_dim=8, chunk_size=4, **kwargs).eval()
    slow = model.score_all(seq, lens, ts)  # autograd on
    encoder = inference.for_network(model)
    assert slow.requires_grad and encoder._table is None
    with torch.inference_mode():
        fast_scores = encoder(seq, lens, ts) @ model.item_embedding.weight.T
    assert encoder._table is not None
    assert (fast_scores - slow.detach()).abs().max() < 1e-5 * slow.abs().max()


def test_item_table_follows_weight_updates_and_is_never_saved() -> None:
    seq, lens, ts = batch([9, 4], 9, 25, seed=4)
    torch.manual_seed(2)
    model = TiM4Rec(25, max_seq_len=9, d_model=16, d_state=8, head_dim=8, chunk_size=4)
    encoder = inference.for_network(model)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(2):
        model.eval()
        assert torch.allclose(encoder(seq, lens, ts), model(seq, lens, ts).detach(), atol=1e-5)
        model.train()
        opt.zero_grad()
        model.score_all(seq, lens, ts).logsumexp(-1).sum().backward()
        opt.step()  # updates every weight in place: the cached table is stale now
    with torch.no_grad():
        model.item_embedding.weight[3] += 1.0  # a direct in-place edit is seen too
    model.eval()
    assert torch.allclose(encoder(seq, lens, ts), model(seq, lens, ts).detach(), atol=1e-5)
    assert not any("table" in k for k in model.state_dict())


def test_no_item_table_for_huge_catalogues_or_under_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    seq, lens, ts = batch([6, 3], 6, 30)
    model = TiM4Rec(30, max_seq_len=6, d_model=16, d_state=8, head_dim=8).eval()
    encoder = inference.for_network(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        encoder(seq, lens, ts)
    assert encoder._table is None
    monkeypatch.setattr(fast, "ITEM_TABLE_BYTES", 1000)
    encoder(seq, lens, ts)
    assert encoder._table is None


def test_batch_slices_side_by_side_equal_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a multi-threaded CPU the encoder runs slices of the batch side by side: same result, threads restored."""
    monkeypatch.setattr(parallel, "MIN_TOKENS", 1)
    used = []
    real = parallel.run_sliced
    monkeypatch.setattr(parallel, "run_sliced", lambda fn, ranges, *t: used.append(ranges) or real(fn, ranges, *t))
    seq, lens, ts = batch([12, 7, 1, 12, 5], 12, 40, seed=5)
    torch.manual_seed(3)
    model = TiM4Rec(40, max_seq_len=12, d_model=16, d_state=8, head_dim=8, chunk_size=4).eval()
    encoder = inference.for_network(model)
    with torch.inference_mode():
        one = encoder(seq, lens, ts)  # the test runs on one thread: one slice
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            sliced = encoder(seq, lens, ts)
        assert torch.get_num_threads() == 2 and torch.is_grad_enabled()
        sliced_grad_on = encoder(seq, lens, ts)  # autograd on outside: the encoder turns it off itself
    finally:
        torch.set_num_threads(threads)
    assert used == [[(0, 5)], [(0, 2), (2, 5)], [(0, 2), (2, 5)]]
    assert not sliced_grad_on.requires_grad
    for out in (sliced, sliced_grad_on):
        assert torch.allclose(out, one, atol=1e-5)


# ---------------------------------------------------------------------------------------- the forward-only scan
def ssd_inputs(b=2, length=50, h=4, p=8, n=16, g=1, D="h", initial_state=False, dt_scale=1.0, seed=0) -> dict:
    """Realistic values: raw dt ~ N(0, 1) + a bias with softplus(bias) log-uniform in [1e-3, 0.1], -A in [1, 16]."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=F64)

    dt0 = torch.exp(torch.rand(h, generator=gen, dtype=F64) * math.log(100) + math.log(1e-3))
    delta = step_sizes(randn(b, length, h) * dt_scale, dt0 + torch.log(-torch.expm1(-dt0)))
    return dict(
        x=randn(b, length, h, p),
        delta=delta,
        A=-(torch.rand(h, generator=gen, dtype=F64) * 15 + 1),
        B=randn(b, length, g, n) / n**0.25,
        C=randn(b, length, g, n) / n**0.25,
        D={None: None, "h": randn(h), "hp": randn(h, p)}[D],
        initial_state=randn(b, h, p, n) if initial_state else None,
    )


def f32(inputs: dict) -> dict:
    return {k: (v.float() if v is not None else None) for k, v in inputs.items()}


@pytest.mark.parametrize("length", [1, 7, 50, 77, 200, 1024])
@pytest.mark.parametrize(
    "g, D, initial_state", [(1, "h", False), (1, None, True), (2, "hp", True)], ids=["D", "init", "groups"]
)
def test_inference_scan_matches_the_definition(length: int, g: int, D: str | None, initial_state: bool) -> None:
    inputs = ssd_inputs(length=length, g=g, D=D, initial_state=initial_state)
    y_ref, final_ref = ssd_recurrence(**inputs)
    y, final = scan.ssd_scan_inference(**f32(inputs), return_final_state=True)
    assert y.dtype == torch.float32 and y.shape == y_ref.shape and final.shape == final_ref.shape
    assert (y.double() - y_ref).abs().max() < 1e-5
    assert (final.double() - final_ref).abs().max() < 1e-5


def test_inference_scan_shortens_blocks_then_falls_back_when_decays_spread_wide(monkeypatch: pytest.MonkeyPatch):
    """Steps of ~30 spread a block's log-decays over thousands: the factorised path declines (its factors would
    leave float32's range) and the exact path gives the answer; the result stays accurate and finite."""
    inputs = ssd_inputs(length=120, dt_scale=30.0, initial_state=True)
    blocks = []
    real = scan._scan_inference
    monkeypatch.setattr(scan, "_scan_inference", lambda *a: blocks.append(a[7]) or real(*a))
    y_ref, final_ref = ssd_recurrence(**inputs)
    y, final = scan.ssd_scan_inference(**f32(inputs), return_final_state=True)
    assert blocks == [40, 20, 10]  # each declined
    assert (y.double() - y_ref).abs().max() < 1e-4 * y_ref.abs().max()
    assert (final.double() - final_ref).abs().max() < 1e-4 * final_ref.abs().max()
    blocks.clear()
    scan.ssd_scan_inference(**f32(ssd_inputs(length=120)))
    assert blocks == [40]  # accepted at once


def test_inference_block_rule() -> None:
    """Blocks of about 48 positions, a divisor of the length when one is near (no padded copies)."""
    rule = scan._inference_block
    assert [rule(n, 32) for n in (1, 5, 50, 67, 200, 800, 3200)] == [1, 5, 50, 67, 50, 50, 50]
    assert rule(199, 32) == 50 and rule(77, 32) == 39  # no divisor near: balanced blocks, the last one padded
    assert rule(1000, 100) == 100


def test_inference_scan_batch_slices_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = f32(ssd_inputs(b=5, length=70, g=2, initial_state=True))
    whole = scan.ssd_scan_inference(**inputs, return_final_state=True)
    monkeypatch.setattr(scan, "_INFERENCE_SLICE_BYTES", 1)  # one sequence per slice (on one thread)
    sliced = scan.ssd_scan_inference(**inputs, return_final_state=True)
    for a, b in zip(whole, sliced):
        assert (a - b).abs().max() < 1e-6


# ---------------------------------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("channels", [None, 5])
def test_onednn_convolution_equals_the_layer(channels: int | None) -> None:
    conv = nn.Conv1d(9, 9, 4, groups=9, padding=3)
    x = torch.randn(3, 17, 9 if channels is None else channels)
    want = causal_conv_channels_last(x, conv, channels)
    with torch.no_grad():
        got = kernels.causal_conv(x, conv, channels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_gated_norm_linear_and_inplace_activations_equal_the_layers() -> None:
    norm, linear = GatedRMSNorm(24, eps=1e-5), nn.Linear(24, 8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        y, z = torch.randn(4, 6, 24), torch.randn(4, 6, 24)
        want = linear(norm(y, z))
        got = kernels.gated_norm_linear(norm, y, z.clone(), linear)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for act in (nn.Hardswish(), nn.SiLU(), nn.ReLU(), nn.GELU()):
            x = torch.randn(50)
            assert torch.equal(kernels.inplace_activation(act, x.clone()), act(x))
