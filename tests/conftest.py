"""Shared test helpers and fixtures: tiny data files, configs and ways to run the CLI.

Test modules import helpers from here (never from each other); pytest puts this folder on sys.path.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from tim4rec_pl.cli import main, run_cli

TESTS = Path(__file__).resolve().parent


# -- a tiny RecBole atomic file ------------------------------------------------------------------------------------


def _load_tiny_runs():
    """The tiny-fixture writer lives in notebooks/make_tiny_runs.py (a script users run too); share it, not copy it."""
    path = Path(__file__).resolve().parents[1] / "notebooks" / "make_tiny_runs.py"
    spec = importlib.util.spec_from_file_location("make_tiny_runs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


write_fixture = _load_tiny_runs().write_fixture  # a RecBole atomic file in which every user and item survives 5-core


# -- offline W&B runs ---------------------------------------------------------------------------------------------

WANDB_HEADER = b":W&B"
BLOCK = 32768  # the .wandb file is a LevelDB-style log: 7-byte chunk headers in 32 KiB blocks


def wandb_records(path: Path) -> list:
    """Every record of an offline run's ``.wandb`` file, parsed with wandb's own protobuf schema."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == WANDB_HEADER
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_key(item) -> str:
    return item.key or "/".join(item.nested_key)


def of_type(records: list, kind: str) -> list:
    return [r for r in records if r.WhichOneof("record_type") == kind]


# -- torch threads -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a test module: tiny tensors gain nothing from more, every run does the same
    arithmetic, and a shared 2-core machine sees no OpenMP contention (modules opt in with ``usefixtures``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- running the CLI ---------------------------------------------------------------------------------------------


class SignalAfterSteps(Callback):
    """Test-only: sends ``TIM4REC_TEST_SIGNAL`` (default SIGTERM) to this process once ``global_step`` reaches
    ``TIM4REC_TEST_SIGNAL_AFTER_STEPS``. Added with ``--trainer.callbacks+=test_resilience.SignalAfterSteps``."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        if trainer.global_step == int(os.environ.get("TIM4REC_TEST_SIGNAL_AFTER_STEPS", "-1")):
            os.kill(os.getpid(), getattr(signal, os.environ.get("TIM4REC_TEST_SIGNAL", "SIGTERM")))


def write_run_config(
    run_dir: Path, data_file: Path, data_dir: Path, max_epochs: int = 2, loggers: str | None = None, seed: int = 7
) -> Path:
    """A tiny TiM4Rec fit: best.ckpt + last.ckpt, early stopping, a CSV logger (or ``loggers``, YAML list items)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    loggers = (
        loggers
        or f"""
    - class_path: lightning.pytorch.loggers.CSVLogger
      init_args: {{save_dir: {run_dir}, name: csv}}"""
    )
    cfg = run_dir / "tiny.yaml"
    cfg.write_text(f"""
seed_everything: {seed}
trainer:
  max_epochs: {max_epochs}
  accelerator: cpu
  devices: 1
  num_sanity_val_steps: 0
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  logger:{loggers}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {run_dir}/checkpoints, filename: best, monitor: val/ndcg@10, mode: max,
                  save_top_k: 1, save_last: true, enable_version_counter: false}}
    - class_path: lightning.pytorch.callbacks.EarlyStopping
      init_args: {{monitor: val/ndcg@10, mode: max, patience: 5}}
model:
  network:
    class_path: tim4rec_pl.model.tim4rec.TiM4Rec
    init_args: {{d_model: 16, d_state: 8, head_dim: 8, chunk_size: 4}}
  topk: [5, 10, 20]
data:
  path: {data_file}
  data_dir: {data_dir}
  max_seq_len: 10
  batch_size: 32
""")
    return cfg


def write_rooted_config(
    tmp: Path,
    data_file: Path,
    *,
    max_epochs: int = 2,
    batch_size: int = 32,
    wandb: bool = False,
    quiet: bool = False,
    **model: object,
) -> Path:
    """A tiny TiM4Rec config in the shipped configs' run-folder form: a ``run_root`` and no paths for the loggers or
    the checkpoints (the CLI points them at each run's folder). ``wandb`` adds a W&B logger, ``quiet`` turns off the
    progress bar and model summary, ``model`` adds keys to the ``model:`` section (e.g. ``lr_schedule``)."""
    wandb_logger = (
        "\n    - class_path: tim4rec_pl.tracking.WandbLogger\n      init_args: {project: tiny}" if wandb else ""
    )
    quiet_lines = "\n  enable_progress_bar: false\n  enable_model_summary: false" if quiet else ""
    extra = "".join(f"\n  {k}: {v}" for k, v in model.items())
    cfg = tmp / "tiny.yaml"
    cfg.write_text(f"""
seed_everything: 7
run_root: {tmp}/runs/tiny
trainer:
  max_epochs: {max_epochs}
  accelerator: cpu
  devices: 1
  num_sanity_val_steps: 0
  log_every_n_steps: 5{quiet_lines}
  logger:{wandb_logger}
    - class_path: lightning.pytorch.loggers.CSVLogger
      init_args: {{save_dir: {tmp}/runs/tiny}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{filename: best, monitor: val/ndcg@10, mode: max, save_top_k: 1, save_last: true,
                  enable_version_counter: false}}
    - class_path: lightning.pytorch.callbacks.EarlyStopping
      init_args: {{monitor: val/ndcg@10, mode: max, patience: 5}}
model:
  network:
    class_path: tim4rec_pl.model.tim4rec.TiM4Rec
    init_args: {{d_model: 16, d_state: 8, head_dim: 8, chunk_size: 4}}{extra}
  topk: [5, 10, 20]
data:
  path: {data_file}
  data_dir: {tmp}/data
  max_seq_len: 10
  batch_size: {batch_size}
""")
    return cfg


def subprocess_env(**extra: str | None) -> dict[str, str]:
    """This environment for a CLI subprocess, W&B disabled, ``extra`` on top (``None`` removes a variable)."""
    # one torch thread, here and in-process (`one_torch_thread`): the same arithmetic in every run, and no thread
    # contention on a small shared machine
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH", "")) if p)
    return env


def start_cli(*args: str, cwd: Path, **env: str | None) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("tim4rec-pl")
    return subprocess.Popen(
        [str(exe), *args], cwd=cwd, env=subprocess_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> SimpleNamespace:
    out, err = proc.communicate(timeout=timeout)
    return SimpleNamespace(returncode=proc.returncode, stdout=out, stderr=err)


def run_in_process(*args: str) -> int:
    """``tim4rec-pl ARGS`` inside this process; the exit code (0 when main returns)."""
    try:
        main(list(args))
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    return 0


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# -- the prediction fixture: well-separated timestamps, histories longer than the window -------------------------

NUM_USERS, NUM_ITEMS, L = 23, 20, 5  # an odd number of users (DDP splits them unevenly)
NETWORK = {"d_model": 16, "d_state": 8, "head_dim": 8, "chunk_size": 4}


def fixture_events(num_users: int = NUM_USERS, num_items: int = NUM_ITEMS) -> dict[str, list[tuple[str, int]]]:
    """Per user token, the (item token, timestamp) rows in time order; every user and item has >= 5 rows."""
    rng = np.random.default_rng(3)
    events = {}
    for u in range(num_users):
        n = 6 + (u * 5) % 9  # 6..14 interactions, longer than L
        items = rng.integers(0, num_items, size=n)
        t0 = 1_000_000_000 + u * 1_000_000
        events[f"u{u}"] = [(f"i{i}", t0 + 10_000 * j) for j, i in enumerate(items)]
    return events


def write_events(path: Path, events: dict[str, list[tuple[str, int]]]) -> Path:
    counts: dict[str, int] = {}
    for rows in events.values():
        for item, _ in rows:
            counts[item] = counts.get(item, 0) + 1
    assert min(counts.values()) >= 5 and min(len(r) for r in events.values()) >= 5  # nothing is k-core filtered
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for user, rows in reversed(list(events.items())):  # file order is not time order
        lines += [f"{user}\t{item}\t1.0\t{t}" for item, t in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_predict_config(tmp: Path, data_file: Path, topk: tuple[int, ...] = (3, 5, 10)) -> Path:
    cfg = tmp / "predict.yaml"
    cfg.write_text(f"""
seed_everything: 11
trainer:
  default_root_dir: {tmp}          # in-process runs: nothing lands in the working directory
  max_epochs: 1
  accelerator: cpu
  devices: 1
  num_sanity_val_steps: 0
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {tmp}/runs, name: csv}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {tmp}/runs/checkpoints, filename: best, monitor: val/ndcg@10, mode: max,
                  save_top_k: 1, save_last: true, enable_version_counter: false}}
model:
  network:
    class_path: tim4rec_pl.model.tim4rec.TiM4Rec
    init_args: {NETWORK}
  topk: {list(topk)}
  lr: 0.01
data:
  path: {data_file}
  data_dir: {tmp}/data
  max_seq_len: {L}
  batch_size: 32
  eval_batch_size: 7
""")
    return cfg


def cli(*args: str):
    """Run the CLI in this process (fast: no interpreter start-up) and return the LightningCLI object."""
    return run_cli([str(a) for a in args])
