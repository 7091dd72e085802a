"""The training loader that resumes mid-epoch.

Lightning saves a loader's ``state_dict()`` in checkpoints and calls ``load_state_dict()`` on resume. The state is the
sampler's epoch and seed and the samples of the epoch's order that the training loop has *finished* (read from the
loop's batch progress, not from what the loader has handed out: the loop fetches ahead), so the resumed epoch skips
exactly those.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader

from tim4rec_pl.errors import UserError


class ResumableDataLoader(DataLoader):
    """A training DataLoader whose position within the epoch goes into Lightning checkpoints.

    The sampler must offer ``state_dict()`` / ``load_state_dict()`` with ``epoch``, ``seed`` and ``consumed`` (the
    samples of the epoch's order to skip, over all ranks) and ``num_replicas``, like ``TrainSampler``. ``len()``
    stays the whole epoch's batch count after a resume, as Lightning's loop expects: it carries on counting from the
    batches it restored. The loader draws its worker base seed from its own generator, never from the global RNG, so
    that creating an epoch's iterator does not shift the random stream that dropout uses.
    """

    def __init__(self, *args: Any, trainer: L.Trainer | None = None, **kwargs: Any) -> None:
        """Stateful training loader.

        Args:
            *args: DataLoader's positional arguments.
            trainer: The Trainer whose training-loop progress says how many batches are finished (without one, the
                state falls back to what the sampler has handed out).
            **kwargs: DataLoader's keyword arguments; ``generator`` defaults to a private one seeded with 0.
        """
        if kwargs.get("generator") is None:
            kwargs["generator"] = torch.Generator().manual_seed(0)
        super().__init__(*args, **kwargs)
        self._trainer = weakref.ref(trainer) if trainer is not None else None

    def __len__(self) -> int:
        per_rank = math.ceil(len(self.dataset) / getattr(self.sampler, "num_replicas", 1))  # type: ignore[arg-type]
        if self.batch_size is None:
            return per_rank
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    def _batches_done(self) -> int | None:
        """Training batches of the current epoch whose step has finished on this rank (None: not training)."""
        trainer = self._trainer() if self._trainer is not None else None
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return None
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    def state_dict(self) -> dict[str, Any]:
        sampler_state = dict(self.sampler.state_dict())  # type: ignore[attr-defined]
        done = self._batches_done()
        replicas = int(getattr(self.sampler, "num_replicas", 1))
        if done is not None and self.batch_size is not None:
            sampler_state["consumed"] = min(len(self.dataset), done * self.batch_size * replicas)  # type: ignore
        return {"sampler": sampler_state, "batch_size": self.batch_size, "num_replicas": replicas}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        replicas = int(getattr(self.sampler, "num_replicas", 1))
        mid_epoch = 0 < int(state["sampler"].get("consumed", 0)) < len(self.dataset)  # type: ignore[arg-type]
        if mid_epoch and (state.get("batch_size"), state.get("num_replicas")) != (self.batch_size, replicas):
            raise UserError(
                f"the checkpoint stopped mid-epoch with data.batch_size={state.get('batch_size')} on "
                f"{state.get('num_replicas')} process(es), but this run has batch_size={self.batch_size} on "
                f"{replicas}; resume with the same batch size and devices (or from an end-of-epoch checkpoint)"
            )
        self.sampler.load_state_dict(state["sampler"])  # type: ignore[attr-defined]
