"""Reading reference (RecBole) checkpoints without RecBole, and loading weights into networks."""

from __future__ import annotations

import enum
import sys
import types
import warnings

import pytest
import torch
from reference_impl import full_sort_predict, random_reference_state_dict

from tim4rec_pl import inference, interop
from tim4rec_pl.errors import UserError
from tim4rec_pl.interop import (
    load_network_weights,
    load_recbole_checkpoint,
    read_recbole_checkpoint,
    tim4rec_kwargs_from_checkpoint,
)
from tim4rec_pl.model.sasrec import SASRec
from tim4rec_pl.model.tim4rec import TiM4Rec
from tim4rec_pl.model.time_path import upgrade_state_dict

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one intra-op thread


_FAKE_MODULES = ["recbole", "recbole.config", "recbole.config.configurator", "recbole.utils", "recbole.utils.enum_type"]


class _Evil:
    """Unpickling this with a plain unpickler would run code (creates a marker file)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def save_reference_checkpoint(path, state_dict, config: dict, as_object: bool, extra: dict | None = None) -> None:
    """torch.save a checkpoint shaped like the reference code's. With `as_object`, the config is an instance of a
    class from a fake `recbole.config.configurator` module that exists only while saving."""
    if not as_object:
        torch.save({"state_dict": state_dict, "config": config, "epoch": 3, **(extra or {})}, path)
        return
    mods = {name: types.ModuleType(name) for name in _FAKE_MODULES}

    class Config:
        def __init__(self, values: dict) -> None:
            self.final_config_dict = values
            self.internal_config_dict = {"seed": 2020}
            self.model = "TiM4Rec"

        def __getitem__(self, key):
            return self.final_config_dict[key]

    class ModelType(enum.Enum):
        SEQUENTIAL = 2

    Config.__module__, Config.__qualname__ = "recbole.config.configurator", "Config"
    ModelType.__module__, ModelType.__qualname__ = "recbole.utils.enum_type", "ModelType"
    mods["recbole.config.configurator"].Config = Config
    mods["recbole.utils.enum_type"].ModelType = ModelType
    sys.modules.update(mods)
    try:
        values = {**config, "MODEL_TYPE": ModelType.SEQUENTIAL, "device": torch.device("cpu"), "topk": [10, 20]}
        obj = {"state_dict": state_dict, "config": Config(values), "epoch": 3, "other_parameter": None}
        torch.save({**obj, **(extra or {})}, path)
    finally:
        for name in _FAKE_MODULES:
            del sys.modules[name]
    assert "recbole.config.configurator" not in sys.modules


def _batch(length: int, n_items: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    lengths = [length, 4, 1]
    seq = torch.randint(1, n_items, (3, length), generator=gen)
    ts = (1.6e9 + torch.randint(0, 5000, (3, length), generator=gen).double().cumsum(1)).float()
    for i, n in enumerate(lengths):
        seq[i, n:] = 0
        ts[i, n:] = 0.0
    return seq, torch.tensor(lengths), ts


CASES = [(layers, t, p) for layers in (1, 2, 3) for t, p in ((True, False), (True, True), (False, False))]


@pytest.mark.parametrize("layers,is_time,p2p", CASES)
def test_loaded_checkpoint_matches_reference(tmp_path, layers, is_time, p2p):
    length, n_items, eps = 8, 40, 1e-5
    sd = random_reference_state_dict(
        n_items=n_items,
        d_model=16,
        max_seq_len=length,
        num_layers=layers,
        d_state=8,
        head_dim=8,
        is_time=is_time,
        p2p_residual=p2p,
        seed=10 + layers,
    )
    config = {
        "hidden_size": 16,
        "num_layers": layers,
        "norm_eps": eps,
        "MAX_ITEM_LIST_LENGTH": length,
        "is_time": is_time,
        "p2p_residual": p2p,
        "dropout_prob": 0.3,
        "chunk_size": 4,
    }
    path = tmp_path / "TiM4Rec.pth"
    save_reference_checkpoint(path, sd, config, as_object=(layers + is_time) % 2 == 0)
    model = load_recbole_checkpoint(path)
    assert not model.training and model.is_time == is_time and len(model.ssd_layers) == layers
    seq, lens, ts = _batch(length, n_items, seed=layers)
    ref = full_sort_predict(sd, seq, lens, ts, norm_eps=eps)
    with torch.no_grad():
        assert (model.score_all(seq, lens, ts).double() - ref).abs().max() < 1e-4
        fast = inference.for_network(model)(seq, lens, ts) @ model.item_embedding.weight.T  # what validation runs
        assert (fast.double() - ref).abs().max() < 1e-4
        assert (model.double().score_all(seq, lens, ts) - ref).abs().max() < 1e-9  # norm_eps really is 1e-5


def test_config_object_is_read_without_recbole(tmp_path):
    sd = random_reference_state_dict(n_items=20, d_model=16, max_seq_len=6, num_layers=1, d_state=8, head_dim=8)
    path = tmp_path / "ref.pth"
    save_reference_checkpoint(path, sd, {"norm_eps": 1e-10, "time_drop_out": 0.1}, as_object=True)
    with pytest.raises(Exception):  # noqa: B017 - the file really needs more than weights_only
        torch.load(path, weights_only=True)
    state, config = read_recbole_checkpoint(path)
    assert config["norm_eps"] == 1e-10 and config["time_drop_out"] == 0.1 and config["topk"] == [10, 20]
    assert config["device"] == torch.device("cpu")
    assert set(state) == set(sd) and all(torch.equal(state[k], sd[k]) for k in sd)
    assert "recbole" not in sys.modules


def test_plain_file_loads_weights_only(tmp_path, monkeypatch):
    sd = random_reference_state_dict(n_items=20, d_model=16, max_seq_len=6, num_layers=1, d_state=8, head_dim=8)
    path = tmp_path / "ref.pth"
    save_reference_checkpoint(path, sd, {"norm_eps": 1e-10}, as_object=False)

    def fail():
        raise AssertionError("the restricted unpickler is not needed for a plain file")

    monkeypatch.setattr(interop, "_restricted_pickle_module", fail)
    state, config = read_recbole_checkpoint(path)
    assert config == {"norm_eps": 1e-10} and set(state) == set(sd)


def test_nothing_in_the_file_is_executed(tmp_path):
    marker = tmp_path / "pwned"
    sd = random_reference_state_dict(n_items=20, d_model=16, max_seq_len=6, num_layers=1, d_state=8, head_dim=8)
    path = tmp_path / "evil.pth"
    save_reference_checkpoint(path, sd, {"norm_eps": 1e-5, "payload": _Evil(str(marker))}, as_object=True)
    state, config = read_recbole_checkpoint(path)
    assert not marker.exists()
    assert config["norm_eps"] == 1e-5 and set(state) == set(sd)


def test_inferred_hyperparameters():
    sd = random_reference_state_dict(
        n_items=33,
        d_model=24,
        max_seq_len=7,
        num_layers=2,
        d_state=6,
        head_dim=12,
        expand=3,
        d_conv=3,
        is_time=True,
        is_ffn=False,
        p2p_residual=True,
    )
    config = {
        "dropout_prob": 0.3,
        "time_drop_out": 0.1,
        "chunk_size": 16,
        "norm_eps": 1e-10,
        "kaiming_init": False,
        "MAX_ITEM_LIST_LENGTH": 7,
        "hidden_size": 24,
    }
    kwargs = tim4rec_kwargs_from_checkpoint(sd, config)
    assert kwargs == dict(
        num_items=33,
        d_model=24,
        num_layers=2,
        d_state=6,
        d_conv=3,
        expand=3,
        head_dim=12,
        is_time=True,
        is_ffn=False,
        p2p_residual=True,
        max_seq_len=7,
        dropout=0.3,
        time_dropout=0.1,
        chunk_size=16,
        kaiming_init=False,
        norm_eps=1e-10,
    )
    TiM4Rec(**kwargs).load_state_dict(sd, strict=True)


def test_time_less_checkpoint_takes_length_from_config_and_warns_without_eps():
    sd = random_reference_state_dict(
        n_items=20, d_model=32, max_seq_len=5, num_layers=1, d_state=8, head_dim=8, is_time=False
    )  # d_inner 64 / P 8 = 8 heads: SiLU possible
    with pytest.warns(UserWarning) as record:
        kwargs = tim4rec_kwargs_from_checkpoint(sd, {"MAX_ITEM_LIST_LENGTH": 200})
    messages = " ".join(str(w.message) for w in record)
    assert "norm_eps" in messages and "silu" in messages.lower()
    assert kwargs["max_seq_len"] == 200 and kwargs["is_time"] is False and "norm_eps" not in kwargs
    sd4 = random_reference_state_dict(n_items=20, d_model=16, max_seq_len=5, num_layers=1, d_state=8, head_dim=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 4 heads: the reference always used hardswish, nothing to warn about
        tim4rec_kwargs_from_checkpoint(sd4, {"norm_eps": 1e-12})


def test_overrides_win(tmp_path):
    sd = random_reference_state_dict(n_items=30, d_model=16, max_seq_len=6, num_layers=2, d_state=8, head_dim=8)
    path = tmp_path / "ref.pth"
    save_reference_checkpoint(path, sd, {"norm_eps": 1e-12, "dropout_prob": 0.2}, as_object=True)
    model = load_recbole_checkpoint(path, norm_eps=1e-3, dropout=0.0, ssd_backend="torch", chunk_size=3)
    assert model.in_layer_norm.eps == 1e-3 and model.dropout.p == 0.0 and model.ssd_layers[0].ssd.chunk_size == 3
    seq, lens, ts = _batch(6, 30, seed=1)
    with torch.no_grad():
        got = model.double().score_all(seq, lens, ts)
    assert (got - full_sort_predict(sd, seq, lens, ts, norm_eps=1e-3)).abs().max() < 1e-9
    with pytest.raises(UserError, match="override"):
        load_recbole_checkpoint(path, no_such_argument=1)
    with pytest.raises(UserError, match=r"unexpected key 'ssd_layers\.1\."):
        load_recbole_checkpoint(path, num_layers=1)


def test_bad_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such checkpoint file"):
        read_recbole_checkpoint(tmp_path / "missing.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(UserError, match="not a PyTorch checkpoint"):
        read_recbole_checkpoint(corrupt)
    truncated = tmp_path / "truncated.pth"
    sd = random_reference_state_dict(n_items=20, d_model=16, max_seq_len=6, num_layers=1, d_state=8, head_dim=8)
    save_reference_checkpoint(truncated, sd, {}, as_object=False)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(UserError, match="truncated or damaged"):
        read_recbole_checkpoint(truncated)
    no_state = tmp_path / "no_state.pth"
    torch.save({"epoch": 1, "config": {}}, no_state)
    with pytest.raises(UserError, match="state_dict"):
        read_recbole_checkpoint(no_state)


def test_wrong_keys_and_shapes_are_named(tmp_path):
    sd = random_reference_state_dict(n_items=20, d_model=16, max_seq_len=6, num_layers=1, d_state=8, head_dim=8)
    renamed = dict(sd)
    renamed["ssd_layers.0.ssd.outproj.weight"] = renamed.pop("ssd_layers.0.ssd.out_proj.weight")
    path = tmp_path / "renamed.pth"
    save_reference_checkpoint(path, renamed, {"norm_eps": 1e-5}, as_object=False)
    with pytest.raises(UserError, match=r"'ssd_layers\.0\.ssd\.out_proj\.weight' is missing"):
        load_recbole_checkpoint(path)
    net = TiM4Rec(21, max_seq_len=6, d_model=16, num_layers=1, d_state=8, head_dim=8)  # one item too many
    save_reference_checkpoint(path, sd, {"norm_eps": 1e-5}, as_object=False)
    with pytest.raises(UserError, match=r"'item_embedding\.weight' has shape \(20, 16\) in the checkpoint"):
        load_network_weights(net, path)
    with pytest.raises(UserError, match="not a TiM4Rec reference state dict"):
        tim4rec_kwargs_from_checkpoint({"item_embedding.weight": torch.zeros(3, 4)}, {})


def test_load_network_weights_from_reference_and_lightning_files(tmp_path):
    sd = random_reference_state_dict(n_items=20, d_model=16, max_seq_len=6, num_layers=2, d_state=8, head_dim=8)
    ref_path = tmp_path / "ref.pth"
    save_reference_checkpoint(ref_path, sd, {"norm_eps": 1e-12}, as_object=True)
    net = TiM4Rec(20, max_seq_len=6, d_model=16, num_layers=2, d_state=8, head_dim=8)
    load_network_weights(net, ref_path)
    ours = dict(sd)
    upgrade_state_dict(ours)  # the reference time-path names, as this package names them
    assert all(torch.equal(net.state_dict()[k], ours[k]) for k in ours)

    for prefix in ("network.", "network._orig_mod."):  # ours, and ours saved from a compiled network
        ckpt = {
            "state_dict": {prefix + k: v for k, v in sd.items()},
            "hyper_parameters": {"lr": 1e-3},
            "pytorch-lightning_version": "2.6.0",
            "epoch": 4,
        }
        ckpt_path = tmp_path / "last.ckpt"
        torch.save(ckpt, ckpt_path)
        fresh = TiM4Rec(20, max_seq_len=6, d_model=16, num_layers=2, d_state=8, head_dim=8)
        load_network_weights(fresh, ckpt_path)
        assert all(torch.equal(fresh.state_dict()[k], ours[k]) for k in ours)

    sasrec = SASRec(20, max_seq_len=6, d_model=16)
    sas_path = tmp_path / "sasrec.ckpt"
    torch.save({"state_dict": {"network." + k: v + 1 for k, v in sasrec.state_dict().items()}}, sas_path)
    other = SASRec(20, max_seq_len=6, d_model=16)
    load_network_weights(other, sas_path)
    assert all(torch.equal(other.state_dict()[k], v + 1) for k, v in sasrec.state_dict().items())
    with pytest.raises(UserError, match="missing"):
        load_network_weights(other, ref_path)  # TiM4Rec weights into SASRec


def test_checkpoints_with_the_reference_time_path_names_load_strictly_into_the_lightning_module():
    """Checkpoints written before the time path's parameters moved into submodules use the reference names."""
    from tim4rec_pl.lightning_module import SeqRecModule

    sd = random_reference_state_dict(n_items=20, d_model=16, max_seq_len=6, num_layers=2, d_state=8, head_dim=8)
    module = SeqRecModule(TiM4Rec(20, max_seq_len=6, d_model=16, num_layers=2, d_state=8, head_dim=8))
    module.load_state_dict({"network." + k: v for k, v in sd.items()}, strict=True)
    ours = dict(sd)
    upgrade_state_dict(ours)
    assert set(ours) == set(module.network.state_dict()) and set(ours) != set(sd)
    assert all(torch.equal(module.network.state_dict()[k], v) for k, v in ours.items())
    fresh = SeqRecModule(TiM4Rec(20, max_seq_len=6, d_model=16, num_layers=2, d_state=8, head_dim=8))
    fresh.load_state_dict(module.state_dict(), strict=True)  # and today's names load as they are
    assert all(torch.equal(fresh.network.state_dict()[k], v) for k, v in ours.items())


def test_checkpoint_check_accepts_the_older_time_path_names_and_refuses_another_network(tmp_path):
    """`--ckpt_path` is checked against the network before anything runs: a checkpoint written with the reference
    time-path names passes (it loads, see above), one of another network is refused with one line."""
    from tim4rec_pl.checkpoints import check_checkpoint_file
    from tim4rec_pl.lightning_module import SeqRecModule

    sd = random_reference_state_dict(n_items=20, d_model=16, max_seq_len=6, num_layers=2, d_state=8, head_dim=8)
    path = tmp_path / "old-names.ckpt"
    torch.save({"state_dict": {"network." + k: v for k, v in sd.items()}, "pytorch-lightning_version": "2.6.0"}, path)
    module = SeqRecModule(TiM4Rec(20, max_seq_len=6, d_model=16, num_layers=2, d_state=8, head_dim=8))
    check_checkpoint_file(str(path), module)  # no error
    with pytest.raises(UserError, match="does not fit this config"):
        check_checkpoint_file(str(path), SeqRecModule(SASRec(20, max_seq_len=6, d_model=16)))
