"""The networks: shapes, causality, initialisation, trainability, and TiM4Rec against a slow float64 reference."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from reference_impl import full_sort_predict, random_reference_state_dict, reference_encode
from torch import nn

from tim4rec_pl.errors import UserError
from tim4rec_pl.model.layers import causal_conv_channels_last
from tim4rec_pl.model.sasrec import SASRec
from tim4rec_pl.model.tim4rec import TiM4Rec

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one intra-op thread


def make_batch(lengths: list[int], max_len: int, n_items: int, seed: int = 0, unix: bool = True):
    """RecBole-layout batch: left-aligned items, right-padded with 0; float32 timestamps, 0 on padding."""
    gen = torch.Generator().manual_seed(seed)
    b = len(lengths)
    item_seq = torch.randint(1, n_items, (b, max_len), generator=gen)
    gaps = torch.randint(0, 5000, (b, max_len), generator=gen).double()
    if unix:  # absolute Unix seconds, rounded to float32 like RecBole
        timestamps = (1.6e9 + gaps.cumsum(1)).float()
    else:  # small values (e.g. min-max normalised), where the time path carries more signal
        timestamps = (gaps.cumsum(1) / 5000.0).float()
    item_seq_len = torch.tensor(lengths)
    for i, n in enumerate(lengths):
        item_seq[i, n:] = 0
        timestamps[i, n:] = 0.0
    return item_seq, item_seq_len, timestamps


# ---------------------------------------------------------------------------------------------- shapes / API
SHAPE_CASES = [
    dict(num_layers=1, is_time=True, is_ffn=True, p2p_residual=False, conv_activation="hardswish", L=10, chunk=4),
    dict(num_layers=2, is_time=False, is_ffn=True, p2p_residual=False, conv_activation="silu", L=7, chunk=4),
    dict(num_layers=3, is_time=True, is_ffn=False, p2p_residual=True, conv_activation="hardswish", L=13, chunk=5),
    dict(num_layers=2, is_time=True, is_ffn=True, p2p_residual=True, conv_activation="silu", L=9, chunk=32),
]


@pytest.mark.parametrize("case", SHAPE_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_tim4rec_shapes(case):
    case = dict(case)
    length, chunk = case.pop("L"), case.pop("chunk")
    model = TiM4Rec(40, max_seq_len=length, d_model=16, d_state=8, head_dim=8, chunk_size=chunk, **case)
    seq, lens, ts = make_batch([length, 3, 1], length, 40)
    for train in (True, False):
        model.train(train)
        assert model.encode(seq, lens, ts).shape == (3, length, 16)
        assert model(seq, lens, ts).shape == (3, 16)
        scores = model.score_all(seq, lens, ts)
        assert scores.shape == (3, 40) and torch.isfinite(scores).all()
    assert model.item_embedding.weight.shape == (40, 16)
    with torch.no_grad():  # score_all is the tied dot product with every item, item 0 included
        expected = model(seq, lens, ts) @ model.item_embedding.weight.T
        assert torch.allclose(model.score_all(seq, lens, ts), expected)


def test_sasrec_shapes_and_timestamps_ignored():
    model = SASRec(40, max_seq_len=12, d_model=16, num_heads=2, inner_size=32).eval()
    seq, lens, ts = make_batch([12, 5], 12, 40)
    assert model.encode(seq, lens, ts).shape == (2, 12, 16)
    assert model.score_all(seq, lens, ts).shape == (2, 40)
    with torch.no_grad():
        assert torch.equal(model(seq, lens, ts), model(seq, lens, torch.zeros_like(ts)))
        shorter = model.score_all(seq[:, :8], lens.clamp(max=8), ts[:, :8])  # L < max_seq_len
    assert shorter.shape == (2, 40)


def test_chunk_size_does_not_change_the_result():
    seq, lens, ts = make_batch([11, 6, 2], 11, 30)
    outs = []
    for chunk in (3, 4, 32):
        torch.manual_seed(0)
        model = TiM4Rec(30, max_seq_len=11, d_model=16, d_state=8, head_dim=8, chunk_size=chunk).eval()
        with torch.no_grad():
            outs.append(model.score_all(seq, lens, ts))
    assert torch.allclose(outs[0], outs[1], atol=1e-5) and torch.allclose(outs[0], outs[2], atol=1e-5)


# ---------------------------------------------------------------------------------------------- the slow reference
def _reference_cases():
    for layers, is_time, p2p, ffn in itertools.product([1, 2, 3], [True, False], [False, True], [True, False]):
        if not is_time and p2p:
            continue  # p2p only changes the time gate
        yield layers, is_time, p2p, ffn


@pytest.mark.parametrize("layers,is_time,p2p,ffn", list(_reference_cases()))
def test_tim4rec_matches_slow_reference(layers, is_time, p2p, ffn):
    length, n_items, eps = 10, 50, 1e-5
    sd = random_reference_state_dict(
        n_items=n_items,
        d_model=16,
        max_seq_len=length,
        num_layers=layers,
        d_state=8,
        head_dim=8,
        is_time=is_time,
        is_ffn=ffn,
        p2p_residual=p2p,
        seed=layers,
    )
    model = TiM4Rec(
        n_items,
        max_seq_len=length,
        d_model=16,
        num_layers=layers,
        d_state=8,
        head_dim=8,
        chunk_size=4,
        norm_eps=eps,
        is_time=is_time,
        is_ffn=ffn,
        p2p_residual=p2p,
    )
    model.load_state_dict(sd, strict=True)  # the reference key layout loads as is
    model.eval()
    for unix in (True, False):
        seq, lens, ts = make_batch([10, 7, 3, 1], length, n_items, seed=layers + 10 * unix, unix=unix)
        ref = full_sort_predict(sd, seq, lens, ts, norm_eps=eps)
        assert ref.abs().max() > 1.0  # scores carry signal at the tolerance below
        with torch.no_grad():
            got = model.score_all(seq, lens, ts)
            got64 = model.double().score_all(seq, lens, ts)
            model.float()
        assert (got.double() - ref).abs().max() < 1e-4
        assert (got64 - ref).abs().max() < 1e-9


def test_tim4rec_own_init_silu_matches_reference_at_every_position():
    """The model's own initialisation, SiLU conv, tiny eps and L not a multiple of the chunk: encode() too."""
    torch.manual_seed(3)
    model = (
        TiM4Rec(
            25,
            max_seq_len=9,
            d_model=16,
            num_layers=2,
            d_state=8,
            head_dim=4,
            chunk_size=4,
            conv_activation="silu",
            p2p_residual=True,
        )
        .double()
        .eval()
    )
    seq, lens, ts = make_batch([9, 4, 1], 9, 25, seed=5, unix=False)
    sd = model.state_dict()
    with torch.no_grad():
        got = model.encode(seq, lens, ts)
    ref = reference_encode(sd, seq, ts, norm_eps=1e-12, conv_activation="silu")
    assert (got - ref).abs().max() < 1e-9
    ref_scores = full_sort_predict(sd, seq, lens, ts, norm_eps=1e-12, conv_activation="silu")
    with torch.no_grad():
        assert (model.score_all(seq, lens, ts) - ref_scores).abs().max() < 1e-9


# ---------------------------------------------------------------------------------------------- causality
def _networks():
    torch.manual_seed(0)
    yield TiM4Rec(30, max_seq_len=12, d_model=16, num_layers=2, d_state=8, head_dim=8, chunk_size=4, p2p_residual=True)
    yield TiM4Rec(30, max_seq_len=12, d_model=16, num_layers=2, d_state=8, head_dim=8, chunk_size=4, is_time=False)
    yield SASRec(30, max_seq_len=12, d_model=16, num_heads=2, inner_size=32)


@pytest.mark.parametrize("net", list(_networks()), ids=["tim4rec", "ssd4rec", "sasrec"])
def test_causal_in_items_and_forward_is_last_position(net):
    net.eval()
    seq, lens, ts = make_batch([12, 9, 5, 1], 12, 30, seed=2)
    with torch.no_grad():
        base = net.encode(seq, lens, ts)
        rows = torch.arange(4)
        assert torch.allclose(net(seq, lens, ts), base[rows, lens - 1], atol=1e-6)
        for t in (0, 4, 10):
            changed = seq.clone()
            changed[:, t + 1 :] = torch.randint(1, 30, changed[:, t + 1 :].shape)
            out = net.encode(changed, lens, ts)
            assert torch.allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-6)
            assert not torch.allclose(out[:, t + 1 :], base[:, t + 1 :], atol=1e-4)


def test_faithful_time_path_sees_all_timestamps():
    """The reference time path mixes positions (docs/model.md), so a later timestamp changes earlier outputs;
    without the time path, timestamps are ignored."""
    seq, lens, ts = make_batch([12, 12], 12, 30, seed=4, unix=False)
    later = ts.clone()
    later[:, 8:] += 3.0
    outs = {}
    for is_time in (True, False):
        sd = random_reference_state_dict(
            n_items=30, d_model=16, max_seq_len=12, num_layers=2, d_state=8, head_dim=8, is_time=is_time
        )
        net = TiM4Rec(30, max_seq_len=12, d_model=16, d_state=8, head_dim=8, is_time=is_time)
        net.load_state_dict(sd)
        with torch.no_grad():
            outs[is_time] = net.eval().encode(seq, lens, ts)[:, :8], net.encode(seq, lens, later)[:, :8]
    assert (outs[True][0] - outs[True][1]).abs().max() > 1e-3
    assert torch.equal(*outs[False])


# ---------------------------------------------------------------------------------------------- initialisation
def test_tim4rec_initialisation_statistics():
    torch.manual_seed(0)
    model = TiM4Rec(500, max_seq_len=50, d_model=64, num_layers=2, d_state=32, head_dim=2)  # 64 heads per layer
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    weights = torch.cat([m.weight.flatten() for m in linears])
    assert abs(weights.std().item() - 0.02) < 0.0005 and abs(weights.mean().item()) < 0.0005
    assert all(torch.all(m.bias == 0) for m in linears)
    # the time path's Linear(L -> L) layers are covered by the blanket pass too
    assert abs(model.ssd_layers[0].ssd.time_scale.mlp4time_scale[1].weight.std().item() - 0.02) < 0.002
    emb = model.item_embedding.weight
    assert abs(emb.std().item() - 0.02) < 0.001
    assert emb[0].abs().sum() > 0  # the blanket init overwrites the padding row
    for norm in [m for m in model.modules() if isinstance(m, nn.LayerNorm)]:
        assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)
    a_mag = torch.cat([layer.ssd.A_log.exp() for layer in model.ssd_layers])  # -A ~ U[1, 16]
    assert a_mag.min() >= 1 and a_mag.max() <= 16 and a_mag.min() < 2.5 and a_mag.max() > 14
    assert abs(a_mag.mean().item() - 8.5) < 1.2
    dt0 = F.softplus(torch.cat([layer.ssd.dt_bias for layer in model.ssd_layers]))  # log-uniform [1e-3, 0.1]
    assert dt0.min() >= 1e-3 * 0.999 and dt0.max() <= 0.1 * 1.001 and dt0.min() < 2e-3 and dt0.max() > 0.06
    assert abs(dt0.log().mean().item() - math.log(1e-2)) < 0.5  # mean of log U[log 1e-3, log 0.1]
    for layer in model.ssd_layers:
        assert torch.all(layer.ssd.D == 1) and torch.all(layer.ssd.norm.weight == 1)
    # Kaiming normal, fan_out = C * K for a depthwise (C, 1, K) kernel, bias 0
    convs = [layer.ssd.conv1d for layer in model.ssd_layers]
    w = torch.cat([c.weight.flatten() for c in convs])
    fan_out = convs[0].weight.shape[0] * convs[0].weight.shape[2]
    assert abs(w.std().item() / math.sqrt(2.0 / fan_out) - 1) < 0.06
    assert all(torch.all(c.bias == 0) for c in convs)
    assert all(torch.all(layer.ssd.time_scale.conv1d4time_1.bias == 0) for layer in model.ssd_layers)


def test_tim4rec_pytorch_default_conv_init():
    torch.manual_seed(0)
    model = TiM4Rec(50, max_seq_len=20, d_model=64, num_layers=2, d_state=32, head_dim=32, kaiming_init=False)
    w = torch.cat([layer.ssd.conv1d.weight.flatten() for layer in model.ssd_layers])
    bound = 1 / math.sqrt(4)  # PyTorch default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = K for depthwise
    assert w.abs().max() <= bound and abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 0.06
    assert any(layer.ssd.conv1d.bias.abs().sum() > 0 for layer in model.ssd_layers)


def test_sasrec_initialisation_statistics():
    torch.manual_seed(0)
    model = SASRec(500, max_seq_len=50, d_model=64)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    weights = torch.cat([m.weight.flatten() for m in linears])
    assert abs(weights.std().item() - 0.02) < 0.0005 and all(torch.all(m.bias == 0) for m in linears)
    assert abs(model.position_embedding.weight.std().item() - 0.02) < 0.002
    assert model.item_embedding.weight[0].abs().sum() > 0


# ---------------------------------------------------------------------------------------------- training
def _overfit(model: nn.Module, steps: int = 60) -> tuple[float, float, dict]:
    seq, lens, ts = make_batch([8, 8, 6, 5, 4, 3, 2, 1] * 2, 8, 20, seed=7, unix=False)
    target = torch.randint(1, 20, (16,), generator=torch.Generator().manual_seed(8))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    losses, first_grads = [], {}
    for step in range(steps):
        loss = F.cross_entropy(model(seq, lens, ts) @ model.item_embedding.weight.T, target)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            first_grads = {
                k: None if p.grad is None else p.grad.abs().sum().item() for k, p in model.named_parameters()
            }
        opt.step()
        losses.append(loss.item())
    return losses[0], min(losses[-5:]), first_grads


def test_tim4rec_overfits_a_tiny_batch_and_every_used_parameter_gets_gradient():
    torch.manual_seed(0)
    model = TiM4Rec(
        20,
        max_seq_len=8,
        d_model=16,
        num_layers=2,
        d_state=8,
        head_dim=8,
        chunk_size=4,
        dropout=0.0,
        time_dropout=0.0,
        p2p_residual=True,
    )
    first, last, grads = _overfit(model)
    assert first > 2.5 and last < 0.1 * first
    # The last layer's next time state feeds nothing, so its gate and LayerNorm get no gradient (as in the reference)
    unused = ("ssd_layers.1.ssd.time_scale.time_gate_residual", "ssd_layers.1.ssd.time_scale.time_layer_norm")
    for name, g in grads.items():
        if name.startswith(unused):
            assert g is None, name
        else:
            assert g is not None and g > 0, name


def test_sasrec_overfits_a_tiny_batch():
    torch.manual_seed(0)
    model = SASRec(20, max_seq_len=8, d_model=16, num_heads=2, inner_size=32, dropout=0.0, attn_dropout=0.0)
    first, last, grads = _overfit(model)
    assert first > 2.5 and last < 0.1 * first
    assert all(g is not None and g > 0 for g in grads.values())


@pytest.mark.parametrize("length,k", [(5, 3), (2, 4), (7, 1)])
def test_causal_conv_matches_conv1d_and_gradients(length, k):
    torch.manual_seed(0)
    conv = nn.Conv1d(6, 6, k, groups=6).double()
    x = torch.randn(2, length, 9, dtype=torch.float64)[..., 2:8].requires_grad_()  # a strided slice, as in TiSSD
    ref = F.conv1d(F.pad(x.transpose(1, 2), (k - 1, 0)), conv.weight, conv.bias, groups=6).transpose(1, 2)
    assert torch.allclose(causal_conv_channels_last(x, conv), ref)
    assert torch.autograd.gradcheck(lambda a, w, b: causal_conv_channels_last(a, conv), (x, conv.weight, conv.bias))
    with torch.no_grad():  # inference: one oneDNN kernel (on CPU), same values; also on a subset of the channels
        assert torch.allclose(causal_conv_channels_last(x, conv), ref)
        assert torch.allclose(causal_conv_channels_last(x[..., :4].contiguous(), conv, channels=4), ref[..., :4])
        out32 = causal_conv_channels_last(x.float(), conv.float())  # the oneDNN kernel runs float32
        assert out32.dtype == torch.float32 and torch.allclose(out32.double(), ref, atol=1e-5)


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(d_model=16, head_dim=5), "divisible by head_dim"),
        (dict(conv_activation="relu"), "conv_activation"),
        (dict(ssd_backend="cuda"), "ssd_backend"),
        (dict(dropout=1.0), "dropout"),
        (dict(num_items=1), "num_items"),
        (dict(norm_eps=0.0), "norm_eps"),
    ],
)
def test_tim4rec_rejects_bad_hyperparameters(kwargs, match):
    kwargs = {"num_items": 10, **kwargs}
    with pytest.raises(UserError, match=match):
        TiM4Rec(**kwargs)


def test_wrong_sequence_length_is_a_user_error():
    seq, lens, ts = make_batch([5, 3], 6, 10)
    with pytest.raises(UserError, match="max_seq_len"):
        TiM4Rec(10, max_seq_len=8, d_model=16, d_state=8, head_dim=8)(seq, lens, ts)
    TiM4Rec(10, max_seq_len=8, d_model=16, d_state=8, head_dim=8, is_time=False)(seq, lens, ts)  # no L-tied layers
    with pytest.raises(UserError, match="max_seq_len"):
        SASRec(10, max_seq_len=4, d_model=16)(seq, lens, ts)
    with pytest.raises(UserError, match="num_heads"):
        SASRec(10, d_model=16, num_heads=3)
