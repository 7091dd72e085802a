"""Training that survives interruption: a signal stops ``fit`` at a batch boundary with an atomic checkpoint, and
``fit --ckpt_path last`` continues exactly where it stopped (weights, optimiser, loops, callbacks, data order, RNG).

Two pieces (the training loader that resumes mid-epoch, ``tim4rec_pl.data.loader.ResumableDataLoader``,
lives with the data):

* ``FaultTolerance`` (a callback the CLI always adds): SIGTERM and SIGINT only set a flag; the flag is acted on
  after the running training batch (all ranks agree on the same batch under DDP), Lightning raises its
  ``SIGTERMException`` there, and this callback writes ``<checkpoint dir>/last.ckpt`` through a temporary file and
  ``os.replace``. The exception then carries the exit code ``128 + signal`` and the checkpoint path, which
  ``describe_interrupt`` turns into the CLI's one-line message. The callback also stores the torch / CUDA / NumPy /
  Python RNG states in every checkpoint and puts them back right before the first batch after a resume, so dropout
  continues with the same masks.
* ``rng_state`` / ``set_rng_state``: the RNG states as plain tensors and lists, loadable with ``weights_only=True``.
"""

from __future__ import annotations

import os
import random
import shlex
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from tim4rec_pl.atomic import fsync_dir

INTERRUPT_SIGNALS = (signal.SIGTERM, signal.SIGINT)


# ------------------------------------------------------------------------------------------------------ RNG states
def rng_state() -> dict[str, Any]:
    """The torch, CUDA (when initialised), NumPy and Python RNG states as tensors, lists and numbers only."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [str(kind), [int(k) for k in keys], int(pos), int(has_gauss), float(gauss)],
        "python": [int(version), list(internal), gauss_next],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned. CUDA states are restored when this process sees as many devices."""
    torch.set_rng_state(state["torch"].cpu())
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


# ---------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint_atomically(trainer: L.Trainer, path: str | os.PathLike) -> Path:
    """Write a full checkpoint to ``path`` via a temporary file in the same folder and ``os.replace``.

    A reader (or a later resume) sees the old file or the complete new one, never a torn one; a failed write removes
    the temporary file. (Under the CLI the temporary file is itself written by ``AtomicCheckpointIO``, fsynced.)
    Call it on every rank (saving is collective); rank 0 writes.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")  # the same name on every rank (a DDP rank may write too)
    if trainer.is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        trainer.save_checkpoint(tmp, weights_only=False)  # False: the full training state
        if trainer.is_global_zero:
            os.replace(tmp, path)
            fsync_dir(path.parent)
    except BaseException:
        if trainer.is_global_zero:
            tmp.unlink(missing_ok=True)  # a failed write leaves the old checkpoint and no temporary file
        raise
    trainer.strategy.barrier("tim4rec_pl.save_checkpoint_atomically")
    return path


def interrupt_checkpoint_path(trainer: L.Trainer) -> Path | None:
    """``<dirpath>/last.ckpt`` of the first ModelCheckpoint: the newest ``last*.ckpt`` is what ``--ckpt_path last``
    resumes. None when checkpointing is off (``trainer.enable_checkpointing: false``): then nothing is written."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            return Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
    return None


# ------------------------------------------------------------------------------------------------- callback
class Interrupted(SIGTERMException):
    """``fit`` stopped by a signal at a batch boundary: what the one-line message needs (see ``describe_interrupt``).

    ``FaultTolerance`` records one when it has written the interrupt checkpoint; the CLI raises it in place of
    Lightning's bare ``SIGTERMException``, adding the run folder's name (``run``) for the resume command.
    """

    def __init__(
        self, signal_name: str, epoch: int, step: int, rank: int, checkpoint: str | None, run: str | None = None
    ) -> None:
        super().__init__(128 + int(signal.Signals[signal_name]))
        self.signal_name, self.epoch, self.step, self.rank = signal_name, epoch, step, rank
        self.checkpoint, self.run = checkpoint, run

    def in_run(self, run: str | None) -> Interrupted:
        """The same report, naming the run folder that the resume command should continue."""
        return Interrupted(self.signal_name, self.epoch, self.step, self.rank, self.checkpoint, run)


class FaultTolerance(Callback):
    """SIGTERM / SIGINT during ``fit``: stop after the running batch, write ``last.ckpt`` atomically, exit cleanly.

    Also keeps the RNG states in every checkpoint and restores them before the first batch after a resume. A second
    SIGINT while stopping raises KeyboardInterrupt at once (the previous ``last.ckpt`` stays intact).
    """

    def __init__(self) -> None:
        self.signum: int | None = None  # the first signal received, until the run stops
        self.checkpoint_path: Path | None = None  # where the interrupt checkpoint went
        self.interrupted: Interrupted | None = None  # what the CLI reports once fit stopped on a signal
        self._previous: dict[int, Any] = {}
        self._pending_rng: dict[str, Any] | None = None
        self._trainer: L.Trainer | None = None

    # -- signal handling ---------------------------------------------------------------------------------------
    def _install(self, trainer: L.Trainer) -> None:
        if self._previous or threading.current_thread() is not threading.main_thread():
            return
        self._trainer = trainer
        for signum in INTERRUPT_SIGNALS:  # replaces Lightning's SIGTERM notifier for the duration of training
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def _uninstall(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl+C: stop now
            return
        self.signum = signum
        trainer = self._trainer
        if trainer is not None:
            launcher = trainer.strategy.launcher  # Lightning's own DDP launcher: pass the signal to the children
            if launcher is not None and trainer.global_rank == 0:
                launcher.kill(signum)
            if trainer.global_rank == 0:  # os.write: no locks taken inside a signal handler
                again = " (Ctrl+C again: stop at once)" if signum == signal.SIGINT else ""
                note = f"tim4rec-pl: {signal.Signals(signum).name} received; stopping after the current batch{again}\n"
                os.write(2, note.encode())

    def _stop_if_signalled(self, trainer: L.Trainer) -> None:
        stop = self.signum is not None
        if trainer.world_size > 1:  # every rank must stop after the same batch
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            if self.signum is None:  # another rank got the signal
                self.signum = signal.SIGTERM
            trainer._signal_connector.received_sigterm = True  # Lightning raises SIGTERMException after this batch

    # -- hooks -------------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signum, self.checkpoint_path, self.interrupted = None, None, None  # a Trainer may fit more than once

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install(trainer)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending_rng is not None:  # right before the first batch after a resume
            set_rng_state(self._pending_rng)
            self._pending_rng = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._stop_if_signalled(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_if_signalled(trainer)  # a signal during the epoch-end validation

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._uninstall()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._uninstall()
        self._trainer = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            self._uninstall()  # only an interrupted fit has a training state worth saving
            return
        signum = self.signum if self.signum is not None else signal.SIGTERM
        target = interrupt_checkpoint_path(trainer)
        self.checkpoint_path = save_checkpoint_atomically(trainer, target) if target is not None else None
        self._uninstall()
        self.interrupted = Interrupted(
            signal.Signals(signum).name,
            epoch=trainer.current_epoch,
            step=trainer.global_step,
            rank=trainer.global_rank,
            checkpoint=str(self.checkpoint_path) if target is not None else None,
        )

    # -- state in checkpoints ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_rng = state_dict.get("rng")


def describe_interrupt(exception: SIGTERMException, argv: Sequence[str]) -> tuple[int, str | None]:
    """Exit code and the one-line message (None on ranks other than 0) for a run stopped by ``FaultTolerance``.

    Args:
        exception: The SIGTERMException that ended ``fit`` (or another command).
        argv: The command's arguments (without the program name), to print the resume command.
    """
    code = exception.code if isinstance(exception.code, int) and exception.code else 128 + int(signal.SIGTERM)
    if not isinstance(exception, Interrupted):  # not a fit stopped by FaultTolerance
        name = signal.Signals(code - 128).name if code > 128 else "SIGTERM"
        return code, f"tim4rec-pl: stopped by {name}"
    if exception.rank != 0:
        return code, None
    where = f"stopped by {exception.signal_name} at epoch {exception.epoch}, step {exception.step}"
    if exception.checkpoint is None:
        return code, f"tim4rec-pl: {where}; no checkpoint written (trainer.enable_checkpointing is false)"
    args, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--ckpt_path":
            skip = True
        elif not arg.startswith("--ckpt_path="):
            args.append(arg)
    if exception.run is not None and "--run" not in args and not any(a.startswith("--run=") for a in args):
        args += ["--run", exception.run]  # resume this very run, even when a newer one exists by then
    resume = " ".join(shlex.quote(a) for a in [*args, "--ckpt_path", "last"])
    return code, f"tim4rec-pl: {where}; checkpoint: {exception.checkpoint}; resume with: tim4rec-pl {resume}"


def print_interrupt(exception: SIGTERMException, argv: Sequence[str]) -> int:
    """Print ``describe_interrupt``'s line to stderr and return the exit code (for the CLI's ``main``)."""
    code, message = describe_interrupt(exception, argv)
    if message:
        print(message, file=sys.stderr)
    return code
