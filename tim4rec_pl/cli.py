"""The ``tim4rec-pl`` command: LightningCLI (fit / validate / test / predict) plus ``tim4rec-pl data ...``."""

from __future__ import annotations

# First, before anything loads torch: OpenMP wait policy and malloc settings for fast CPU training.
import tim4rec_pl.cpu_runtime  # noqa: F401

# isort: split
import logging
import os
import pickle
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from tim4rec_pl.data.datamodule import SeqRecDataModule
from tim4rec_pl.errors import UserError
from tim4rec_pl.lightning_module import SeqRecModule
from tim4rec_pl.predict import PredictionWriter
from tim4rec_pl.resilience import FaultTolerance, print_interrupt
from tim4rec_pl.tracking import BestMetricsSummary, LogConfigCallback

DESCRIPTION = (
    "Train, evaluate and serve TiM4Rec (time-aware SSD / Mamba-2 sequential recommender) and its baselines. "
    "Start with: tim4rec-pl fit --config configs/ml-100k.yaml"
)


class TiM4RecCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The catalogue size and the window length belong to the data; the network gets them from there.
        parser.link_arguments("data.num_items", "model.network.init_args.num_items", apply_on="instantiate")
        parser.link_arguments("data.max_seq_len", "model.network.init_args.max_seq_len", apply_on="parse")
        # --predictions.top_k, --predictions.output, ...: the top-K writer of `tim4rec-pl predict`, inert in the other
        # commands but registered in all so that one config with a predictions: section serves every command.
        # (Not "predict": jsonargparse already names the group of trainer.predict's own arguments so.)
        parser.add_lightning_class_args(PredictionWriter, "predictions")

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if "ckpt_path" in kwargs:
            kwargs["ckpt_path"] = resolve_ckpt_path(kwargs["ckpt_path"], self.trainer, subcommand)
        if kwargs.get("weights_only", False) is None:  # our checkpoints hold tensors and plain data only
            kwargs["weights_only"] = True
        return kwargs


def _checkpoint_dirs(trainer: Any) -> list[Path]:
    return [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks
            if isinstance(cb, ModelCheckpoint) and cb.dirpath]


def resolve_ckpt_path(ckpt_path: str | None, trainer: Any, subcommand: str) -> str | None:
    """Turn ``best`` / ``last`` into a file when this process has not trained (a new ``test`` run), and check paths.

    ``best`` is ``<checkpoint dirpath>/best.ckpt`` and ``last`` is ``<checkpoint dirpath>/last.ckpt``, the files the
    shipped configs' ModelCheckpoint writes.
    """
    if ckpt_path is None:
        return None
    if ckpt_path in ("best", "last"):
        if subcommand == "fit":
            if ckpt_path == "last" and not any((d / "last.ckpt").is_file() for d in _checkpoint_dirs(trainer)):
                raise UserError("--ckpt_path last: no last.ckpt to resume from in "
                                f"{[str(d) for d in _checkpoint_dirs(trainer)] or 'any checkpoint folder'}; "
                                "run fit without --ckpt_path to start a new run")
            return ckpt_path
        callback = trainer.checkpoint_callback
        if ckpt_path == "best" and callback is not None and getattr(callback, "best_model_path", ""):
            return ckpt_path
        for folder in _checkpoint_dirs(trainer):
            candidate = folder / f"{ckpt_path}.ckpt"
            if candidate.is_file():
                return str(candidate)
        dirs = [str(d) for d in _checkpoint_dirs(trainer)]
        raise UserError(f"--ckpt_path {ckpt_path}: no {ckpt_path}.ckpt in {dirs or 'any checkpoint folder'}; "
                        "train first with `tim4rec-pl fit --config ...` or pass the checkpoint's file path")
    if "://" not in ckpt_path and not Path(ckpt_path).is_file():
        raise UserError(f"--ckpt_path {ckpt_path}: no such checkpoint file; pass an existing .ckpt, or best / last")
    return ckpt_path


class _StderrHandler(logging.StreamHandler):
    """Writes to the ``sys.stderr`` of the moment: tests and notebooks swap it, and a handler that kept the stream
    it was created with would write to a closed one."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _configure_logging() -> None:
    logger = logging.getLogger("tim4rec_pl")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def run_cli(args: list[str] | None = None) -> TiM4RecCLI:
    """Build and run the Lightning CLI (also used by tests, which pass ``args``)."""
    _configure_logging()
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    return TiM4RecCLI(
        SeqRecModule,
        SeqRecDataModule,
        save_config_callback=LogConfigCallback,
        save_config_kwargs={"overwrite": True},
        # always on, in every config: stop cleanly on SIGTERM/SIGINT; best validation values in the W&B summary
        trainer_defaults={"callbacks": [FaultTolerance(), BestMetricsSummary()]},
        parser_kwargs={"description": DESCRIPTION, "default_env": False},
        args=args,
    )


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] == "data":
            from tim4rec_pl.data.cli import main as data_main

            sys.exit(data_main(args[1:]))
        run_cli(argv)  # None: LightningCLI reads sys.argv itself
    except UserError as err:
        print(f"tim4rec-pl: error: {err}", file=sys.stderr)
        sys.exit(2)
    except SIGTERMException as stop:  # SIGTERM/SIGINT during fit: checkpoint written at a batch boundary
        sys.exit(print_interrupt(stop, args))
    except FloatingPointError as err:  # a non-finite training loss (lightning_module.py names the step)
        print(f"tim4rec-pl: error: {err}", file=sys.stderr)
        sys.exit(1)
    except pickle.UnpicklingError as err:  # torch.load(weights_only=True) refused a checkpoint
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"tim4rec-pl: error: the checkpoint holds pickled Python objects that safe loading (weights_only=True) "
              f"refuses ({reason}); use a checkpoint written by tim4rec-pl, or one you trust re-saved as tensors",
              file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("tim4rec-pl: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
