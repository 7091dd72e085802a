"""The ``tim4rec-pl`` command: LightningCLI (fit / validate / test / predict) plus ``tim4rec-pl data ...``."""

from __future__ import annotations

# First, before anything loads torch: OpenMP wait policy and malloc settings for fast CPU training.
import tim4rec_pl.cpu_runtime  # noqa: F401

# isort: split
import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from tim4rec_pl import __version__
from tim4rec_pl.checkpoints import AtomicCheckpointIO, check_checkpoint_file, read_checkpoint
from tim4rec_pl.data.datamodule import SeqRecDataModule
from tim4rec_pl.errors import UserError
from tim4rec_pl.held_output import HELD, ReleaseHeldOutput
from tim4rec_pl.leftovers import RunFiles, begin_private_temp, end_private_temp, isolate_wandb_temp
from tim4rec_pl.lightning_module import SeqRecModule
from tim4rec_pl.model import sasrec, tim4rec  # noqa: F401  (imported so that --help lists them as networks)
from tim4rec_pl.predict import PredictionWriter
from tim4rec_pl.resilience import FaultTolerance, Interrupted, print_interrupt
from tim4rec_pl.run_config import (
    NEW_RUNS,
    choose_run,
    class_name,
    config_entries,
    discard_new_runs,
    is_launching_process,
    place_outputs,
    say,
)
from tim4rec_pl.runs import CHILD_ENV, Run
from tim4rec_pl.tracking import BestMetricsSummary, EpochSummary, LogConfigCallback

log = logging.getLogger("tim4rec_pl")
DATA_HELP = "Prepare a dataset into the cache or print its statistics (tim4rec-pl data prepare|stats --help)."

DESCRIPTION = (
    "Train, evaluate and serve TiM4Rec (time-aware SSD / Mamba-2 sequential recommender) and its baselines. "
    "Start with: tim4rec-pl fit --config configs/ml-100k.yaml"
)


class TiM4RecCLI(LightningCLI):
    run: Run | None = None  # the run folder of this command (None when the config sets no run_root)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The catalogue size and the window length belong to the data; the network gets them from there.
        parser.link_arguments("data.num_items", "model.network.init_args.num_items", apply_on="instantiate")
        parser.link_arguments("data.max_seq_len", "model.network.init_args.max_seq_len", apply_on="parse")
        # --predictions.top_k, --predictions.output, ...: the top-K writer of `tim4rec-pl predict`, inert in the other
        # commands but registered in all so that one config with a predictions: section serves every command.
        # (Not "predict": jsonargparse already names the group of trainer.predict's own arguments so.)
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_argument(
            "--run_root", type=str | None, default=None,
            help="Folder holding this config's runs (e.g. runs/ml-100k). Each fit creates a new run folder in it "
                 "(checkpoints/, csv/, wandb/, config.yaml) and the CLI points the loggers and checkpoints there; "
                 "best / last in --ckpt_path mean the newest run's. Unset: paths are used as the config writes them.",
        )  # fmt: skip
        parser.add_argument(
            "--run", type=str | None, default=None,
            help="A run under run_root (folder path, folder name or run id): the run whose best / last checkpoint "
                 "test, validate and predict use (default: the newest), or the run fit --ckpt_path last resumes. "
                 "With fit alone: the name of the new run's folder.",
        )  # fmt: skip

    def setup_parser(
        self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]
    ) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        self.parser.add_argument("--version", action="version", version=f"tim4rec-pl {__version__}")
        subcommands = getattr(self.parser, "_subcommands_action", None)
        if subcommands is not None:  # listed for --help only: main() hands `tim4rec-pl data ...` to data/cli.py
            subcommands.add_subcommand("data", LightningArgumentParser(description=DATA_HELP), help=DATA_HELP)

    def _parse_ckpt_path(self) -> None:
        # Lightning reads the checkpoint's hyperparameters here, before anything else: identify the file first
        ckpt_path = self.config.get(str(self.config.get("subcommand")), {}).get("ckpt_path")
        if ckpt_path and "://" not in str(ckpt_path) and Path(ckpt_path).is_file():
            read_checkpoint(ckpt_path, "--ckpt_path")
        super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        end_private_temp()  # begun in run_cli, for the parsing
        cfg = self.config[self.subcommand]
        _check_optimizer_arguments(cfg)
        if self.subcommand == "fit":
            _adapt_to_validation_off(cfg)
        if not sys.stdout.isatty() and cfg.trainer.get("enable_progress_bar") is None:
            cfg.trainer.enable_progress_bar = False  # no carriage-return bars in log files: one line per epoch
        if cfg.get("run_root") is not None:
            self.run = choose_run(cfg, self.subcommand)
            place_outputs(cfg, self.subcommand, self.run)
        elif cfg.get("run") is not None:
            raise UserError("--run needs a run_root in the config (e.g. run_root: runs/my-config); set one")
        trainer = cfg.get("trainer") or {}
        if "wandb" in str(trainer.get("logger")).lower():
            isolate_wandb_temp()  # W&B's temp folders in a private folder, removed at exit (leftovers.py)
        # validate / test / predict: a failure removes the run files the command added (leftovers.py)
        self.run_files = RunFiles.from_trainer_config(trainer) if self.subcommand in EVALUATING else None
        if self.run is not None and is_launching_process():
            self.run.record(self.subcommand)
            os.environ[CHILD_ENV] = str(self.run.path)  # DDP processes that Lightning starts join this run

    def instantiate_classes(self) -> None:
        with self._removing_run_files_on_failure():
            super().instantiate_classes()

    def _run_subcommand(self, subcommand: str) -> None:
        with self._removing_run_files_on_failure():
            try:
                super()._run_subcommand(subcommand)
            except SIGTERMException:
                report = _interrupt_report(getattr(self, "trainer", None))
                if report is None:
                    raise
                raise report.in_run(self.run.name if self.run is not None else None) from None

    @contextlib.contextmanager
    def _removing_run_files_on_failure(self) -> Iterator[None]:
        try:
            yield
        except BaseException:
            if getattr(self, "run_files", None) is not None:
                self.run_files.remove_new()
            raise

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
        if config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in [*(config.get("callbacks") or []), *callbacks]
        ):
            callbacks = [*callbacks, ShortProgressBar()]
        config["plugins"] = with_atomic_checkpoints(config.get("plugins"))
        return super()._instantiate_trainer(config, callbacks)

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if "ckpt_path" in kwargs:
            if self.run is None:  # with a run root, choose_run has already turned best / last into a file
                kwargs["ckpt_path"] = resolve_ckpt_path(kwargs["ckpt_path"], self.trainer, subcommand)
            check_checkpoint_file(kwargs["ckpt_path"], self.model)  # one line for a foreign file, before any run
        if kwargs.get("weights_only", False) is None:  # our checkpoints hold tensors and plain data only
            kwargs["weights_only"] = True
        if subcommand == "predict" and kwargs.get("return_predictions") is None:
            kwargs["return_predictions"] = False  # the PredictionWriter keeps the top-K; no list of every batch
        return kwargs


EVALUATING = ("validate", "test", "predict")


def _interrupt_report(trainer: Any) -> Interrupted | None:
    """What the FaultTolerance callback recorded when fit stopped on a signal (None: nothing recorded)."""
    for callback in getattr(trainer, "callbacks", None) or []:
        if isinstance(callback, FaultTolerance) and callback.interrupted is not None:
            return callback.interrupted
    return None


def with_atomic_checkpoints(plugins: Any) -> list[Any]:
    """The Trainer's plugins plus :class:`AtomicCheckpointIO`, unless the config chose a checkpoint plugin."""
    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


class OneLineErrorParser(LightningArgumentParser):
    """The CLI's parser: a mistaken option or config value is one UserError line naming the problem and where the
    help is, instead of the whole usage text (docs/errors.md)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        sub = getattr(ex, "subcommand_parser", None) or self
        prog = sub.prog.replace(" [options]", "")
        first = " ".join(str(message).split())  # jsonargparse's messages may span lines
        raise UserError(f"{first}; see {prog} --help")


def _checkpoint_dirs(trainer: Any) -> list[Path]:
    return [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]


def resolve_ckpt_path(ckpt_path: str | None, trainer: Any, subcommand: str) -> str | None:
    """Without a run root: turn ``best`` / ``last`` into a file of the checkpoint folder the config names.

    ``best`` is ``<checkpoint dirpath>/best.ckpt`` and ``last`` is ``<checkpoint dirpath>/last.ckpt``, the files a
    ModelCheckpoint with ``filename: best, save_last: true`` writes.
    """
    if ckpt_path is None:
        return None
    if ckpt_path in ("best", "last"):
        if subcommand == "fit":
            if ckpt_path == "last" and not any((d / "last.ckpt").is_file() for d in _checkpoint_dirs(trainer)):
                raise UserError(
                    "--ckpt_path last: no last.ckpt to resume from in "
                    f"{[str(d) for d in _checkpoint_dirs(trainer)] or 'any checkpoint folder'}; "
                    "run fit without --ckpt_path to start a new run"
                )
            return ckpt_path
        callback = trainer.checkpoint_callback
        if ckpt_path == "best" and callback is not None and getattr(callback, "best_model_path", ""):
            return ckpt_path
        for folder in _checkpoint_dirs(trainer):
            candidate = folder / f"{ckpt_path}.ckpt"
            if candidate.is_file():
                return str(candidate)
        dirs = [str(d) for d in _checkpoint_dirs(trainer)]
        raise UserError(
            f"--ckpt_path {ckpt_path}: no {ckpt_path}.ckpt in {dirs or 'any checkpoint folder'}; "
            "train first with `tim4rec-pl fit --config ...` or pass the checkpoint's file path"
        )
    if "://" not in ckpt_path and not Path(ckpt_path).is_file():
        raise UserError(f"--ckpt_path {ckpt_path}: no such checkpoint file; pass an existing .ckpt, or best / last")
    return ckpt_path


# ------------------------------------------------------------------------------------------- other config checks
def _check_optimizer_arguments(cfg: Any) -> None:
    """Lightning's --lr_scheduler works only beside an --optimizer; alone it would be dropped without a word."""
    if cfg.get("lr_scheduler") is not None and cfg.get("optimizer") is None:
        raise UserError("--lr_scheduler is used only together with --optimizer (e.g. --optimizer Adam "
                        "--optimizer.lr 1e-3); for a warm-up with the built-in Adam use --model.warmup_steps N "
                        "and --model.lr_schedule cosine|constant")  # fmt: skip


def _adapt_to_validation_off(cfg: Any) -> None:
    """With ``trainer.limit_val_batches 0`` nothing is validated: checkpoints keep the latest epoch, no early stop."""
    limit = cfg.trainer.get("limit_val_batches")
    if limit is None or float(limit) != 0.0:
        return
    callbacks = config_entries(cfg.trainer.get("callbacks"))
    kept = [c for c in callbacks if class_name(c) != "EarlyStopping"]
    for callback in kept:
        if class_name(callback) == "ModelCheckpoint" and callback.get("init_args") is not None:
            callback.init_args.monitor = None
            callback.init_args.save_top_k = 1
    if callbacks:
        cfg.trainer.callbacks = kept
    say("validation is off (trainer.limit_val_batches 0): checkpoints keep the latest epoch (best.ckpt is the "
         "last epoch) and early stopping is off")  # fmt: skip


class ShortProgressBar(TQDMProgressBar):
    """The terminal progress bar with short names (loss, ndcg@10) and without Lightning's ``v_num``."""

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        short: dict[str, Any] = {}
        for key, value in metrics.items():
            name = key.split("/", 1)[-1].removesuffix("_step")
            if name.endswith("_epoch"):
                continue
            short[name] = value
        return short


class _StderrHandler(logging.StreamHandler):
    """Writes to the ``sys.stderr`` of the moment: tests and notebooks swap it, and a handler that kept the stream
    it was created with would write to a closed one."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


class _DropThirdPartyNoise(logging.Filter):
    """Lightning's advertisements and lines about hardware this package never uses (TPU, HPU)."""

    PREFIXES = ("💡 Tip:", "TPU available", "HPU available")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.PREFIXES)


def _quiet_third_parties() -> None:
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch", "lightning.fabric"):
        target = logging.getLogger(name)
        if not any(isinstance(f, _DropThirdPartyNoise) for f in target.filters):
            target.addFilter(_DropThirdPartyNoise())
    # Lightning's own pytree helper on recent torch; nothing a user of this package can change
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def _configure_logging() -> None:
    _quiet_third_parties()
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
    inherited = os.environ.get(CHILD_ENV)
    NEW_RUNS.clear()
    try:
        return _build_cli(args)
    finally:
        end_private_temp()
        if inherited is None:  # this process chose the run: the next command in it chooses its own
            os.environ.pop(CHILD_ENV, None)


def _build_cli(args: list[str] | None) -> TiM4RecCLI:
    return TiM4RecCLI(
        SeqRecModule,
        SeqRecDataModule,
        save_config_callback=LogConfigCallback,
        save_config_kwargs={"overwrite": True},
        # always on, in every config: stop cleanly on SIGTERM/SIGINT; best validation values in the W&B summary
        # and the held setup lines printed once the command really starts (held_output.py)
        trainer_defaults={"callbacks": [FaultTolerance(), BestMetricsSummary(), EpochSummary(), ReleaseHeldOutput()]},
        parser_kwargs={"description": DESCRIPTION, "default_env": False},
        parser_class=OneLineErrorParser,
        args=args,
    )


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args[:1] in (["--version"], ["-V"]):
            print(f"tim4rec-pl {__version__}")
            sys.exit(0)
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
        discard_new_runs()
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
