"""End-to-end: the `tim4rec-pl` command trains, checkpoints and tests on a tiny fixture; user errors are one line."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_fixture

ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def write_config(tmp: Path, data_file: Path, max_epochs: int = 2) -> Path:
    cfg = tmp / "tiny.yaml"
    cfg.write_text(f"""
seed_everything: 7
trainer:
  max_epochs: {max_epochs}
  accelerator: cpu
  devices: 1
  num_sanity_val_steps: 0
  log_every_n_steps: 1
  enable_progress_bar: false
  logger:
    - class_path: lightning.pytorch.loggers.CSVLogger
      init_args: {{save_dir: {tmp}/runs, name: csv}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {tmp}/runs/checkpoints, filename: best, monitor: val/ndcg@10, mode: max,
                  save_top_k: 1, save_last: true, enable_version_counter: false}}
model:
  network:
    class_path: tim4rec_pl.model.tim4rec.TiM4Rec
    init_args: {{d_model: 16, d_state: 8, head_dim: 8, chunk_size: 4}}
  topk: [5, 10, 20]
data:
  path: {data_file}
  data_dir: {tmp}/data
  max_seq_len: 10
  batch_size: 32
""")
    return cfg


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("tim4rec-pl")
    return subprocess.run([str(exe), *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    cfg = write_config(tmp, write_fixture(tmp / "tiny.inter"))
    fit = run("fit", "--config", str(cfg), cwd=tmp)
    assert fit.returncode == 0, fit.stderr[-3000:]
    return tmp, cfg, fit


def test_fit_writes_checkpoints_and_metrics(trained):
    tmp, _, _ = trained
    assert (tmp / "runs/checkpoints/best.ckpt").is_file()
    assert (tmp / "runs/checkpoints/last.ckpt").is_file()
    metrics = next((tmp / "runs/csv").rglob("metrics.csv"))
    with metrics.open() as f:
        rows = list(csv.DictReader(f))
    val = [r for r in rows if r.get("val/ndcg@10")]
    assert len(val) == 2  # one validation per epoch
    assert all(0.0 <= float(r["val/ndcg@10"]) <= 1.0 for r in val)
    assert any(r.get("train/loss_step") for r in rows)


def test_test_on_best_checkpoint_reports_all_metrics(trained):
    tmp, cfg, _ = trained
    res = run("test", "--config", str(cfg), "--ckpt_path", "best", cwd=tmp)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    for name in ("hr", "ndcg", "mrr"):
        for k in (5, 10, 20):
            assert f"test/{name}@{k}" in out
    assert "best.ckpt" in out  # it really restored the best checkpoint


def test_help_and_print_config(tmp_path):
    res = run("fit", "--help", cwd=tmp_path)
    assert res.returncode == 0
    assert "--data.max_seq_len" in res.stdout and "--model.lr" in res.stdout
    cfg = write_config(tmp_path, tmp_path / "unused.inter")
    res = run("fit", "--config", str(cfg), "--print_config", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "class_path: tim4rec_pl.model.tim4rec.TiM4Rec" in res.stdout
    assert "d_model: 16" in res.stdout and "max_seq_len: 10" in res.stdout


def test_missing_data_file_is_one_clear_line(tmp_path):
    cfg = write_config(tmp_path, tmp_path / "does-not-exist.inter")
    res = run("fit", "--config", str(cfg), cwd=tmp_path)
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("tim4rec-pl: error: ") and "does-not-exist.inter" in lines[0]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "runs").exists()  # nothing half-written


def test_missing_checkpoint_is_one_clear_line(tmp_path):
    cfg = write_config(tmp_path, write_fixture(tmp_path / "tiny.inter"))
    res = run("test", "--config", str(cfg), "--ckpt_path", "best", cwd=tmp_path)
    assert res.returncode == 2
    assert "best.ckpt" in res.stderr and "Traceback" not in res.stderr
