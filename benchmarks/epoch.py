"""One training epoch of a config (default: the ml-100k demo), data loading included, and its data-loading share.

Each variant runs in a fresh process (the CPU runtime settings are per process): the config is read through the
``tim4rec-pl`` command-line parser exactly as ``tim4rec-pl fit --config ...`` reads it (network, data module, batch
size, ...), then one epoch is trained by a plain Trainer without validation, checkpoints, loggers or progress bar.
A callback splits the epoch's wall time into time inside training steps (forward, backward, optimiser) and time
between them (fetching the next batch from the loader, plus Lightning's loop overhead): the latter is reported as
the data-loading share. With ``num_workers: 0`` the time spent building batches (``SeqRecDataset.__getitems__``)
is also measured directly.

Variants (``--variants``, default ``tuned``): ``tuned`` (the CLI's settings), ``untuned`` (``TIM4REC_CPU_TUNING=0``:
glibc's default malloc and OpenMP's default spinning), ``workers1`` / ``workers2`` (loader worker processes),
``pin`` (pinned memory, CUDA only), ``compile`` (``model.compile: true``), ``bf16`` (``trainer.precision:
bf16-mixed``). With ``--recbole-python`` (an interpreter with recbole==1.2.1, e.g. the environment that
``data_prep.py`` describes), ``recbole-sasrec`` and ``recbole-sasrec-untuned`` time one epoch of RecBole's own SASRec
on the same data set, window and batch, with our CPU settings passed as environment variables and without them.
Variants are interleaved over ``--repeats``. Results: ``benchmarks/results/epoch.json`` and ``.md``.

Usage::

    .venv/bin/python benchmarks/epoch.py                                  # the demo, one epoch (~1-3 min on CPU)
    .venv/bin/python benchmarks/epoch.py --variants tuned untuned workers1 --repeats 2
    .venv/bin/python benchmarks/epoch.py --config configs/ml-1m.yaml --max-batches 50
    .venv/bin/python benchmarks/epoch.py --variants tuned bf16 --epochs 3 --validate   # is bf16 as accurate?
    .venv/bin/python benchmarks/epoch.py --variants tuned recbole-sasrec recbole-sasrec-untuned \\
        --recbole-python /tmp/rbenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VARIANTS = {  # name -> (environment, command-line overrides)
    "tuned": ({}, []),
    "untuned": ({"TIM4REC_CPU_TUNING": "0"}, []),
    "workers1": ({}, ["--data.num_workers", "1"]),
    "workers2": ({}, ["--data.num_workers", "2"]),
    "pin": ({}, ["--data.pin_memory", "true"]),
    "compile": ({}, ["--model.compile", "true"]),
    "bf16": ({}, ["--trainer.precision", "bf16-mixed"]),
}
# RecBole 1.2.1's SASRec on the same data, window and batch (needs --recbole-python): with the same CPU settings as
# ours (environment variables), and with none.
RECBOLE_VARIANTS = ("recbole-sasrec", "recbole-sasrec-untuned")

# Runs in the RecBole interpreter: one training epoch of RecBole's SASRec (its defaults: d 64, 2 layers, 2 heads,
# dropout 0.5, CE loss over all items) on the data set under data_path, timed around Trainer._train_epoch.
_RECBOLE_SCRIPT = """
import json, os, sys, time
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.model.sequential_recommender import SASRec
from recbole.trainer import Trainer
from recbole.utils import init_seed
data_path, dataset, length, batch, out_dir = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
config = Config(model="SASRec", dataset=dataset, config_dict={
    "data_path": data_path, "epochs": 1, "train_batch_size": batch, "MAX_ITEM_LIST_LENGTH": length,
    "train_neg_sample_args": None, "loss_type": "CE", "show_progress": False, "seed": 42,
    "checkpoint_dir": out_dir, "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
    "user_inter_num_interval": "[5,inf)", "item_inter_num_interval": "[5,inf)"})
init_seed(config["seed"], config["reproducibility"])
train, valid, test = data_preparation(config, create_dataset(config))
trainer = Trainer(config, SASRec(config, train.dataset).to(config["device"]))
import torch
load0 = os.getloadavg()[0]
t = time.perf_counter()
trainer._train_epoch(train, 0, show_progress=False)
epoch_s = time.perf_counter() - t
print(json.dumps({"epoch_s": epoch_s, "samples": len(train.dataset), "torch_threads": torch.get_num_threads(),
                  "load": [load0, os.getloadavg()[0]]}))
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "ml-100k.yaml"), help="a tim4rec-pl fit config")
    p.add_argument("--variants", nargs="+", default=["tuned"], choices=[*VARIANTS, *RECBOLE_VARIANTS])
    p.add_argument("--recbole-python", default=None, help="a Python with recbole==1.2.1 (for the recbole-* variants)")
    p.add_argument("--repeats", type=int, default=1, help="epochs per variant, each in a fresh process")
    p.add_argument("--max-batches", type=int, default=None, help="stop the epoch after this many batches")
    p.add_argument("--epochs", type=int, default=1, help="epochs to train (times are reported for the first)")
    p.add_argument("--validate", action="store_true", help="validate after each epoch (not timed); report metrics")
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="extra config overrides for every variant, e.g. data.batch_size=1024",
    )
    p.add_argument("--out", default=str(HERE / "results" / "epoch"), help="output path without extension")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    return p.parse_args(argv)


def cli_overrides(args: argparse.Namespace, variant: str) -> list[str]:
    extra = []
    for item in args.set:
        key, _, value = item.partition("=")
        extra += [f"--{key}", value]
    return ["--config", args.config, *VARIANTS[variant][1], *extra]


# --- one epoch, in the child process -----------------------------------------------------------------------------


def run_child(args: argparse.Namespace) -> dict:
    import tim4rec_pl.cpu_runtime as runtime  # before torch, as in the CLI

    # isort: split
    import lightning as L
    import torch

    from tim4rec_pl.cli import TiM4RecCLI
    from tim4rec_pl.data.datamodule import SeqRecDataModule, SeqRecDataset
    from tim4rec_pl.lightning_module import SeqRecModule

    cli = TiM4RecCLI(
        SeqRecModule,
        SeqRecDataModule,
        run=False,
        args=cli_overrides(args, args.child),
        save_config_callback=None,
        parser_kwargs={"default_env": False},
    )
    model, data = cli.model, cli.datamodule
    trainer_cfg = cli.config.get("trainer", {})

    getitems = [0.0]
    original = SeqRecDataset.__getitems__

    def timed_getitems(self, indices):  # direct cost of building batches (main process only: num_workers 0)
        t = time.perf_counter()
        try:
            return original(self, indices)
        finally:
            getitems[0] += time.perf_counter() - t

    SeqRecDataset.__getitems__ = timed_getitems

    class Timer(L.Callback):
        """Training time per epoch (validation excluded), split into steps and the gaps between them."""

        def __init__(self) -> None:
            self.steps: list[float] = []  # first epoch only
            self.waits: list[float] = []  # first epoch only
            self.samples = 0
            self.epochs: list[float] = []
            self.val: list[dict] = []

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.t_epoch = self.t_last = time.perf_counter()
            self.val_s = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.t_batch = time.perf_counter()
            if not self.epochs:
                self.waits.append(self.t_batch - self.t_last)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.t_last = time.perf_counter()
            if not self.epochs:
                self.steps.append(self.t_last - self.t_batch)
                self.samples += len(batch["item_seq"])

        def on_validation_start(self, trainer, pl_module) -> None:
            self.t_val = time.perf_counter()

        def on_validation_end(self, trainer, pl_module) -> None:
            self.val_s += time.perf_counter() - self.t_val
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            self.val.append({"epoch": trainer.current_epoch, **metrics})

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.epochs.append(time.perf_counter() - self.t_epoch - self.val_s)

    timer = Timer()
    trainer = L.Trainer(
        max_epochs=args.epochs,
        limit_train_batches=args.max_batches or 1.0,
        limit_val_batches=1.0 if args.validate else 0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator=trainer_cfg.get("accelerator", "auto"),
        devices=1,
        precision=trainer_cfg.get("precision") or "32-true",
        callbacks=[timer],
    )
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=data)
    fit_s = time.perf_counter() - t0
    wait_s = sum(timer.waits)
    return {
        "variant": args.child,
        "epoch_s": timer.epochs[0],
        "epochs_s": timer.epochs,
        "val": timer.val,
        "fit_s": fit_s,
        "batches": len(timer.steps),
        "samples": timer.samples,
        "step_s_total": sum(timer.steps),
        "step_s_median": statistics.median(timer.steps),
        "first_step_s": timer.steps[0],
        "between_steps_s": wait_s,
        "data_share": wait_s / timer.epochs[0],
        "getitems_s": getitems[0] if data.hparams.num_workers == 0 else None,
        "samples_per_s": timer.samples / timer.epochs[0],
        "batch_size": data.hparams.batch_size,
        "max_seq_len": data.hparams.max_seq_len,
        "num_workers": data.hparams.num_workers,
        "pin_memory": data.hparams.pin_memory,
        "network": type(model.network).__name__,
        "is_time": getattr(model.network, "is_time", None),
        "device": str(model.device),
        "torch_threads": torch.get_num_threads(),
        "tuning": dict(runtime.applied) or "off",
        "load": [load0, os.getloadavg()[0]],
    }


# --- the parent: variants in fresh processes, a table ------------------------------------------------------------


def data_settings(args: argparse.Namespace) -> dict:
    """The config's data set, data folder, window and batch (with --set overrides), for the RecBole run."""
    import yaml

    data = (yaml.safe_load(Path(args.config).read_text()) or {}).get("data", {}) or {}
    for item in args.set:
        key, _, value = item.partition("=")
        if key.startswith("data."):
            data[key[5:]] = yaml.safe_load(value)
    return {
        "dataset": data.get("dataset", "ml-100k"),
        "data_dir": data.get("data_dir", "data"),
        "max_seq_len": int(data.get("max_seq_len", 50)),
        "batch_size": int(data.get("batch_size", 2048)),
    }


def run_recbole(args: argparse.Namespace, variant: str) -> dict:
    import tempfile

    from tim4rec_pl import cpu_runtime

    if not args.recbole_python or not Path(args.recbole_python).exists():
        raise SystemExit(f"epoch: variant {variant} needs --recbole-python (an interpreter with recbole==1.2.1)")
    d = data_settings(args)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "OMP_WAIT", "TIM4REC_CPU"))}
    if variant == "recbole-sasrec":
        env.update(cpu_runtime.environment())
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            args.recbole_python,
            "-c",
            _RECBOLE_SCRIPT,
            str(ROOT / d["data_dir"]),
            d["dataset"],
            str(d["max_seq_len"]),
            str(d["batch_size"]),
            tmp,
        ]
        out = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"variant {variant} failed:\n{out.stderr[-4000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "variant": variant,
        "network": "RecBole SASRec",
        "is_time": False,
        "max_seq_len": d["max_seq_len"],
        "batch_size": d["batch_size"],
        "device": "cpu",
        "samples_per_s": r["samples"] / r["epoch_s"],
        "step_s_median": None,
        "first_step_s": None,
        "data_share": None,
        "getitems_s": None,
        "val": [],
        "tuning": cpu_runtime.environment() if variant == "recbole-sasrec" else "off",
        **r,
    }


def run_variant(args: argparse.Namespace, variant: str) -> dict:
    if variant in RECBOLE_VARIANTS:
        return run_recbole(args, variant)
    env = {**os.environ, **VARIANTS[variant][0]}
    if variant != "untuned":
        env.pop("TIM4REC_CPU_TUNING", None)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--config", args.config]
    if args.max_batches:
        cmd += ["--max-batches", str(args.max_batches)]
    cmd += ["--epochs", str(args.epochs)] + (["--validate"] if args.validate else [])
    if args.set:
        cmd += ["--set", *args.set]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"variant {variant} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(result: dict) -> str:
    runs = result["runs"]
    first = next((r for r in runs if r["variant"] not in RECBOLE_VARIANTS), runs[0])
    lines = [
        f"# One training epoch: {Path(result['config']).name}",
        "",
        f"{first['network']} (is_time={first['is_time']}), L={first['max_seq_len']}, batch {first['batch_size']}, "
        f"{first['samples']:,} training samples, {first['device']}, {first['torch_threads']} torch threads; "
        f"{result['cpu']}, {result['cores']} cores; {result['date']}.",
        "",
        "| variant | epoch s | samples/s | median step s | first step s | data + loop share | batch building s "
        "| load avg (start-end) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        if r["variant"] in RECBOLE_VARIANTS:
            lines.append(
                f"| {r['variant']} ({r['network']}) | {r['epoch_s']:.1f} | {r['samples_per_s']:.0f} | - | - "
                f"| - | - | {r['load'][0]:.1f}-{r['load'][1]:.1f} |"
            )
            continue
        build = f"{r['getitems_s']:.2f}" if r["getitems_s"] is not None else "(workers)"
        lines.append(
            f"| {r['variant']} | {r['epoch_s']:.1f} | {r['samples_per_s']:.0f} | {r['step_s_median']:.2f} "
            f"| {r['first_step_s']:.2f} | {100 * r['data_share']:.1f}% | {build} "
            f"| {r['load'][0]:.1f}-{r['load'][1]:.1f} |"
        )
    validated = [r for r in runs if r["val"]]
    if validated:
        lines += ["", "Validation after each epoch (not timed): NDCG@10 / HR@10", ""]
        lines += ["| variant | " + " | ".join(f"epoch {v['epoch']}" for v in validated[0]["val"]) + " |"]
        lines += ["|---|" + "---|" * len(validated[0]["val"])]
        for r in validated:
            cells = [
                f"{v.get('val/ndcg@10', float('nan')):.4f} / {v.get('val/hr@10', float('nan')):.4f}" for v in r["val"]
            ]
            lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    if len(result["medians"]) > 1 or any(len(v) > 1 for v in result["by_variant"].values()):
        lines += [
            "",
            "Median epoch seconds per variant: " + ", ".join(f"{k} {v:.1f}" for k, v in result["medians"].items()),
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)))
        return None
    runs = []
    for rep in range(args.repeats):
        for variant in args.variants:
            r = run_variant(args, variant)
            runs.append(r)
            share = f"{100 * r['data_share']:.1f}%" if r["data_share"] is not None else "-"
            msg = f"{r['epoch_s']:.1f}s, {r['samples_per_s']:.0f} samples/s, data + loop {share}"
            print(f"epoch: {variant} (repeat {rep + 1}): {msg}, load {r['load'][0]:.1f}", file=sys.stderr, flush=True)
    by_variant: dict[str, list[float]] = {}
    for r in runs:
        by_variant.setdefault(r["variant"], []).append(r["epoch_s"])
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    result = {
        "config": args.config,
        "overrides": args.set,
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "runs": runs,
        "by_variant": by_variant,
        "medians": {k: statistics.median(v) for k, v in by_variant.items()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    md = markdown(result)
    out.with_suffix(".md").write_text(md)
    print(md)
    return result


if __name__ == "__main__":
    main()
