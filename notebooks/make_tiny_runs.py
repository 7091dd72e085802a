"""Make two tiny finished runs for ``analysis.ipynb``: TiM4Rec (time path on) and SSD4Rec* (time path off).

Each run is trained and tested through the ``tim4rec-pl`` command, exactly as a user would, on a synthetic 40-user
fixture, with the same loggers and run folders as ``configs/ml-100k.yaml`` (run root ``<out>/runs/<name>``, one run
folder ``<run>`` in it)::

    <run>/csv/version_0/metrics.csv     fit: train loss, learning rate, validation metrics per epoch
    <run>/csv/version_1/metrics.csv     test: test metrics of the best checkpoint
    <run>/checkpoints/{best,last}.ckpt
    <run>/wandb/offline-run-*/          the offline W&B directories of fit and test (one W&B run id)
    <run>/config.yaml                   the resolved config of the fit
    <run>/predictions/test.parquet      top-20 per user, ``predict`` in test mode (TiM4Rec only, so that the
                                        notebook also meets a run without predictions)

CI uses it to execute the notebook on something small (``tests/test_notebook.py``); by hand::

    python notebooks/make_tiny_runs.py /tmp/tiny
    TIM4REC_RUNS="$(cat /tmp/tiny/runs.json)" jupyter nbconvert --to notebook --execute notebooks/analysis.ipynb \
        --output /tmp/tiny/analysis.ipynb
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

# display name -> (run folder name, is_time)
TINY_RUNS = {"TiM4Rec": ("tim4rec", True), "SSD4Rec*": ("ssd4rec", False)}


def write_fixture(path: Path, users: int = 40, items: int = 30, seed: int = 0) -> Path:
    """Write a RecBole atomic file in which every user and every item survives the 5-core filter.

    Args:
        path: File to write.
        users: Number of users; each gets 8-15 random interactions.
        items: Number of items; each also gets 5 extra interactions so that none is filtered out.
        seed: Seed of the generator.
    """
    rng = np.random.default_rng(seed)
    rows: list[tuple[str, str, float, int]] = []
    for u in range(users):
        n = int(rng.integers(8, 16))
        chosen = rng.choice(items, size=n, replace=True)
        times = 1_000_000_000 + int(rng.integers(0, 10_000_000)) + np.cumsum(rng.integers(0, 5000, size=n))
        rows += [(f"u{u}", f"i{i}", 3.0, int(t)) for i, t in zip(chosen, times)]
    for i in range(items):
        rows += [(f"u{k}", f"i{i}", 1.0, 1_100_000_000 + 10 * i + k) for k in range(5)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
        f.writelines("\t".join(map(str, r)) + "\n" for r in rows)
    return path


def write_config(out: Path, run: str, data_file: Path, is_time: bool, epochs: int = 3) -> Path:
    """Write the config of one tiny run: the layout of ``configs/ml-100k.yaml``, a 16-d network, window 10.

    Args:
        out: Folder of the tiny runs; the runs go under ``<out>/runs/<run>/`` and the config to ``<out>/<run>.yaml``.
        run: Run folder name.
        data_file: The interactions file (see ``write_fixture``).
        is_time: TiM4Rec's time path on (TiM4Rec) or off (SSD4Rec*).
        epochs: Training epochs.
    """
    save = out / "runs" / run
    cfg = out / f"{run}.yaml"
    cfg.write_text(f"""\
seed_everything: 7
run_root: {save}
trainer:
  max_epochs: {epochs}
  accelerator: cpu
  devices: 1
  num_sanity_val_steps: 0
  log_every_n_steps: 5
  enable_progress_bar: false
  enable_model_summary: false
  logger:
    - class_path: tim4rec_pl.tracking.WandbLogger
      init_args: {{project: tim4rec-pl, tags: [tiny]}}
    - class_path: lightning.pytorch.loggers.CSVLogger
      init_args: {{save_dir: {save}}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{filename: best, monitor: val/ndcg@10, mode: max, save_top_k: 1, save_last: true,
                  enable_version_counter: false}}
model:
  network:
    class_path: tim4rec_pl.model.tim4rec.TiM4Rec
    init_args: {{d_model: 16, d_state: 8, head_dim: 8, chunk_size: 4, is_time: {str(is_time).lower()}}}
  topk: [5, 10, 20]
data:
  path: {data_file}
  data_dir: {out}/data
  max_seq_len: 10
  batch_size: 32
""")
    return cfg


def _train_test_predict(cfg: Path, cwd: Path, env: dict[str, str], root: Path, predict: bool) -> Path:
    """fit, test (and predict) one config; return the run folder the fit created under ``root``."""
    exe = Path(sys.executable).with_name("tim4rec-pl")

    def command(*args: str) -> None:
        res = subprocess.run([str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
        if res.returncode != 0:
            raise RuntimeError(f"tim4rec-pl {' '.join(args)} failed ({res.returncode}):\n{res.stderr[-4000:]}")

    command("fit", "--config", str(cfg))
    runs = sorted(p.parent for p in root.glob("*/run.json"))
    if len(runs) != 1:
        raise RuntimeError(f"expected one run folder under {root}, found {runs}")
    run = runs[0]
    command("test", "--config", str(cfg), "--ckpt_path", "best")
    if predict:
        command("predict", "--config", str(cfg), "--ckpt_path", "best", "--predictions.mode", "test",
                "--predictions.top_k", "20", "--predictions.output", str(run / "predictions" / "test.parquet"))
    return run


def make_tiny_runs(
    out: Path,
    epochs: int = 3,
    wandb_mode: str = "offline",
    env: dict[str, str] | None = None,
    parallel: bool = True,
    predict: tuple[str, ...] = ("TiM4Rec",),
) -> dict[str, str]:
    """Train, test (and predict) the tiny runs; return ``{display name: run folder}``, also saved as ``runs.json``.

    A run folder is the one folder the fit created under ``<out>/runs/<name>/``.

    Args:
        out: Folder for the fixture, the configs, the prepared data and the runs.
        epochs: Training epochs of each run.
        wandb_mode: ``WANDB_MODE`` of the runs: ``offline`` (writes an offline W&B run) or ``disabled``.
        env: Environment of the ``tim4rec-pl`` processes (default: this process's).
        parallel: Train the two runs at the same time (they share the prepared data; its cache is locked).
        predict: Display names of the runs that also get test-mode predictions (``predictions/test.parquet``).
    """
    out = Path(out).resolve()
    data_file = write_fixture(out / "tiny.inter")
    env = {**(os.environ if env is None else env), "WANDB_MODE": wandb_mode, "WANDB_SILENT": "true"}
    env.setdefault("PYTHONWARNINGS", "ignore")
    env.setdefault("OMP_NUM_THREADS", "1")  # a 16-d model gains nothing from threads; two runs share the CPU
    jobs = []
    for name, (run, is_time) in TINY_RUNS.items():
        cfg = write_config(out, run, data_file, is_time, epochs)
        jobs.append((cfg, out, env, out / "runs" / run, name in predict))
    with ThreadPoolExecutor(max_workers=len(jobs) if parallel else 1) as pool:
        futures = [pool.submit(_train_test_predict, *job) for job in jobs]
        runs = {name: str(future.result()) for name, future in zip(TINY_RUNS, futures)}
    (out / "runs.json").write_text(json.dumps(runs, indent=1) + "\n")
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder for the fixture, configs, data and runs")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs of each run")
    parser.add_argument("--wandb", choices=["offline", "disabled"], default="offline", help="W&B mode of the runs")
    args = parser.parse_args(argv)
    print(json.dumps(make_tiny_runs(args.out, args.epochs, args.wandb)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
