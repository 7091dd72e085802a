"""Run folders: every ``fit`` gets a folder of its own, and ``best`` / ``last`` find a run again.

A config names a run root (``run_root: runs/ml-100k``); each ``fit`` creates ``<run_root>/<run>/`` with::

    run.json           the run's id (also its W&B run id), when it was created, the commands run in it
    config.yaml        the resolved config of the fit (config-test.yaml, ... for the other commands)
    checkpoints/       best.ckpt, last.ckpt (and hpc_ckpt_N.ckpt of a SLURM requeue, next to it)
    csv/version_N/     metrics.csv of each command run in this folder (fit, test, a resumed fit, ...)
    wandb/             the W&B run directories (online or offline) of this run

The folder name is ``<YYYYmmdd-HHMMSS>-<id>`` (or a name chosen with ``--run``), made with an exclusive ``mkdir``, so
two fits started at the same moment never share a folder. Nothing here imports Lightning.
"""

from __future__ import annotations

import json
import os
import secrets
import string
import time
from dataclasses import dataclass
from pathlib import Path

from tim4rec_pl.errors import UserError

RUN_FILE = "run.json"
CHILD_ENV = "TIM4REC_RUN_DIR"  # set for the processes Lightning launches itself (DDP): they join the parent's run
_ID_CHARS = string.ascii_lowercase + string.digits


@dataclass(frozen=True)
class Run:
    """One run folder."""

    path: Path
    id: str

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def info(self) -> dict:
        try:
            return json.loads((self.path / RUN_FILE).read_text())
        except (OSError, ValueError):
            return {}

    def record(self, command: str) -> None:
        """Add a line to ``run.json`` saying which command ran in this folder and when."""
        info = self.info() or {"id": self.id, "created": _now()}
        info.setdefault("commands", []).append({"command": command, "at": _now()})
        _write_json(self.path / RUN_FILE, info)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def new_id() -> str:
    """Eight lowercase letters and digits, as W&B's own run ids."""
    return "".join(secrets.choice(_ID_CHARS) for _ in range(8))


def open_run(path: Path) -> Run:
    """The run in an existing folder (its id from ``run.json``; a folder without one gets a new id)."""
    info = Run(path, "").info()
    run_id = info.get("id") if isinstance(info.get("id"), str) else None
    return Run(path, run_id or new_id())


def create_run(root: str | Path, name: str | None = None) -> Run:
    """Create a new run folder under ``root``: ``<timestamp>-<id>``, or ``name`` when given.

    The folder is made with an exclusive ``mkdir``: a name that already exists is never reused (a generated name is
    drawn again; a chosen name is a UserError).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    # a W&B sweep agent (or the user) names the W&B run through WANDB_RUN_ID: the run folder takes that id
    wanted = os.environ.get("WANDB_RUN_ID")
    for attempt in range(100):
        run_id = wanted if wanted and attempt == 0 else new_id()
        path = root / (name or f"{time.strftime('%Y%m%d-%H%M%S')}-{run_id}")
        try:
            path.mkdir()
        except FileExistsError:
            if name is not None:
                raise UserError(
                    f"run folder {path} already exists; resume it with --run {name} --ckpt_path last, "
                    "or choose another --run name"
                ) from None
            continue
        run = Run(path, run_id)
        _write_json(path / RUN_FILE, {"id": run_id, "created": _now(), "commands": []})
        return run
    raise UserError(f"could not create a new run folder under {root}; check that it is writable")


def list_runs(root: str | Path) -> list[Path]:
    """Run folders under ``root`` (those with a ``run.json``), oldest first (by creation time recorded in them)."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir() if (p / RUN_FILE).is_file()]
    return sorted(runs, key=lambda p: (Run(p, "").info().get("created", ""), p.stat().st_mtime, p.name))


def find_run(root: str | Path, run: str) -> Run:
    """The run named by ``run``: a folder path, a folder name under ``root``, or a run id (or a unique prefix)."""
    candidate = Path(run)
    for path in (candidate, Path(root) / run):
        if (path / RUN_FILE).is_file() or (path / "checkpoints").is_dir():
            return open_run(path)
    matches = [p for p in list_runs(root) if p.name.endswith(run) or open_run(p).id.startswith(run)]
    if len(matches) == 1:
        return open_run(matches[0])
    known = ", ".join(p.name for p in list_runs(root)[-5:]) or "none yet"
    what = "matches more than one run" if matches else "is no run folder"
    raise UserError(f"--run {run}: {what} under {root} (newest: {known}); pass a run folder or its name")


def newest_run_with(root: str | Path, filename: str) -> tuple[Run, int] | None:
    """The newest run under ``root`` whose ``checkpoints/`` holds ``filename``, and how many runs ``root`` holds."""
    runs = list_runs(root)
    for path in reversed(runs):
        if (path / "checkpoints" / filename).is_file():
            return open_run(path), len(runs)
    return None


def run_of_checkpoint(path: str | Path) -> Run | None:
    """The run a checkpoint file belongs to (``<run>/checkpoints/x.ckpt`` or ``<run>/x.ckpt``), if any."""
    path = Path(path).resolve()
    for folder in (path.parent.parent, path.parent):
        if (folder / RUN_FILE).is_file():
            return open_run(folder)
    return None


def launched_rank() -> int:
    """Global rank of this process as far as the environment tells before Lightning starts (0 when alone)."""
    for key in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    if os.environ.get("SLURM_PROCID", "").isdigit() and int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
        return int(os.environ["SLURM_PROCID"])
    return 0


def launched_world_size() -> int:
    """Number of processes started by an outside launcher (torchrun, srun), 1 when alone."""
    for key in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 1
