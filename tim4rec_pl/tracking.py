"""Experiment tracking: a W&B logger that goes offline by itself when no API key is configured, a config callback
that records the resolved config and the data statistics with every logger of the run (and the config in every
checkpoint), and a callback that keeps the best validation values in the W&B run summary."""

from __future__ import annotations

import fnmatch
import logging
import math
import netrc
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from jsonargparse import Namespace
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from tim4rec_pl.atomic import remove_stale_temporaries, write_text_atomically


def wandb_api_key_configured() -> bool:
    """True when W&B could log online: WANDB_API_KEY is set or ``~/.netrc`` holds a key for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class WandbLogger(_LightningWandbLogger):
    """Lightning's WandbLogger with the mode chosen for you.

    The mode follows ``WANDB_MODE`` when it is set (``online``, ``offline``, ``disabled``); otherwise the run is online
    when an API key is configured and offline (no network attempt at all) when none is, with one line saying where
    the run was written and how to upload it later with ``wandb sync``.
    """

    def __init__(
        self,
        name: str | None = None,
        save_dir: str = "runs",
        project: str = "tim4rec-pl",
        tags: list[str] | None = None,
        log_model: bool | str = False,
        offline: bool | None = None,
        id: str | None = None,
        group: str | None = None,
        job_type: str | None = None,
        resume: str | None = None,
        **kwargs: Any,
    ) -> None:
        """W&B logger.

        Args:
            name: Run name shown in the W&B UI.
            save_dir: Folder under which W&B writes its ``wandb/`` run directories.
            project: W&B project.
            tags: Run tags.
            log_model: Upload checkpoints as W&B artifacts: ``True`` (when training ends: the checkpoints the
                ModelCheckpoint kept, e.g. best.ckpt with the alias ``best`` and last.ckpt), ``"all"`` (every
                checkpoint as it is written), ``False`` (never). Not after an interrupted or failed run.
            offline: Force offline (``True``) or online (``False``); ``None`` decides from WANDB_MODE and the API key.
            id: W&B run id. With a run root the CLI sets it to the run folder's id, so that a resumed fit and the
                test of its checkpoint continue the same W&B run.
            group: W&B group (the CLI sets the config's name: all runs of one config side by side).
            job_type: W&B job type (the CLI sets the command: fit, test, validate, predict).
            resume: W&B resume mode for ``id`` (``allow``: continue the run when it exists, else start it).
            **kwargs: Passed on to ``wandb.init`` (e.g. ``entity``, ``group``, ``notes``).
        """
        mode = os.environ.get("WANDB_MODE", "").strip().lower()
        if offline is None:
            offline = mode in ("offline", "dryrun") or (
                mode not in ("online", "disabled") and not wandb_api_key_configured()
            )
        self._announce_offline = bool(offline) and mode != "disabled"
        if self._announce_offline:
            os.environ["WANDB_MODE"] = "offline"  # so that nothing in wandb tries the network (DDP children too)
            kwargs.setdefault("mode", "offline")
            # wandb's own banner and footer would repeat the sync hint that finalize() prints once
            os.environ.setdefault("WANDB_SILENT", "true")
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        # Lightning refuses log_model with offline=True, but W&B logs artifacts offline too (`wandb sync` uploads
        # them, from the machine that staged them): the mode above keeps the run offline, the flag is set after.
        extra = {k: v for k, v in (("group", group), ("job_type", job_type), ("resume", resume)) if v is not None}
        super().__init__(
            name=name,
            save_dir=save_dir,
            project=project,
            tags=tags,
            log_model=log_model,
            offline=bool(offline) and not log_model,
            id=id,
            **extra,
            **kwargs,
        )
        self._defined: set[str] = set()
        self._offline = self._announce_offline  # WANDB_MODE=disabled wins over offline=True
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)  # wandb warns about the setting even when it is None

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        # each metric defined by its exact name the first time it is logged (W&B's glob patterns may lose to
        # Lightning's own "*" definition): its step, and the summary of METRIC_SUMMARIES
        run = self.experiment
        if hasattr(run, "define_metric"):
            for key in metrics:
                if key in self._defined:
                    continue
                self._defined.add(key)
                summary = next((v for k, v in METRIC_SUMMARIES.items() if fnmatch.fnmatchcase(key, k)), None)
                if summary is not None:
                    run.define_metric(key, step_metric="trainer/global_step", summary=summary)
        super().log_metrics(metrics, step)

    def finalize(self, status: str) -> None:
        super().finalize(status)
        if self._announce_offline and self._experiment is not None:
            run_dir = Path(self._experiment.dir).parent
            rank_zero_info(f"W&B run written offline to {run_dir}; upload it with: wandb sync {run_dir}")
            self._announce_offline = False


# W&B summaries: the best validation value of a run (higher is better for HR / NDCG / MRR) and the last, the lowest
# and the last loss, the mean and the last throughput (W&B then keeps e.g. ``val/ndcg@10`` as ``{max, last}``); other
# metrics (test/...) keep W&B's default, the value logged.
METRIC_SUMMARIES = {"val/*": "max,last", "train/loss*": "min,last", "perf/*": "mean,last"}


def git_commit() -> str | None:
    """The commit of the source tree this package is imported from (``+dirty`` when it has changes), or None."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+dirty" if dirty else commit


def environment_record(trainer: L.Trainer) -> dict[str, Any]:
    """Where the run ran: resolved device (name of the GPU), world size, precision, git commit, run folder."""
    device = trainer.strategy.root_device
    record: dict[str, Any] = {
        "device": str(device),
        "accelerator": type(trainer.accelerator).__name__.removesuffix("Accelerator").lower(),
        "world_size": trainer.world_size,
        "num_nodes": trainer.num_nodes,
        "precision": str(trainer.precision),
        "git_commit": git_commit(),
        "run_folder": str(trainer.default_root_dir),
    }
    if device.type == "cuda":
        import torch

        record["device_name"] = torch.cuda.get_device_name(device)
    return record


class _AtomicSaveParser:
    """A parser whose ``save`` writes the config through a temporary file in the target's folder (fsync, rename)."""

    def __init__(self, parser: LightningArgumentParser) -> None:
        self._parser = parser

    def __getattr__(self, name: str) -> Any:
        return getattr(self._parser, name)

    def save(self, cfg: Any, path: str, skip_none: bool = True, **kwargs: Any) -> None:
        remove_stale_temporaries(os.path.dirname(os.path.abspath(path)))  # what a killed run left
        write_text_atomically(path, self._parser.dump(cfg, skip_none=skip_none), what="config")


class LogConfigCallback(SaveConfigCallback):
    """Writes ``config.yaml`` into the run folder, logs the same resolved config (what ``--print_config`` prints),
    the data statistics and the data manifest checksum to every logger (W&B shows them as the run's config), and
    stores the config in every checkpoint as ``checkpoint["tim4rec_pl"]["config"]`` (plain dicts and lists)."""

    def __init__(self, parser: LightningArgumentParser, config: Namespace, *args: Any, **kwargs: Any) -> None:
        super().__init__(_AtomicSaveParser(parser), config, *args, **kwargs)  # config.yaml written atomically

    def resolved_config(self) -> dict[str, Any]:
        """The subcommand's resolved config as plain data, exactly as written to ``config.yaml``."""
        if not hasattr(self, "_resolved"):
            self._resolved = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        return self._resolved

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not trainer.loggers:  # no run folder: don't drop a config.yaml into the working directory
            self.save_to_log_dir = False
        stage_name = str(getattr(stage, "value", stage))
        if stage_name != "fit":  # the run's config.yaml stays the fit's; test writes config-test.yaml beside it
            self.config_filename = f"config-{stage_name}.yaml"
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # a test / validate / predict that continues a fit's W&B run adds its own keys beside the fit's config
        stage_name = str(getattr(stage, "value", stage))
        prefix = "" if stage_name == "fit" else f"{stage_name}_"
        params: dict[str, Any] = {f"{prefix}config": self.resolved_config()}
        params[f"{prefix}env"] = environment_record(trainer)
        dm = trainer.datamodule
        manifest = getattr(dm, "manifest", None) if dm is not None else None
        if isinstance(manifest, dict):
            params["data_stats"] = manifest.get("stats", {})
            params["data_checksum"] = manifest.get("checksum")
        for logger in trainer.loggers:
            logger.log_hyperparams(params)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint.setdefault("tim4rec_pl", {})["config"] = self.resolved_config()


class BestMetricsSummary(Callback):
    """Keeps the validation values of the best epoch and writes them into the W&B run summary.

    "Best" follows the first ModelCheckpoint's ``monitor`` and ``mode`` (so the summary describes ``best.ckpt``), or
    ``val/ndcg@10`` (max) without one. After every validation that improves on it, the summary gets
    ``best/val/<metric>`` for every ``val/`` metric of that epoch, plus ``best/epoch`` and ``best/step``. Rank 0
    only; the best values travel in checkpoints, so a resumed run's summary still covers the epochs before the
    interruption.
    """

    def __init__(self, monitor: str | None = None, mode: str = "max") -> None:
        """Best-epoch summary.

        Args:
            monitor: Metric that decides the best epoch (default: the checkpoint callback's, else val/ndcg@10).
            mode: ``max`` or ``min`` (used with an explicit ``monitor``).
        """
        self.monitor, self.mode = monitor, mode
        self.best: dict[str, float] = {}  # best/val/..., best/epoch, best/step

    def _criterion(self, trainer: L.Trainer) -> tuple[str, str]:
        if self.monitor is not None:
            return self.monitor, self.mode
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and callback.monitor:
            return callback.monitor, callback.mode
        return "val/ndcg@10", "max"

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or trainer.state.fn != TrainerFn.FITTING:
            return  # epochs of a fit only (not `tim4rec-pl validate`), on rank 0
        monitor, mode = self._criterion(trainer)
        metrics = trainer.callback_metrics
        if monitor not in metrics:
            return
        value = float(metrics[monitor])
        previous = self.best.get(f"best/{monitor}")
        improved = previous is None or (value > previous if mode == "max" else value < previous)
        if math.isnan(value) or not improved:
            return
        best = {f"best/{k}": float(v) for k, v in metrics.items() if k.startswith("val/")}
        best.update({f"best/{monitor}": value, "best/epoch": trainer.current_epoch, "best/step": trainer.global_step})
        self.best = best
        self._write(trainer)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.best and trainer.is_global_zero:  # resumed: the new W&B run starts with the summary so far
            self._write(trainer)

    def _write(self, trainer: L.Trainer) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, _LightningWandbLogger):
                logger.experiment.summary.update(self.best)

    def state_dict(self) -> dict[str, Any]:
        return {"best": dict(self.best)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = dict(state_dict.get("best", {}))


class EpochSummary(Callback):
    """Epoch time and training throughput as metrics, and one line per epoch when there is no progress bar.

    Logs ``perf/epoch_time_s`` (training and validation of the epoch, wall clock) and ``perf/samples_per_s``
    (training samples of all processes per second of the training batches). Without a progress bar (output to a
    file, ``trainer.enable_progress_bar: false``) rank 0 prints, once per epoch::

        epoch 3 (max 8)  41.2 s  5210 samples/s  train/loss 6.1234  val/ndcg@10 0.0512 hr@10 0.1041 mrr@10 0.0381
        best 0.0530 (epoch 2)

    (on one line).
    """

    def __init__(self) -> None:
        self._epoch_start = 0.0
        self._train_time = 0.0
        self._batch_start = 0.0
        self._samples = 0
        self._best: tuple[float, int] | None = None  # (best score, its epoch) as seen at the end of each epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = time.perf_counter()
        self._train_time, self._samples = 0.0, 0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._train_time += time.perf_counter() - self._batch_start
        seqs = batch.get("item_seq") if isinstance(batch, dict) else None
        self._samples += int(seqs.shape[0]) if seqs is not None else 0

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        elapsed = time.perf_counter() - self._epoch_start
        throughput = self._samples * trainer.world_size / self._train_time if self._train_time > 0 else 0.0
        pl_module.log("perf/epoch_time_s", elapsed, on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max")
        pl_module.log("perf/samples_per_s", throughput, on_step=False, on_epoch=True, sync_dist=True,
                      reduce_fx="min")  # fmt: skip
        monitor, mode = _monitor(trainer)
        value = trainer.callback_metrics.get(monitor)
        if value is not None and not math.isnan(float(value)):
            previous = self._best[0] if self._best is not None else None
            if previous is None or (float(value) > previous if mode == "max" else float(value) < previous):
                self._best = (float(value), trainer.current_epoch)
        if trainer.progress_bar_callback is None and trainer.is_global_zero:
            logging.getLogger("tim4rec_pl").info(self.line(trainer, elapsed, throughput))

    def state_dict(self) -> dict[str, Any]:
        return {"best": list(self._best) if self._best is not None else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        best = state_dict.get("best")
        self._best = (float(best[0]), int(best[1])) if best else None

    def line(self, trainer: L.Trainer, elapsed: float, throughput: float) -> str:
        metrics = trainer.callback_metrics
        total = f" (max {trainer.max_epochs})" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        parts = [f"epoch {trainer.current_epoch}{total}", f"{elapsed:.1f} s", f"{throughput:.0f} samples/s"]
        loss = metrics.get("train/loss_epoch", metrics.get("train/loss"))
        if loss is not None:
            parts.append(f"train/loss {float(loss):.4f}")
        monitor, _ = _monitor(trainer)
        cutoff = "@" + monitor.rsplit("@", 1)[1] if "@" in monitor else ""
        shown = [monitor] + sorted(k for k in metrics if k.startswith("val/") and k != monitor and k.endswith(cutoff))
        values = [f"{k if i == 0 else k.removeprefix('val/')} {float(metrics[k]):.4f}"
                  for i, k in enumerate(shown) if k in metrics]  # fmt: skip
        if values:
            parts.append(" ".join(values))
        if self._best is not None:
            parts.append(f"best {self._best[0]:.4f} (epoch {self._best[1]})")
        return "  ".join(parts)


def _monitor(trainer: L.Trainer) -> tuple[str, str]:
    """The metric and mode that decide the best epoch: the checkpoint callback's, else val/ndcg@10 (max)."""
    callback = trainer.checkpoint_callback
    if isinstance(callback, ModelCheckpoint) and callback.monitor:
        return callback.monitor, callback.mode
    return "val/ndcg@10", "max"
