"""Experiment tracking: with no W&B key the run is written offline without a single network attempt, and the offline
run holds the resolved config (with data statistics and checksum), the metric history, the best-epoch summary and
the best checkpoint as an artifact; a second fit in the same folder works; ranks other than 0 never touch W&B."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import (
    finish,
    load,
    of_type,
    run_in_process,
    start_cli,
    wandb_key,
    wandb_records,
    write_fixture,
    write_run_config,
)
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only

from tim4rec_pl.tracking import BestMetricsSummary, WandbLogger, wandb_api_key_configured


def final_summary(records: list) -> dict:
    summary: dict = {}
    for record in of_type(records, "summary"):
        summary.update({wandb_key(item): json.loads(item.value_json) for item in record.summary.update})
    return summary


class NetworkTrap:
    """A local TCP server that W&B's base URL and every proxy variable point at: it records any connection."""

    def __init__(self) -> None:
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.hits: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            conn.settimeout(1)
            try:
                self.hits.append(conn.recv(200) or b"<connected>")
            except OSError:
                self.hits.append(b"<connected>")
            conn.close()

    def env(self) -> dict[str, str]:
        keys = ("WANDB_BASE_URL", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")
        return dict.fromkeys(keys, self.url)


@pytest.fixture(scope="module")
def offline_runs(tmp_path_factory):
    """Two fits in one folder with the W&B logger, no key, WANDB_MODE unset, HOME without ~/.netrc."""
    tmp = tmp_path_factory.mktemp("tracking")
    home = tmp / "home"
    home.mkdir()
    run_dir = tmp / "run"
    loggers = f"""
    - class_path: tim4rec_pl.tracking.WandbLogger
      init_args: {{name: tiny-run, save_dir: {run_dir}, project: tiny, tags: [tiny, offline], log_model: true}}
    - class_path: lightning.pytorch.loggers.CSVLogger
      init_args: {{save_dir: {run_dir}, name: csv}}"""
    cfg = write_run_config(run_dir, write_fixture(tmp / "tiny.inter"), tmp / "data", loggers=loggers)
    trap = NetworkTrap()
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("WANDB_") or k.lower().endswith("_proxy")}
    env.update({"WANDB_MODE": None, "WANDB_API_KEY": None, "NO_PROXY": None, "no_proxy": None, "HOME": str(home)})
    env.update(trap.env())
    first = finish(start_cli("fit", "--config", str(cfg), cwd=tmp, **env))
    second = finish(start_cli("fit", "--config", str(cfg), "--trainer.max_epochs", "1", cwd=tmp, **env))
    return SimpleNamespace(tmp=tmp, cfg=cfg, run_dir=run_dir, first=first, second=second, trap=trap)


def _offline_dir(result) -> Path:
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "wandb sync" in line]
    assert len(lines) == 1, result.stderr[-3000:]  # the sync hint, once (wandb's own footer is silenced)
    assert lines[0].startswith("W&B run written offline to ")
    path = Path(lines[0].rsplit("wandb sync ", 1)[1].strip())
    assert path.name.startswith("offline-run-") and path.is_dir()
    return path


def test_offline_without_a_key_and_no_network_attempt(offline_runs):
    for result in (offline_runs.first, offline_runs.second):
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Traceback" not in result.stderr
        _offline_dir(result)
    assert offline_runs.trap.hits == []  # not one connection to W&B's URL or through a proxy


def test_second_fit_in_the_same_folder_rewrites_config_yaml(offline_runs):
    first, second = _offline_dir(offline_runs.first), _offline_dir(offline_runs.second)
    assert first != second
    saved = yaml.safe_load((offline_runs.run_dir / "config.yaml").read_text())
    assert saved["trainer"]["max_epochs"] == 1  # the second run's config, written over the first one's


def _config(records: list) -> dict:
    config = {}
    for record in of_type(records, "config"):
        config.update({wandb_key(item): json.loads(item.value_json) for item in record.config.update})
    return config


def test_offline_run_holds_the_resolved_config_and_data_identity(offline_runs, capsys, monkeypatch):
    records = wandb_records(next(_offline_dir(offline_runs.first).glob("run-*.wandb")))
    (run,) = of_type(records, "run")
    assert run.run.display_name == "tiny-run" and list(run.run.tags) == ["tiny", "offline"]
    assert run.run.project == "tiny"
    config = _config(records)
    logged = config["config"]
    assert logged["model"]["network"]["init_args"]["d_model"] == 16 and logged["trainer"]["max_epochs"] == 2
    assert logged["data"]["batch_size"] == 32 and logged["seed_everything"] == 7
    best = load(offline_runs.run_dir / "checkpoints" / "best.ckpt")["tim4rec_pl"]
    assert config["data_checksum"] == best["data"]["checksum"]
    assert config["data_stats"]["users"] == 40 and config["data_stats"]["items"] == 30
    assert config["lr"] == 0.001  # Lightning's own hyperparameter logging is there too
    # the second run logged exactly what --print_config prints for its arguments
    second = _config(wandb_records(next(_offline_dir(offline_runs.second).glob("run-*.wandb"))))["config"]
    monkeypatch.setattr(sys, "argv", ["tim4rec-pl"])
    assert run_in_process("fit", "--config", str(offline_runs.cfg), "--trainer.max_epochs", "1", "--print_config") == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert second == printed, {k: (second.get(k), printed.get(k)) for k in second.keys() | printed.keys()
                               if second.get(k) != printed.get(k)}  # fmt: skip


def test_offline_run_holds_history_summary_and_model(offline_runs):
    records = wandb_records(next(_offline_dir(offline_runs.first).glob("run-*.wandb")))
    history = [
        {wandb_key(item): json.loads(item.value_json) for item in r.history.item} for r in of_type(records, "history")
    ]
    steps = [h for h in history if "train/loss_step" in h]
    assert len(steps) == 32 and all(h["train/loss_step"] > 0 for h in steps)
    val = [h for h in history if "val/ndcg@10" in h]
    assert [h["epoch"] for h in val] == [0, 1]
    assert all(f"val/{m}@{k}" in val[0] for m in ("hr", "ndcg", "mrr") for k in (5, 10, 20))
    assert [h["train/lr"] for h in history if "train/lr" in h] == pytest.approx([1e-3, 1e-3])

    summary = final_summary(records)
    best = max(val, key=lambda h: h["val/ndcg@10"])
    assert summary["best/val/ndcg@10"] == best["val/ndcg@10"] and summary["best/epoch"] == best["epoch"]
    assert summary["best/val/hr@20"] == best["val/hr@20"] and summary["best/step"] == 16 * (best["epoch"] + 1)
    # the checkpoints carry the same best values (best.ckpt now belongs to the second, one-epoch run)
    second = final_summary(wandb_records(next(_offline_dir(offline_runs.second).glob("run-*.wandb"))))
    ckpt = load(offline_runs.run_dir / "checkpoints" / "best.ckpt")
    assert ckpt["callbacks"]["BestMetricsSummary"]["best"] == {k: v for k, v in second.items() if k.startswith("best/")}

    artifacts = [r.artifact for r in of_type(records, "artifact")]
    assert artifacts and {a.type for a in artifacts} == {"model"}
    (best_artifact,) = [a for a in artifacts if "best" in a.aliases]
    (entry,) = best_artifact.manifest.contents
    assert entry.path == "model.ckpt" and entry.size > 0
    assert json.loads(best_artifact.metadata)["original_filename"] == "best.ckpt"


# ------------------------------------------------------------------------------------------------- in-process
@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for key in list(os.environ):
        if key.startswith("WANDB_"):
            monkeypatch.delenv(key)
    for key in ("WANDB_MODE", "WANDB_SILENT", "WANDB_API_KEY"):
        monkeypatch.delenv(key, raising=False)  # restored after the test even when the logger sets them
    monkeypatch.setenv("HOME", str(tmp_path))
    return monkeypatch


def test_api_key_detection(clean_env, tmp_path):
    assert not wandb_api_key_configured()
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine example.org login user password secret\n")
    netrc.chmod(0o600)
    assert not wandb_api_key_configured()
    netrc.write_text("machine api.wandb.ai login user password k" + "0" * 39 + "\n")
    assert wandb_api_key_configured()
    clean_env.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert not wandb_api_key_configured()  # a key for another host does not count
    clean_env.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_api_key_configured()


def test_mode_follows_the_key_and_wandb_mode(clean_env, tmp_path):
    logger = WandbLogger(save_dir=str(tmp_path / "a"), log_model=True)  # no key: offline, log_model still allowed
    assert logger._offline and logger._log_model is True and logger._wandb_init["mode"] == "offline"
    assert os.environ["WANDB_MODE"] == "offline" and os.environ["WANDB_SILENT"] == "true"
    assert "anonymous" not in logger._wandb_init
    clean_env.setenv("WANDB_MODE", "disabled")
    for offline in (None, True):
        logger = WandbLogger(save_dir=str(tmp_path / "b"), offline=offline)
        assert not logger._offline and "mode" not in logger._wandb_init and os.environ["WANDB_MODE"] == "disabled"
    clean_env.delenv("WANDB_MODE")
    clean_env.setenv("WANDB_API_KEY", "k" * 40)
    logger = WandbLogger(save_dir=str(tmp_path / "c"))
    assert not logger._offline and "mode" not in logger._wandb_init and "WANDB_MODE" not in os.environ


def test_ranks_other_than_zero_never_touch_wandb(clean_env, tmp_path, capsys):
    clean_env.setattr(rank_zero_only, "rank", 1)
    logger = WandbLogger(name="r1", save_dir=str(tmp_path / "w"))
    logger.log_hyperparams({"config": {"a": 1}})
    logger.log_metrics({"val/ndcg@10": 0.5}, step=1)
    logger.finalize("success")
    assert logger._experiment is None and not (tmp_path / "w" / "wandb").exists()
    assert "W&B run written offline" not in capsys.readouterr().err

    trainer = _FakeTrainer(metrics={"val/ndcg@10": 0.5}, rank=1, logger=logger)
    summary = BestMetricsSummary()
    summary.on_validation_end(trainer, None)
    assert summary.best == {} and logger._experiment is None


class _Run:
    def __init__(self) -> None:
        self.summary: dict = {}


class _FakeTrainer:
    def __init__(self, metrics: dict, rank: int = 0, logger=None, epoch: int = 0, step: int = 0, monitor=None) -> None:
        self.callback_metrics = {k: torch.tensor(v) for k, v in metrics.items()}
        self.is_global_zero = rank == 0
        self.sanity_checking = False
        self.state = SimpleNamespace(fn=TrainerFn.FITTING)
        self.loggers = [logger] if logger is not None else []
        self.current_epoch, self.global_step = epoch, step
        self.checkpoint_callback = ModelCheckpoint(monitor=monitor[0], mode=monitor[1]) if monitor else None


def test_best_summary_follows_the_checkpoint_monitor_and_survives_resume(clean_env, tmp_path):
    run = _Run()
    logger = WandbLogger(save_dir=str(tmp_path / "w"), experiment=run)
    summary = BestMetricsSummary()
    epochs = [{"val/ndcg@10": 0.2, "val/hr@10": 0.5}, {"val/ndcg@10": 0.3, "val/hr@10": 0.4},
              {"val/ndcg@10": float("nan"), "val/hr@10": 0.9}, {"val/ndcg@10": 0.25, "val/hr@10": 0.8}]  # fmt: skip
    for epoch, metrics in enumerate(epochs):
        summary.on_validation_end(_FakeTrainer({**metrics, "train/loss": 1.0}, logger=logger, epoch=epoch,
                                               step=10 * (epoch + 1)), None)  # fmt: skip
    assert run.summary == pytest.approx({"best/val/ndcg@10": 0.3, "best/val/hr@10": 0.4, "best/epoch": 1,
                                         "best/step": 20})  # fmt: skip
    validating = _FakeTrainer({"val/ndcg@10": 0.9}, logger=logger, epoch=9)
    validating.state.fn = TrainerFn.VALIDATING  # `tim4rec-pl validate` is not an epoch of training
    summary.on_validation_end(validating, None)
    assert run.summary["best/epoch"] == 1
    # resumed in a new process: the state comes from the checkpoint, the new run's summary starts from it
    restored, new_run = BestMetricsSummary(), _Run()
    restored.load_state_dict(torch.load(_saved(summary.state_dict(), tmp_path), weights_only=True))
    trainer = _FakeTrainer({}, logger=WandbLogger(save_dir=str(tmp_path / "w2"), experiment=new_run))
    restored.on_fit_start(trainer, None)
    assert new_run.summary == run.summary
    # a loss-like monitor taken from the checkpoint callback: smaller is better
    loss_summary, loss_run = BestMetricsSummary(), _Run()
    loss_logger = WandbLogger(save_dir=str(tmp_path / "w3"), experiment=loss_run)
    for epoch, value in enumerate([0.9, 0.7, 0.8]):
        trainer = _FakeTrainer({"val/loss": value}, logger=loss_logger, epoch=epoch, monitor=("val/loss", "min"))
        loss_summary.on_validation_end(trainer, None)
    assert loss_run.summary["best/epoch"] == 1 and loss_run.summary["best/val/loss"] == pytest.approx(0.7)


def _saved(state: dict, folder: Path) -> Path:
    path = folder / "summary.pt"
    torch.save(state, path)
    return path
