"""``tim4rec-pl predict``: the top-K recommendations of every user, written to Parquet or CSV.

The LightningModule's ``predict_step`` returns sequence representations (B, d); :class:`PredictionWriter` (a
Lightning callback, registered by the CLI under ``--predictions.*``) turns them into the K best items per user with the
same block-wise scoring as the metrics, and writes one row per (user, rank):

    user_id (original token) | rank (1-based) | item_id (original token) | score [| target_id, mode "test" only]

Two modes:

- ``next``: the history is the user's whole sequence; the items are what the user should see next (a product's use).
- ``test``: the history is the one the test metrics score (everything before the last interaction), and the column
  ``target_id`` holds the held-out item, so HR@K computed from the file equals the ``test`` HR@K when nothing is
  excluded (the audit of the metrics).

Under DDP every process writes its users to a part file next to the output; process 0 merges the parts in user
order and moves the result into place atomically (so the output folder must be visible to every process).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import polars as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from tim4rec_pl.atomic import atomic_path, remove_stale_temporaries, temporary_name
from tim4rec_pl.errors import UserError
from tim4rec_pl.metrics import topk_items

__all__ = ["PredictionWriter", "check_writable", "read_user_tokens", "resolve_users", "seen_items"]

log = logging.getLogger("tim4rec_pl")

PredictMode = Literal["next", "test"]
OutputFormat = Literal["auto", "parquet", "csv"]


def check_writable(output: Path) -> None:
    """UserError unless ``output`` can be created: its nearest existing folder takes a new file (probed with one).

    Nothing is created when the check fails; the probe file is removed at once.
    """
    folder = output.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    problem = None
    if output.is_dir():
        problem = "it is a folder"
    elif not folder.is_dir():
        problem = f"{folder} is a file, not a folder"
    else:
        probe = folder / temporary_name("probe")
        try:
            os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            probe.unlink()
        except OSError as err:
            problem = f"{folder}: {err.strerror or err}"
    if problem:
        raise UserError(
            f"--predictions.output {output}: cannot write there ({problem}); choose a file in a folder you can write to"
        )


def read_user_tokens(users: list[str | int] | str) -> list[str]:
    """User tokens from a list, or from a text file with one token per line (blank lines are skipped)."""
    if isinstance(users, (list, tuple)):
        return [str(u) for u in users]
    path = Path(users).expanduser()
    if not path.is_file():
        raise UserError(
            f"--predictions.users {users}: no such file; pass a file with one user token per line, or a list [u1, u2]"
        )
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def resolve_users(tokens: list[str], vocabulary: list[str]) -> list[int]:
    """Dense user ids of ``tokens`` (in their order, duplicates dropped); unknown tokens are a UserError."""
    index = {token: i for i, token in enumerate(vocabulary)}
    unknown = [t for t in tokens if t not in index]
    if unknown:
        shown = ", ".join(repr(t) for t in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise UserError(
            f"--predictions.users: {len(unknown)} of {len(tokens)} user tokens are not in the prepared data ({shown}); "
            "use the original user ids of the data file (users dropped by the k-core filter have no history)"
        )
    return list(dict.fromkeys(index[t] for t in tokens))


def seen_items(items: Tensor, starts: Tensor, ends: Tensor) -> Tensor:
    """Every item of the interactions ``[starts[b], ends[b])`` per row, right-padded with 0: (B, M) long.

    Args:
        items: (N,) item id of every interaction, grouped by user.
        starts: (B,) first interaction of each row's user.
        ends: (B,) one past the last interaction of the history.
    """
    lengths = ends - starts  # (B,)
    width = int(lengths.max()) if len(lengths) else 0
    steps = torch.arange(width, device=starts.device)  # (M,)
    valid = steps < lengths[:, None]  # (B, M)
    pos = torch.where(valid, starts[:, None] + steps, 0)  # (B, M)
    return torch.where(valid, items[pos], 0)


class PredictionWriter(Callback):
    def __init__(
        self,
        top_k: int = 10,
        output: str = "predictions.parquet",
        format: OutputFormat = "auto",
        mode: PredictMode = "next",
        exclude_seen: bool = False,
        users: list[str | int] | str | None = None,
    ) -> None:
        """Writes each user's top-K items during ``tim4rec-pl predict`` (it does nothing in fit / validate / test).

        Args:
            top_k: Items per user; more than the catalogue holds is an error.
            output: File to write; its parent folder is created. Checked before scoring starts; written atomically
                (a temporary file in the same folder, fsynced, then renamed over the old file).
            format: parquet | csv | auto (csv when ``output`` ends in .csv, else parquet).
            mode: next: recommend after the whole history (what a product shows); test: score each user's test
                position with the history the test metrics use, adding a target_id column (to audit the metrics).
            exclude_seen: Leave out items the user has already interacted with (the whole history, not only the
                last max_seq_len items). The metrics never exclude (docs/evaluation.md).
            users: Original user tokens to predict for, a list ([u1, u2]) or a text file with one token per line
                (default: every user). Unknown tokens are an error.
        """
        super().__init__()
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise UserError(f"--predictions.top_k must be a positive integer, got {top_k!r}")
        if mode not in ("next", "test"):
            raise UserError(f"--predictions.mode must be next or test, got {mode!r}")
        if format not in ("auto", "parquet", "csv"):
            raise UserError(f"--predictions.format must be parquet, csv or auto, got {format!r}")
        self.top_k, self.mode, self.exclude_seen, self.users = top_k, mode, exclude_seen, users
        self.output = Path(output).expanduser()
        self.format = format if format != "auto" else ("csv" if self.output.suffix.lower() == ".csv" else "parquet")
        self._dense_users: list[int] | None = None
        self._items: Tensor | None = None  # (N,) every interaction's item, for exclusion
        self._offsets: Tensor | None = None  # (U + 1,)
        self._chunks: list[dict[str, np.ndarray]] = []

    # -- Lightning hooks ---------------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "prepared"):
            raise UserError("predict needs the SeqRecDataModule (data: section of the config) to map ids to tokens")
        prepared = dm.prepared
        catalogue = len(prepared.item_tokens) - 1  # without the padding item
        if self.top_k > catalogue:
            raise UserError(
                f"--predictions.top_k {self.top_k} is more than the {catalogue} items of the catalogue; "
                f"use at most {catalogue}"
            )
        check_writable(self.output)  # before any user is scored
        if self.users is not None:
            self._dense_users = resolve_users(read_user_tokens(self.users), prepared.user_tokens)
        dm.set_predict_request(self.mode, self._dense_users)
        self._items = torch.as_tensor(np.asarray(prepared.items, dtype=np.int64))
        self._offsets = torch.as_tensor(np.asarray(prepared.offsets, dtype=np.int64))
        self._chunks = []

    def on_predict_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: dict[str, Tensor],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        user = batch["user"]  # (B,) dense ids
        exclude = None
        if self.exclude_seen:
            u = user.cpu()
            ends = self._offsets[u + 1] - (1 if self.mode == "test" else 0)  # the test target is not history
            exclude = seen_items(self._items, self._offsets[u], ends).to(outputs.device)  # (B, M)
        weight = pl_module.network.item_embedding.weight  # (num_items, d)
        block = int(getattr(pl_module, "eval_block_size", 65536))
        scores, items = topk_items(outputs, weight, self.top_k, exclude=exclude, block_size=block)  # (B, K) each
        chunk = {"user": user.cpu().numpy(), "items": items.cpu().numpy(), "scores": scores.cpu().numpy()}
        if self.mode == "test":
            chunk["target"] = batch["target"].cpu().numpy()
        self._chunks.append(chunk)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        frame = self._frame(dm.user_tokens, dm.item_tokens)
        self._chunks = []
        strategy = trainer.strategy
        if trainer.world_size == 1:
            self._write(frame, dm.num_users)
            return
        # named for rank 0's host and process: a later predict removes it if this one is killed
        parts = self.output.with_name(strategy.broadcast(temporary_name(f"{self.output.name}.parts"), src=0))
        parts.mkdir(parents=True, exist_ok=True)
        frame.write_parquet(parts / f"part-{trainer.global_rank:05d}.parquet")
        strategy.barrier("predict_parts_written")
        try:
            if trainer.global_rank == 0:
                files = sorted(parts.glob("part-*.parquet"))
                if len(files) != trainer.world_size:
                    raise UserError(
                        f"--predictions.output {self.output}: found {len(files)} of {trainer.world_size} part files in "
                        f"{parts}; under multi-node DDP the output folder must be on a filesystem every node sees"
                    )
                self._write(pl.concat([pl.read_parquet(f) for f in files]), dm.num_users)
        finally:
            strategy.barrier("predict_merged")
            if trainer.global_rank == 0:
                shutil.rmtree(parts, ignore_errors=True)

    # -- internals ---------------------------------------------------------------------------------------------

    def _frame(self, user_tokens: list[str], item_tokens: list[str]) -> pl.DataFrame:
        """One row per (user, rank) of this process, with dense user ids kept for ordering."""
        k = self._chunks[0]["items"].shape[1] if self._chunks else 0

        def cat(key: str, tail: tuple[int, ...], dtype: type) -> np.ndarray:
            parts = [c[key] for c in self._chunks]
            return np.concatenate(parts) if parts else np.zeros((0, *tail), dtype=dtype)

        users, items, scores = cat("user", (), np.int64), cat("items", (k,), np.int64), cat("scores", (k,), np.float32)
        keep = np.isfinite(scores).reshape(-1)  # -inf: fewer than K items were left after exclusion
        dense = np.repeat(users, k)[keep]
        user_tok, item_tok = pl.Series(user_tokens, dtype=pl.String), pl.Series(item_tokens, dtype=pl.String)
        columns = {
            "_dense": pl.Series(dense, dtype=pl.Int64),
            "user_id": user_tok.gather(dense),
            "rank": pl.Series(np.tile(np.arange(1, k + 1, dtype=np.int32), len(users))[keep], dtype=pl.Int32),
            "item_id": item_tok.gather(items.reshape(-1)[keep]),
            "score": pl.Series(scores.reshape(-1)[keep], dtype=pl.Float32),
        }
        if self.mode == "test":
            columns["target_id"] = item_tok.gather(np.repeat(cat("target", (), np.int64), k)[keep])
        return pl.DataFrame(columns)

    def _write(self, frame: pl.DataFrame, num_users: int) -> None:
        """Sort by the requested user order (default: dense id), then rank; write atomically."""
        order = np.arange(num_users, dtype=np.int64)
        if self._dense_users is not None:
            order[np.asarray(self._dense_users, dtype=np.int64)] = np.arange(len(self._dense_users))
        frame = (
            frame.with_columns(pl.Series("_order", order[frame["_dense"].to_numpy()]))
            .sort(["_order", "rank"])
            .drop(["_order", "_dense"])
        )
        remove_stale_temporaries(self.output.parent)  # what a killed predict left
        with atomic_path(self.output, what="predictions") as tmp:
            try:
                if self.format == "csv":
                    frame.write_csv(tmp)
                else:
                    frame.write_parquet(tmp)
            except pl.exceptions.PolarsError as err:  # polars reports some I/O errors (a full disk) as its own
                raise OSError(str(err).strip().splitlines()[0] if str(err).strip() else "write failed") from None
        users = frame["user_id"].n_unique()
        log.info(
            f"predict: wrote {frame.height:,} rows ({users:,} users, top {self.top_k}, mode {self.mode}"
            f"{', seen items excluded' if self.exclude_seen else ''}) to {self.output}"
        )
