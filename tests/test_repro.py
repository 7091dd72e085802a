"""Reproducibility: two CPU runs of one config, in separate processes with different hash seeds and separate data
caches, log identical metrics and end with bitwise identical weights; a different seed gives a different run."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import torch
from conftest import finish, load, start_cli, write_fixture, write_run_config


def metrics_text(run_dir: Path) -> str:
    """The metrics.csv text without the wall-clock columns (perf/epoch_time_s, perf/samples_per_s)."""
    (metrics,) = (run_dir / "csv").rglob("metrics.csv")
    rows = list(csv.reader(io.StringIO(metrics.read_text())))
    keep = [i for i, name in enumerate(rows[0]) if not name.startswith("perf/")]
    assert len(keep) == len(rows[0]) - 2  # both throughput columns are there, and only they are dropped
    return "".join(",".join(row[i] for i in keep) + "\n" for row in rows)


def test_same_config_same_metrics_bitwise(tmp_path):
    data = write_fixture(tmp_path / "tiny.inter")
    cfgs = [write_run_config(tmp_path / f"run{i}", data, tmp_path / f"data{i}") for i in (1, 2)]
    other = write_run_config(tmp_path / "seed8", data, tmp_path / "data1", max_epochs=1, seed=8)
    runs = [start_cli("fit", "--config", str(cfg), cwd=tmp_path, PYTHONHASHSEED=str(i)) for i, cfg in enumerate(cfgs)]
    runs.append(start_cli("fit", "--config", str(other), cwd=tmp_path))
    for result in [finish(run) for run in runs]:
        assert result.returncode == 0, result.stderr[-3000:]

    a, b = (metrics_text(tmp_path / f"run{i}") for i in (1, 2))
    assert a == b  # every logged value, step by step, as text
    lines = a.splitlines()
    header = lines[0].split(",")
    assert "train/loss_step" in header and "val/ndcg@10" in header and len(lines) > 2 * 16
    ckpts = [load(tmp_path / f"run{i}" / "checkpoints" / "last.ckpt") for i in (1, 2)]
    assert ckpts[0]["global_step"] == 32
    for key, value in ckpts[0]["state_dict"].items():
        assert torch.equal(value, ckpts[1]["state_dict"][key]), key
    assert ckpts[0]["tim4rec_pl"]["data"]["checksum"] == ckpts[1]["tim4rec_pl"]["data"]["checksum"]

    # the comparison has teeth: seed_everything decides initial weights, dropout and data order
    first_epoch = [line for line in a.splitlines()[1:] if line.split(",")[header.index("epoch")] == "0"]
    c = metrics_text(tmp_path / "seed8").splitlines()[1:]
    assert len(c) == len(first_epoch) and c != first_epoch
