"""The ``tim4rec-pl`` command: LightningCLI (fit / validate / test / predict) plus ``tim4rec-pl data ...``."""

from __future__ import annotations

# First, before anything loads torch: OpenMP wait policy and malloc settings for fast CPU training.
import tim4rec_pl.cpu_runtime  # noqa: F401

# isort: split
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from tim4rec_pl.atomic import remove_stale_temporaries, write_text_atomically
from tim4rec_pl.checkpoints import AtomicCheckpointIO, check_checkpoint_file, read_checkpoint
from tim4rec_pl.data.datamodule import SeqRecDataModule
from tim4rec_pl.errors import UserError
from tim4rec_pl.held_output import HELD, ReleaseHeldOutput
from tim4rec_pl.leftovers import RunFiles, begin_private_temp, end_private_temp, isolate_wandb_temp
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

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        parser = super().init_parser(**kwargs)
        parser.error = _parser_error(parser)  # one line instead of the full usage (see docs/errors.md)
        return parser

    def _parse_ckpt_path(self) -> None:
        # Lightning reads the checkpoint's hyperparameters here, before anything else: identify the file first
        ckpt_path = self.config.get(str(self.config.get("subcommand")), {}).get("ckpt_path")
        if ckpt_path and "://" not in str(ckpt_path) and Path(ckpt_path).is_file():
            read_checkpoint(ckpt_path, "--ckpt_path")
        super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        end_private_temp()  # begun in run_cli, for the parsing
        trainer = self.config.get(str(self.subcommand), self.config).get("trainer") or {}
        if "wandb" in str(trainer.get("logger")).lower():
            isolate_wandb_temp()  # W&B's temp folders in a private folder, removed at exit (leftovers.py)
        # validate / test / predict: a failure removes the run files the command added (leftovers.py)
        self.run_files = RunFiles.from_trainer_config(trainer) if self.subcommand in EVALUATING else None

    def instantiate_classes(self) -> None:
        with self._removing_run_files_on_failure():
            super().instantiate_classes()

    def _run_subcommand(self, subcommand: str) -> None:
        with self._removing_run_files_on_failure():
            super()._run_subcommand(subcommand)

    @contextlib.contextmanager
    def _removing_run_files_on_failure(self) -> Iterator[None]:
        try:
            yield
        except BaseException:
            if getattr(self, "run_files", None) is not None:
                self.run_files.remove_new()
            raise

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
        config["plugins"] = with_atomic_checkpoints(config.get("plugins"))
        trainer = super()._instantiate_trainer(config, callbacks)
        for callback in trainer.callbacks:  # config.yaml written atomically too
            if isinstance(callback, SaveConfigCallback) and not isinstance(callback.parser, _AtomicSaveParser):
                callback.parser = _AtomicSaveParser(callback.parser)
        return trainer

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if "ckpt_path" in kwargs:
            kwargs["ckpt_path"] = resolve_ckpt_path(kwargs["ckpt_path"], self.trainer, subcommand)
            check_checkpoint_file(kwargs["ckpt_path"], self.model)  # one line for a foreign file, before any run
        if kwargs.get("weights_only", False) is None:  # our checkpoints hold tensors and plain data only
            kwargs["weights_only"] = True
        return kwargs


EVALUATING = ("validate", "test", "predict")


def with_atomic_checkpoints(plugins: Any) -> list[Any]:
    """The Trainer's plugins plus :class:`AtomicCheckpointIO`, unless the config chose a checkpoint plugin."""
    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


def _parser_error(parser: LightningArgumentParser) -> Any:
    """A parser's ``error``: a one-line UserError naming the option's problem and where the help is."""

    def error(message: str, ex: Exception | None = None) -> None:
        sub = getattr(ex, "subcommand_parser", None) or parser
        prog = sub.prog.replace(" [options]", "")
        first = " ".join(str(message).split())  # jsonargparse's messages may span lines
        raise UserError(f"{first}; see {prog} --help")

    return error


class _AtomicSaveParser:
    """The config callback's parser, with ``save`` writing ``config.yaml`` through a temporary file."""

    def __init__(self, parser: LightningArgumentParser) -> None:
        self._parser = parser

    def __getattr__(self, name: str) -> Any:
        return getattr(self._parser, name)

    def save(self, cfg: Any, path: str, skip_none: bool = True, **kwargs: Any) -> None:
        remove_stale_temporaries(os.path.dirname(os.path.abspath(path)))  # what a killed run left
        write_text_atomically(path, self._parser.dump(cfg, skip_none=skip_none), what="config")


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
    begin_private_temp()  # W&B's temp folders, if parsing imports it, in a private folder (leftovers.py)
    try:
        return _build_cli(args)
    finally:
        end_private_temp()


def _build_cli(args: list[str] | None) -> TiM4RecCLI:
    return TiM4RecCLI(
        SeqRecModule,
        SeqRecDataModule,
        save_config_callback=LogConfigCallback,
        save_config_kwargs={"overwrite": True},
        # always on, in every config: stop cleanly on SIGTERM/SIGINT; best validation values in the W&B summary
        # and the held setup lines printed once the command really starts (held_output.py)
        trainer_defaults={"callbacks": [FaultTolerance(), BestMetricsSummary(), ReleaseHeldOutput()]},
        parser_kwargs={"description": DESCRIPTION, "default_env": False},
        args=args,
    )


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] == "data":
            from tim4rec_pl.data.cli import main as data_main

            sys.exit(data_main(args[1:]))
        _configure_logging()
        HELD.start()  # setup lines wait until the command starts: a user error before then is the only line
        try:
            run_cli(argv)  # None: LightningCLI reads sys.argv itself
        except UserError:
            HELD.discard()
            raise
        finally:
            HELD.release()
    except UserError as err:
        print(f"tim4rec-pl: error: {err}", file=sys.stderr)
        sys.exit(2)
    except SIGTERMException as stop:  # SIGTERM/SIGINT during fit: checkpoint written at a batch boundary
        sys.exit(print_interrupt(stop, args))
    except FloatingPointError as err:  # a non-finite training loss (lightning_module.py names the step)
        print(f"tim4rec-pl: error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("tim4rec-pl: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
