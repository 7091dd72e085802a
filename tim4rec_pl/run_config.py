"""Which run folder a command uses, and pointing its outputs there: the run folder applied to the parsed config.

``choose_run`` picks (or creates) the run of ``fit`` / ``validate`` / ``test`` / ``predict`` from ``run_root``,
``--run`` and ``--ckpt_path best|last``; ``place_outputs`` points the trainer, the loggers and the checkpoints of the
config at it. The folders themselves (creation, ids, ``run.json``) are `tim4rec_pl.runs`.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

from tim4rec_pl.errors import UserError
from tim4rec_pl.runs import (
    CHILD_ENV,
    Run,
    create_run,
    find_run,
    launched_rank,
    launched_world_size,
    newest_run_with,
    open_run,
    run_of_checkpoint,
)

log = logging.getLogger("tim4rec_pl")


NEW_RUNS: list[Path] = []  # run folders this process created (removed again when the command fails at once)


def discard_new_runs() -> None:
    """Remove run folders this process created when they hold no checkpoint: a command that stopped on a user
    error leaves nothing half-written behind."""
    while NEW_RUNS:
        path = NEW_RUNS.pop()
        if path.is_dir() and not any(path.glob("checkpoints/*.ckpt")) and is_launching_process():
            shutil.rmtree(path, ignore_errors=True)


def is_launching_process() -> bool:
    """True in the process that chose the run (not in a DDP process that Lightning or torchrun/srun started)."""
    return launched_rank() == 0 and not (os.environ.get(CHILD_ENV) and os.environ.get("LOCAL_RANK", "0") != "0")


def say(message: str) -> None:
    if is_launching_process():
        log.info(f"tim4rec-pl: {message}")


def choose_run(cfg: Any, subcommand: str) -> Run:
    """The run folder of this command; ``cfg.ckpt_path`` is turned into a file when it says best / last."""
    root, name, ckpt = Path(cfg.run_root), cfg.get("run"), cfg.get("ckpt_path")
    inherited = os.environ.get(CHILD_ENV)
    if inherited and os.environ.get("LOCAL_RANK", "0") != "0":  # a DDP process started by Lightning
        run = open_run(Path(inherited))
        if ckpt in ("best", "last"):
            cfg.ckpt_path = str(run.checkpoints / f"{ckpt}.ckpt")
        return run
    if subcommand == "fit":
        if ckpt == "last":
            if name is not None:
                run = find_run(root, name)
                if not (run.checkpoints / "last.ckpt").is_file():
                    raise UserError(f"--ckpt_path last: run {run.path} has no checkpoints/last.ckpt to resume from; "
                                    "run fit without --ckpt_path to start a new run")  # fmt: skip
            else:
                found = newest_run_with(root, "last.ckpt")
                if found is None:
                    raise UserError(f"--ckpt_path last: no run under {root} has a checkpoints/last.ckpt to resume "
                                    "from; run fit without --ckpt_path to start a new run")  # fmt: skip
                run = found[0]
            cfg.ckpt_path = str(run.checkpoints / "last.ckpt")
            say(f"resuming run {run.path} (W&B id {run.id}) from {cfg.ckpt_path}")
            _expect_checkpoints_folder()
            return run
        if name is None and launched_world_size() > 1:  # srun / torchrun: every process must agree on the folder
            if not os.environ.get("SLURM_JOB_ID"):
                raise UserError("several processes were started (WORLD_SIZE > 1): pass --run NAME so that they all "
                                "write to the same run folder")  # fmt: skip
            name = f"slurm-{os.environ['SLURM_JOB_ID']}"
        if name is not None and launched_rank() != 0:
            return open_run(root / name)  # rank 0 creates it; the other ranks write nothing there themselves
        requeued = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0
        if name is not None and (root / name).is_dir() and (requeued or any((root / name).glob("hpc_ckpt_*.ckpt"))):
            run = open_run(root / name)  # a requeued SLURM job: Lightning resumes from its hpc_ckpt_N.ckpt
            say(f"continuing requeued run {run.path} (W&B id {run.id})")
            _expect_checkpoints_folder()
            return run
        run = create_run(root, name)
        NEW_RUNS.append(run.path)
        say(f"new run {run.path} (W&B id {run.id})")
        return run
    # test / validate / predict
    if name is not None:
        run = find_run(root, name)
        if ckpt in ("best", "last"):
            cfg.ckpt_path = str(run.checkpoints / f"{ckpt}.ckpt")
            if not Path(cfg.ckpt_path).is_file():
                raise UserError(f"--ckpt_path {ckpt}: run {run.path} has no checkpoints/{ckpt}.ckpt; "
                                "pick another run with --run, or pass a checkpoint file")  # fmt: skip
        say(f"{subcommand} in run {run.path}" + (f" with {cfg.ckpt_path}" if cfg.get("ckpt_path") else ""))
        return run
    if ckpt in ("best", "last"):
        found = newest_run_with(root, f"{ckpt}.ckpt")
        if found is None:
            raise UserError(f"--ckpt_path {ckpt}: no run under {root} has a checkpoints/{ckpt}.ckpt; train first with "
                            "`tim4rec-pl fit --config ...`, or pass the checkpoint's file path")  # fmt: skip
        run, count = found
        cfg.ckpt_path = str(run.checkpoints / f"{ckpt}.ckpt")
        others = f"newest of {count} runs in {root}; pick another with --run" if count > 1 else f"the run in {root}"
        say(f"--ckpt_path {ckpt}: {cfg.ckpt_path} ({others})")
        return run
    if ckpt is not None:
        if "://" not in ckpt and not Path(ckpt).is_file():
            raise UserError(f"--ckpt_path {ckpt}: no such checkpoint file; pass an existing .ckpt, or best / last")
        run = run_of_checkpoint(ckpt) if "://" not in ckpt else None
        if run is not None:
            say(f"{subcommand} in run {run.path} with {ckpt}")
            return run
    run = create_run(root)  # an evaluation of a checkpoint from elsewhere, or of an untrained model: its own folder
    NEW_RUNS.append(run.path)
    say(f"new run {run.path} for {subcommand}")
    return run


def _expect_checkpoints_folder() -> None:
    """A resumed run writes into its own, non-empty checkpoints/ on purpose: Lightning need not warn about it."""
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


def config_entries(value: Any) -> list[Any]:
    if value is None or isinstance(value, bool):
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def class_name(entry: Any) -> str:
    return str(entry.get("class_path", "")).rsplit(".", 1)[-1] if hasattr(entry, "get") else ""


def place_outputs(cfg: Any, subcommand: str, run: Run) -> None:
    """Point the trainer, the loggers and the checkpoints of ``cfg`` at the run folder."""
    cfg.trainer.default_root_dir = str(run.path)
    group = Path(cfg.run_root).name
    for logger in config_entries(cfg.trainer.get("logger")):
        kind, args = class_name(logger), logger.get("init_args")
        if args is None:
            continue
        if kind == "WandbLogger":
            args.save_dir = str(run.path)
            args.id = run.id  # one W&B run per run folder: a resumed fit and test/validate continue it
            args.resume = "allow"
            if not args.get("group"):
                args.group = group
            if args.get("name") in (None, "", group):
                args.name = f"{group}/{run.name}"
            if not args.get("job_type") and run.path in NEW_RUNS:
                args.job_type = subcommand  # the command that created the run; one that continues it keeps that
        elif kind in ("CSVLogger", "TensorBoardLogger"):
            args.save_dir = str(run.path)
            if args.get("name") in (None, "", "lightning_logs"):
                args.name = "csv" if kind == "CSVLogger" else "tensorboard"
    for callback in config_entries(cfg.trainer.get("callbacks")):
        if class_name(callback) == "ModelCheckpoint" and callback.get("init_args") is not None:
            callback.init_args.dirpath = str(run.checkpoints)
