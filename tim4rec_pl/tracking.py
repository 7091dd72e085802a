"""Experiment tracking: a W&B logger that goes offline by itself when no API key is configured, and a config
callback that records the resolved config and the data statistics with every logger of the run."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_info


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
        **kwargs: Any,
    ) -> None:
        """W&B logger.

        Args:
            name: Run name shown in the W&B UI.
            save_dir: Folder under which W&B writes its ``wandb/`` run directories.
            project: W&B project.
            tags: Run tags.
            log_model: Upload checkpoints as W&B artifacts: ``True`` (at the end of training: the best one),
                ``"all"`` (every checkpoint), ``False`` (never).
            offline: Force offline (``True``) or online (``False``); ``None`` decides from WANDB_MODE and the API key.
            **kwargs: Passed on to ``wandb.init`` (e.g. ``entity``, ``group``, ``notes``).
        """
        mode = os.environ.get("WANDB_MODE", "").strip().lower()
        if offline is None:
            offline = mode in ("offline", "dryrun") or (mode not in ("online", "disabled") and not
                                                         wandb_api_key_configured())
        if offline and mode not in ("disabled",):
            os.environ["WANDB_MODE"] = "offline"  # so that nothing in wandb tries the network
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        self._announce_offline = bool(offline) and mode != "disabled"
        super().__init__(name=name, save_dir=save_dir, project=project, tags=tags, log_model=log_model,
                         offline=bool(offline), **kwargs)

    def finalize(self, status: str) -> None:
        super().finalize(status)
        if self._announce_offline and self._experiment is not None:
            run_dir = Path(self._experiment.dir).parent
            rank_zero_info(f"W&B run written offline to {run_dir}; upload it with: wandb sync {run_dir}")
            self._announce_offline = False


class LogConfigCallback(SaveConfigCallback):
    """Writes ``config.yaml`` into the run folder and logs the same resolved config, the data statistics and the
    data manifest checksum to every logger (W&B shows them as the run's config)."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        params: dict[str, Any] = {"config": self.config.as_dict()}
        dm = trainer.datamodule
        manifest = getattr(dm, "manifest", None) if dm is not None else None
        if isinstance(manifest, dict):
            params["data_stats"] = manifest.get("stats", {})
            params["data_checksum"] = manifest.get("checksum")
        for logger in trainer.loggers:
            logger.log_hyperparams(params)
