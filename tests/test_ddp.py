"""CPU DDP smoke test (2 gloo processes): fit runs, and validation metrics and predictions equal a single-process run
on the same checkpoint and an independent full-sort reference: no user counted twice, none lost.

The fixture has an odd number of users (23), so the two processes get 12 and 11 of them; Lightning's own distributed
sampler would pad by repeating one.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from conftest import NETWORK, NUM_USERS, L, cli, fixture_events, write_events, write_predict_config

from tim4rec_pl.model.tim4rec import TiM4Rec

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
DDP = ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"]


def run_ddp(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("tim4rec-pl")
    res = subprocess.run([str(exe), *map(str, args), *DDP], cwd=cwd, env=ENV, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-4000:]
    assert "All distributed processes registered. Starting with 2 processes" in res.stdout + res.stderr
    return res


def csv_metrics(save_dir: Path) -> dict[str, float]:
    """The last logged value of every metric in the CSVLogger's metrics.csv under ``save_dir``."""
    (path,) = save_dir.rglob("metrics.csv")
    out: dict[str, float] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            out.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return out


@pytest.fixture(scope="module")
def ddp_trained(tmp_path_factory):
    os.environ["WANDB_MODE"] = "disabled"
    tmp = tmp_path_factory.mktemp("ddp")
    events = fixture_events()
    cfg = write_predict_config(tmp, write_events(tmp / "events.inter", events))
    res = run_ddp("fit", "--config", cfg, "--trainer.limit_train_batches", "2", cwd=tmp)
    return tmp, cfg, events, res


def reference_val_metrics(ckpt: Path, events: dict, item_tokens: list[str], ks=(3, 5, 10)) -> dict[str, float]:
    """docs/evaluation.md on every user's validation position: rank = items scoring strictly higher than the target."""
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    net = TiM4Rec(num_items=len(item_tokens), max_seq_len=L, **NETWORK)
    net.load_state_dict({key.removeprefix("network."): v for key, v in state.items() if key.startswith("network.")})
    net.eval()
    item_id = {tok: i for i, tok in enumerate(item_tokens)}
    sums = {f"{m}@{k}": 0.0 for m in ("hr", "ndcg", "mrr") for k in ks}
    for rows in events.values():
        window, target = rows[:-2][-L:], item_id[rows[-2][0]]
        seq = torch.zeros(1, L, dtype=torch.long)
        ts = torch.zeros(1, L, dtype=torch.float32)
        seq[0, : len(window)] = torch.tensor([item_id[i] for i, _ in window])
        ts[0, : len(window)] = torch.tensor([float(t) for _, t in window])
        with torch.no_grad():
            scores = (net(seq, torch.tensor([len(window)]), ts) @ net.item_embedding.weight.T)[0].numpy()
        rank = int((scores[1:] > scores[target]).sum())
        for k in ks:
            if rank < k:
                sums[f"hr@{k}"] += 1.0
                sums[f"ndcg@{k}"] += 1.0 / math.log2(rank + 2)
                sums[f"mrr@{k}"] += 1.0 / (rank + 1)
    return {name: value / len(events) for name, value in sums.items()}


def test_ddp_fit_trains_and_checkpoints(ddp_trained):
    tmp, _, _, res = ddp_trained
    # The last layer's time-state update never reaches the loss; plain `ddp` works because those are frozen.
    assert "DDP: 4 parameter tensors never reach the loss and are frozen" in res.stderr
    assert (tmp / "runs/checkpoints/last.ckpt").is_file() and (tmp / "runs/checkpoints/best.ckpt").is_file()
    logged = csv_metrics(tmp / "runs")
    assert 0.0 <= logged["val/ndcg@10"] <= 1.0 and math.isfinite(logged["train/loss_epoch"])


def test_ddp_validation_equals_single_process_and_reference(ddp_trained, tmp_path):
    tmp, cfg, events, _ = ddp_trained
    ckpt = tmp / "runs/checkpoints/last.ckpt"
    logs = "--trainer.logger.init_args.save_dir"
    run_ddp("validate", "--config", cfg, "--ckpt_path", ckpt, logs, tmp_path / "2", cwd=tmp)
    two = {k: v for k, v in csv_metrics(tmp_path / "2").items() if k.startswith("val/")}
    single = cli("validate", "--config", cfg, "--ckpt_path", ckpt, logs, tmp_path / "1")
    one = {k: float(v) for k, v in single.trainer.callback_metrics.items() if k.startswith("val/")}
    assert len(one) == 9 and two.keys() == one.keys()
    for name, value in one.items():
        assert two[name] == pytest.approx(value, abs=1e-6), name
    tokens = single.datamodule.item_tokens
    for name, value in reference_val_metrics(ckpt, events, tokens).items():
        assert one[f"val/{name}"] == pytest.approx(value, abs=1e-6), name
    assert 0.0 < one["val/hr@10"] < 1.0  # a value a double-counted or lost user would change


def test_ddp_predictions_equal_single_process(ddp_trained, tmp_path):
    tmp, cfg, _, _ = ddp_trained
    ckpt = tmp / "runs/checkpoints/last.ckpt"
    common = ["--config", cfg, "--ckpt_path", ckpt, "--predictions.mode", "test", "--predictions.top_k", "5"]
    run_ddp("predict", *common, "--predictions.output", tmp_path / "ddp" / "p.parquet", cwd=tmp)
    cli("predict", *common, "--predictions.output", tmp_path / "one.parquet")
    two, one = pl.read_parquet(tmp_path / "ddp" / "p.parquet"), pl.read_parquet(tmp_path / "one.parquet")
    assert two.height == one.height == NUM_USERS * 5
    assert two.group_by("user_id").len()["len"].to_list() == [5] * NUM_USERS  # every user once, none lost
    assert two.drop("score").equals(one.drop("score"))  # same users in the same order, same items and ranks
    np.testing.assert_allclose(two["score"].to_numpy(), one["score"].to_numpy(), rtol=1e-6, atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["p.parquet"]  # parts merged and removed


@pytest.mark.parametrize("preset", ["ddp-1node", "ddp-multinode", "cpu-ddp"])
def test_presets_combine_with_a_dataset_config(preset, capsys):
    import yaml

    root = Path(__file__).resolve().parents[1]
    args = ["fit", "--config", root / "configs/ml-1m.yaml", "--config", root / f"configs/presets/{preset}.yaml"]
    with pytest.raises(SystemExit) as exit_info:
        cli(*args, "--print_config")
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    want = yaml.safe_load((root / f"configs/presets/{preset}.yaml").read_text())["trainer"]
    for key, value in want.items():  # the preset wins ...
        assert config["trainer"][key] == value or str(config["trainer"][key]) == str(value), key
    assert config["data"]["max_seq_len"] == 200  # ... and the dataset config's other settings stay
    assert any("ModelCheckpoint" in cb["class_path"] for cb in config["trainer"]["callbacks"])
