"""The causal time path: slow reference, causality, padding invariance, any length, all-position training."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import write_fixture
from reference_impl import _causal_conv, _hardswish, _layer_norm, _linear, _silu, _softplus

from tim4rec_pl.cli import main, run_cli
from tim4rec_pl.data.datamodule import SeqRecDataModule
from tim4rec_pl.errors import UserError
from tim4rec_pl.model.tim4rec import TiM4Rec
from tim4rec_pl.model.time_path import gap_features

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one intra-op thread


def causal_net(seed: int = 0, **kw) -> TiM4Rec:
    """A small causal TiM4Rec with every parameter randomised to O(1) scales, so each path carries signal."""
    torch.manual_seed(seed)
    args = dict(max_seq_len=8, d_model=16, d_state=8, head_dim=8, chunk_size=4, time_path="causal", time_dim=6)
    net = TiM4Rec(40, **{**args, **kw})
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.rand_like(p) * 2.0 - 1.0)  # A in [-2.7, -0.4]
            elif name.endswith("dt_bias"):
                p.copy_(torch.rand_like(p) * 2.0 - 2.0)
            elif "time_scale.proj.weight" in name:
                p.copy_(torch.randn_like(p) * 0.5)  # a strong time signal
            elif p.dim() > 1:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]))
            else:
                p.add_(torch.randn_like(p) * 0.1)
    return net.eval()


def batch(lengths: list[int], width: int, seed: int = 0, n_items: int = 40, left: bool = False):
    """Items and Unix-second float64 timestamps (gaps 0..5000 s, ties included), padded with 0 on the right or left."""
    gen = torch.Generator().manual_seed(seed)
    b = len(lengths)
    items = torch.randint(1, n_items, (b, width), generator=gen)
    gaps = torch.randint(0, 5000, (b, width), generator=gen).double() * (torch.rand(b, width, generator=gen) > 0.3)
    ts = 1.6e9 + gaps.cumsum(1)
    for i, n in enumerate(lengths):
        if left:
            items[i, : width - n], ts[i, : width - n] = 0, 0.0
        else:
            items[i, n:], ts[i, n:] = 0, 0.0
    return items, torch.tensor(lengths), ts


# ------------------------------------------------------------------------------------- slow reference (float64)
def slow_causal_encode(net: TiM4Rec, items: list[int], times: list[float]) -> torch.Tensor:
    """Hidden states (n, d) of one history without any padding, from the math in `time_path`'s docstring:
    a Python loop over the recurrence, explicit convolution sums, float64; shares no code with the model."""
    sd = {k: v.detach().to(F64) for k, v in net.state_dict().items()}
    eps = net.in_layer_norm.eps
    n = len(items)
    g = torch.zeros(n, dtype=F64)
    for j in range(1, n):
        g[j] = math.log1p(max(times[j] - times[j - 1], 0.0))
    e = _layer_norm(sd["item_embedding.weight"][items], sd["in_layer_norm.weight"], sd["in_layer_norm.bias"], eps)
    num_layers = len(net.ssd_layers)
    for i in range(num_layers):
        s = f"ssd_layers.{i}.ssd."
        d_inner, h = sd[s + "norm.weight"].shape[0], sd[s + "A_log"].shape[0]
        p, ns = d_inner // h, net.ssd_layers[i].ssd.d_state
        proj = _linear(e, sd[s + "in_proj.weight"], sd[s + "in_proj.bias"])
        z, xbc, dt = proj[:, :d_inner], proj[:, d_inner : 2 * d_inner + 2 * ns], proj[:, 2 * d_inner + 2 * ns :]
        xbc = _hardswish(_causal_conv(xbc, sd[s + "conv1d.weight"], sd[s + "conv1d.bias"]))
        x, bm, cm = xbc[:, :d_inner], xbc[:, d_inner : d_inner + ns], xbc[:, d_inner + ns :]
        if net.is_time:
            t_dim = sd[s + "time_scale.conv.weight"].shape[0]
            conv = _causal_conv(
                g[:, None].repeat(1, t_dim), sd[s + "time_scale.conv.weight"], sd[s + "time_scale.conv.bias"]
            )
            dt = dt + _linear(_silu(conv), sd[s + "time_scale.proj.weight"], sd[s + "time_scale.proj.bias"])
        y = torch.zeros(n, d_inner, dtype=F64)
        for head in range(h):
            a = -math.exp(float(sd[s + "A_log"][head]))
            cols = slice(head * p, (head + 1) * p)
            state = torch.zeros(p, ns, dtype=F64)
            for t in range(n):
                delta = _softplus(float(dt[t, head] + sd[s + "dt_bias"][head]))
                state = math.exp(delta * a) * state + delta * torch.outer(x[t, cols], bm[t])
                y[t, cols] = state @ cm[t] + sd[s + "D"][head] * x[t, cols]
        gated = y * _silu(z)
        gated = gated / torch.sqrt((gated**2).mean(-1, keepdim=True) + eps) * sd[s + "norm.weight"]
        out = _linear(gated, sd[s + "out_proj.weight"], sd[s + "out_proj.bias"])
        if num_layers > 1:
            out = out + e
        pre = f"ssd_layers.{i}."
        hid = _layer_norm(out, sd[pre + "layer_norm.weight"], sd[pre + "layer_norm.bias"], eps)
        ff = _linear(_hardswish(_linear(hid, sd[pre + "ffn.fc1.weight"], sd[pre + "ffn.fc1.bias"])),
                     sd[pre + "ffn.fc2.weight"], sd[pre + "ffn.fc2.bias"])  # fmt: skip
        e = _layer_norm(ff + hid, sd[pre + "ffn.layer_norm.weight"], sd[pre + "ffn.layer_norm.bias"], 1e-12)
    return e


@pytest.mark.parametrize("is_time", [True, False], ids=["causal", "ssd4rec-masked"])
@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_matches_slow_reference_at_every_real_position(is_time, left):
    net = causal_net(is_time=is_time).double()
    items, lens, ts = batch([11, 6, 1], 11, seed=1, left=left)
    with torch.no_grad():
        hidden = net.encode(items, lens, ts)  # (B, L, d)
    for b in range(items.shape[0]):
        real = (items[b] != 0).nonzero().squeeze(1)
        ref = slow_causal_encode(net, items[b, real].tolist(), ts[b, real].tolist())
        assert torch.allclose(hidden[b, real], ref, atol=1e-9, rtol=0), (b, (hidden[b, real] - ref).abs().max())


def test_gap_features_hand_computed():
    items = torch.tensor([[5, 6, 7, 0, 0], [0, 0, 3, 4, 4]])
    ts = torch.tensor([[100.0, 100.0, 160.0, 0.0, 0.0], [0.0, 0.0, 50.0, 40.0, 47.0]])
    ctx = gap_features(items, ts)
    assert ctx.valid.tolist() == [[True, True, True, False, False], [False, False, True, True, True]]
    log = math.log1p
    # first real position and padding: 0; a negative gap (out-of-order time) counts as 0; ties give log1p(0) = 0
    expected = torch.tensor([[0.0, 0.0, log(60), 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, log(7)]])
    assert torch.allclose(ctx.gaps, expected.float())


# ------------------------------------------------------------------------------------- causality and padding
@pytest.mark.parametrize("grad", [True, False])
def test_output_at_t_ignores_everything_after_t(grad):
    """Training (autograd) is causal to the last bit. Inference (no autograd: the factorised scan, whose per-chunk
    scale and block choice see the whole chunk) is causal up to float32 rounding."""
    net = causal_net()
    items, lens, ts = batch([12, 12, 9], 12, seed=2)

    def same(a, b):
        return torch.equal(a, b) if grad else torch.allclose(a, b, rtol=0, atol=1e-5)

    with torch.set_grad_enabled(grad):
        base = net.encode(items, lens, ts)
        for t in (0, 3, 7, 10):
            gen = torch.Generator().manual_seed(t)
            later_items, later_ts = items.clone(), ts.clone()
            later_items[:, t + 1 :] = torch.randint(1, 40, later_items[:, t + 1 :].shape, generator=gen)
            later_ts[:, t + 1 :] = later_ts[:, t + 1 :] + torch.rand(later_ts[:, t + 1 :].shape, generator=gen) * 1e5
            for new_items, new_ts in ((later_items, ts), (items, later_ts)):
                out = net.encode(new_items, lens, new_ts)
                assert same(out[:, : t + 1], base[:, : t + 1]), (out[:, : t + 1] - base[:, : t + 1]).abs().max()
                assert not torch.allclose(out[:2, t + 1 :], base[:2, t + 1 :], atol=1e-4)  # later ones do change


def test_timestamps_matter_through_gaps_only():
    """Gaps, not absolute time: shifting every timestamp changes nothing; stretching one gap changes what follows."""
    net = causal_net()
    items, lens, ts = batch([10, 7], 10, seed=3)
    real = items != 0
    with torch.no_grad():
        base = net.encode(items, lens, ts)
        shifted = torch.where(real, ts - 1.5e9, ts)  # absolute time moved by 47 years, same gaps
        assert torch.allclose(net.encode(items, lens, shifted), base, atol=1e-5)
        stretched = ts.clone()
        stretched[:, 4:] += 86400.0 * real[:, 4:]  # one gap longer by a day
        out = net.encode(items, lens, stretched)
    assert torch.allclose(out[:, :4], base[:, :4], rtol=0, atol=1e-5)  # to float32 rounding (inference scan)
    assert (out[:, 4] - base[:, 4]).abs().max() > 1e-3


@pytest.mark.parametrize("pad", [1, 5, 13])
def test_padding_before_or_after_changes_nothing(pad):
    net = causal_net()
    items, lens, ts = batch([9, 4, 1], 9, seed=4)
    zeros_i, zeros_t = torch.zeros(3, pad, dtype=torch.long), torch.zeros(3, pad, dtype=F64)
    with torch.no_grad():
        base = net.encode(items, lens, ts)
        right = net.encode(torch.cat([items, zeros_i], 1), lens, torch.cat([ts, zeros_t], 1))
        assert torch.allclose(right[:, :9], base, atol=1e-5)
        assert torch.allclose(net(torch.cat([items, zeros_i], 1), lens, torch.cat([ts, zeros_t], 1)),
                              net(items, lens, ts), atol=1e-5)  # fmt: skip
        left_items, _, left_ts = batch([9, 4, 1], 9 + pad, seed=4, left=True)
        for b, n in enumerate([9, 4, 1]):  # the same histories, moved to the right end
            left_items[b, -n:], left_ts[b, -n:] = items[b, :n], ts[b, :n]
        left = net.encode(left_items, lens, left_ts)
    for b, n in enumerate([9, 4, 1]):
        assert torch.allclose(left[b, -n:], base[b, :n], atol=1e-5), b


def test_any_window_length_and_no_parameter_depends_on_it():
    short, long = causal_net(max_seq_len=8), causal_net(max_seq_len=200)
    assert {k: v.shape for k, v in short.state_dict().items()} == {k: v.shape for k, v in long.state_dict().items()}
    items, lens, ts = batch([40, 25], 40, seed=5)  # 5 x the training length
    with torch.no_grad():
        full = short.encode(items, lens, ts)
        prefix = short.encode(items[:, :17], torch.tensor([17, 17]), ts[:, :17])
        scores = short.score_all(items, lens, ts)
    assert torch.allclose(full[:, :17], prefix, atol=1e-5)
    rows = torch.arange(2)
    assert torch.allclose(scores, full[rows, lens - 1] @ short.item_embedding.weight.T, atol=1e-5)


def test_reference_path_unchanged_and_refuses_other_lengths():
    ref = TiM4Rec(40, max_seq_len=8, d_model=16, d_state=8, head_dim=8)
    assert "time.layer_norm_time.weight" in ref.state_dict() and not ref.supports_all_positions
    assert causal_net().supports_all_positions and TiM4Rec(40, is_time=False).supports_all_positions
    assert not any("mlp4time" in k or "layer_norm_time" in k for k in causal_net().state_dict())
    items, lens, ts = batch([9], 9)
    with pytest.raises(UserError, match="max_seq_len=8"):
        ref.encode(items, lens, ts.float())
    with pytest.raises(UserError, match="time_path"):
        TiM4Rec(40, time_path="sideways")


def test_causal_path_trains_every_used_parameter():
    net = causal_net().train()
    items, lens, ts = batch([8, 5], 8, seed=6)
    net.encode(items, lens, ts).square().sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == [], missing


# ------------------------------------------------------------------------------------- all-position training
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_fixture(tmp_path_factory.mktemp("causal") / "tiny.inter")


def _cli_args(tmp_path: Path, data_file: Path, *extra: str) -> list[str]:
    """The shipped causal config (its runs moved under tmp_path) on the tiny fixture with a small network."""
    return [
        "--config", str(ROOT / "configs/ml-100k-causal.yaml"), "--run_root", str(tmp_path / "runs/ml-100k-causal"),
        "--data.dataset", "null", "--data.path", str(data_file), "--data.data_dir", str(tmp_path / "data"),
        "--data.max_seq_len", "10", "--data.batch_size", "8",
        "--model.network.init_args.d_model", "16", "--model.network.init_args.d_state", "8",
        "--model.network.init_args.head_dim", "8", "--model.network.init_args.chunk_size", "4",
        "--model.topk", "[5, 10, 20]", "--model.lr", "0.01",
        "--trainer.max_epochs", "3", "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu",
        "--trainer.logger", "false",
        *extra,
    ]  # fmt: skip


def test_all_position_training_through_the_cli(tmp_path, data_file, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    args = _cli_args(tmp_path, data_file)
    fit = run_cli(["fit", *args])
    dm = fit.datamodule
    assert dm.train_mode == "all_positions" and fit.model.network.time_path == "causal"
    train = next(iter(dm.train_dataloader()))
    assert (train["targets"] > 0).sum() > 2 * train["item_seq"].shape[0]  # a loss term at many positions a row
    losses = [float(v) for k, v in fit.trainer.logged_metrics.items() if k == "train/loss_epoch"]
    assert losses and all(math.isfinite(v) for v in losses)
    assert 0.0 < float(fit.trainer.callback_metrics["val/ndcg@10"]) <= 1.0
    assert len(list(tmp_path.glob("runs/ml-100k-causal/*/checkpoints/best.ckpt"))) == 1
    test = run_cli(["test", *args, "--ckpt_path", "best"])
    assert 0.0 < float(test.trainer.callback_metrics["test/hr@20"]) <= 1.0

    # validation and test keep the evaluation protocol (docs/evaluation.md): the histories and targets of prefix
    # training
    prefix = SeqRecDataModule(path=str(data_file), data_dir=str(tmp_path / "data"), max_seq_len=10)
    prefix.setup("fit")
    for split in ("val", "test"):
        ours, theirs = getattr(dm, f"{split}_dataloader")(), getattr(prefix, f"{split}_dataloader")()
        pairs = list(zip(ours, theirs, strict=True))
        assert pairs
        for a, b in pairs:
            assert all(torch.equal(a[k], b[k]) for k in ("item_seq", "item_seq_len", "timestamps", "target"))


def test_reference_path_refuses_all_position_training(tmp_path, data_file, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["fit", *_cli_args(tmp_path, data_file, "--model.network.init_args.time_path", "reference")])
    assert stop.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("tim4rec-pl: error: data.train_mode all_positions"), errors
    assert "time_path: causal" in errors[0]
    assert not any(tmp_path.glob("runs/ml-100k-causal/*"))  # no run folder left behind
