"""SeqRecDataModule: samples, leave-one-out split, batches and samplers (docs/data.md).

Conventions owned here (the RecBole layout, docs/data.md): a history is left-aligned and right-padded with item 0 and
timestamp 0; timestamps are ``float32`` of the seconds; a target's own timestamp is never an input.

Memory grows with interactions, never with interactions x L: a split is two int64 arrays, the "end" position of each
sample in the flat interaction arrays and its user. A sample's history is the interactions ``[max(o, end - L), end)``
of its user (who starts at ``o``); the window is gathered per batch, vectorised, in ``SeqRecDataset.__getitems__``.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

import lightning
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from tim4rec_pl.data.loader import ResumableDataLoader
from tim4rec_pl.errors import UserError

if TYPE_CHECKING:
    from tim4rec_pl.data.prepare import PreparedData

log = logging.getLogger("tim4rec_pl")

SampleKind = Literal["target", "window", "next"]
TRAIN_MODES = ("prefix", "all_positions")


def split_ends(
    offsets: np.ndarray, split: str, max_seq_len: int, train_mode: str = "prefix", users: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The samples of one split as (end positions, users), both int64.

    For a user with n interactions at global positions o..o+n-1, position p > o is a target with history
    ``[max(o, p - L), p)``: test p = o+n-1, validation p = o+n-2, training p = o+1..o+n-3.
    ``next`` has end o+n (the whole history, no target). In ``all_positions`` training a sample is a window whose
    targets are ``(max(o, end - L), end]``: each user's training targets are cut into runs of L from the most recent
    backwards, the earliest run possibly shorter. Users too short for a split are left out of it.

    Args:
        offsets: (U + 1,) user u's interactions are ``[offsets[u], offsets[u + 1])``.
        split: train | val | test | next.
        max_seq_len: L, the history length.
        train_mode: prefix | all_positions (train only).
        users: Dense user ids to keep, in this order (default: all users).
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    user = np.arange(len(offsets) - 1, dtype=np.int64) if users is None else np.asarray(users, dtype=np.int64)
    start, n = offsets[user], offsets[user + 1] - offsets[user]
    if split in ("test", "val", "next"):
        back, min_n = {"test": (1, 2), "val": (2, 3), "next": (0, 1)}[split]
        keep = n >= min_n
        return start[keep] + n[keep] - back, user[keep]
    if split != "train":
        raise ValueError(f"unknown split {split!r}")
    targets = np.maximum(n - 3, 0)  # training targets o+1 .. o+n-3
    if train_mode == "prefix":
        count, first, stride = targets, start + 1, 1
    else:  # windows end at o+n-3, o+n-3-L, ...; listed oldest first
        count = -(-targets // max_seq_len)
        first, stride = start + n - 3 - (count - 1) * max_seq_len, max_seq_len
    within = np.arange(int(count.sum()), dtype=np.int64) - np.repeat(np.cumsum(count) - count, count)
    return np.repeat(first, count) + stride * within, np.repeat(user, count)


class SeqRecDataset(Dataset):
    """Samples of one split, served as whole batches by ``__getitems__`` (torch's fetcher calls it).

    A batch is a dict: ``user`` (B,) long; ``item_seq`` (B, L) long; ``item_seq_len`` (B,) long; ``timestamps``
    (B, L) float32; then ``target`` (B,) long (kind ``target``; -1 for kind ``next``) or ``targets`` (B, L) long,
    the next item at every input position, 0 where there is none (kind ``window``).
    """

    def __init__(
        self,
        items: torch.Tensor,
        timestamps: torch.Tensor,
        offsets: torch.Tensor,
        ends: np.ndarray,
        users: np.ndarray,
        max_seq_len: int,
        kind: SampleKind,
    ) -> None:
        if items[-1] != 0 or timestamps[-1] != 0:
            raise ValueError("items and timestamps must end with a padding sentinel 0 at index N")
        self.items = items  # (N + 1,) int64, shared by every split; items[N] = 0 is the padding sentinel
        self.timestamps = timestamps  # (N + 1,) float32, shared; timestamps[N] = 0
        self.offsets = offsets  # (U + 1,) int64, shared
        self.ends = torch.from_numpy(np.ascontiguousarray(ends, dtype=np.int64))  # (S,)
        self.users = torch.from_numpy(np.ascontiguousarray(users, dtype=np.int64))  # (S,)
        self.max_seq_len = max_seq_len
        self.kind = kind
        self._steps = torch.arange(max_seq_len)  # (L,)

    def __len__(self) -> int:
        return len(self.ends)

    def __getitems__(self, indices: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        end, user = self.ends[idx], self.users[idx]  # (B,)
        first = torch.maximum(self.offsets[user], end - self.max_seq_len)  # (B,)
        length = end - first  # (B,)
        pad = self._steps >= length[:, None]  # (B, L)
        sentinel = len(self.items) - 1
        pos = (first[:, None] + self._steps).masked_fill_(pad, sentinel).view(-1)  # (B * L,)
        shape = (len(end), self.max_seq_len)
        batch = {
            "user": user,
            "item_seq": self.items.index_select(0, pos).view(shape),  # (B, L); a flat gather is the fast one
            "item_seq_len": length,
            "timestamps": self.timestamps.index_select(0, pos).view(shape),  # (B, L)
        }
        if self.kind == "target":
            batch["target"] = self.items[end]
        elif self.kind == "next":
            batch["target"] = torch.full_like(end, -1)
        else:  # input j predicts input j + 1; the last valid input predicts the item at `end`
            nxt = (first[:, None] + 1 + self._steps).masked_fill_(pad, sentinel).view(-1)
            batch["targets"] = self.items.index_select(0, nxt).view(shape)  # (B, L)
        return batch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[0] for key, value in self.__getitems__([index]).items()}


def collate_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The dataset already returns whole batches (``__getitems__``): nothing left to collate."""
    return batch


class TrainSampler(DistributedSampler):
    """Shuffles per epoch with a generator seeded by (seed, epoch); shards over ranks like DistributedSampler.

    Works without torch.distributed (pass ``num_replicas``/``rank``). Padding repeats the start of the order so
    every rank gets as many samples (none when ``num_replicas == 1``). ``state_dict`` records the epoch, the seed
    and how many samples of the epoch's order all ranks together have consumed; after ``load_state_dict`` the next
    iteration over that epoch continues the same order. The count is what this sampler has handed out, so it leads
    the training loop by the batches prefetched; a caller that knows the exact number may set ``consumed`` itself.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self._skip = 0  # samples of `self.epoch`'s order to skip at the next iteration (resume)
        self._live: Iterator[int] | None = None  # this rank's indices of the running iteration
        self._live_epoch, self._live_start, self._live_len = -1, 0, 0

    def order(self) -> np.ndarray:
        """The current epoch's permutation of all sample indices, before sharding."""
        return np.random.default_rng([self.seed % 2**64, self.epoch]).permutation(len(self.dataset))

    def __iter__(self) -> Iterator[int]:
        start, self._skip = self._skip, 0
        order = self.order()
        pad = -len(order) % self.num_replicas
        if pad and len(order):
            order = np.concatenate([order, np.resize(order, pad)])
        # a resumed epoch continues the padded order, so even the padding repeats what the whole epoch would have
        own = order[start + self.rank :: self.num_replicas].tolist() if start < len(self.dataset) else []
        self._live, self._live_epoch, self._live_start, self._live_len = iter(own), self.epoch, start, len(own)
        return self._live

    def __len__(self) -> int:
        return math.ceil((len(self.dataset) - self._skip) / self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._skip = 0
        super().set_epoch(epoch)

    @property
    def consumed(self) -> int:
        """Samples of the current epoch's order handed out so far, over all ranks."""
        if self._live is None or self._live_epoch != self.epoch:
            return self._skip
        handed = self._live_len - operator.length_hint(self._live)  # a list iterator knows what it has left
        return min(len(self.dataset), self._live_start + handed * self.num_replicas)

    def state_dict(self) -> dict[str, int]:
        """Epoch, seed and samples of that epoch consumed (over all ranks)."""
        return {"epoch": self.epoch, "seed": self.seed, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue the order of ``state["epoch"]`` after its first ``state["consumed"]`` samples."""
        self.seed, self.epoch, self._skip = int(state["seed"]), int(state["epoch"]), int(state["consumed"])
        self._live = None


class EvalSampler(DistributedSampler):
    """Rank r gets samples r, r + W, r + 2W, ...: every sample exactly once over all ranks, no padding, no repeat."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


class SeqRecDataModule(lightning.LightningDataModule):
    """Interactions prepared as in docs/data.md, served in the RecBole layout with full-ranking leave-one-out splits.

    The prepared data loads on first use of ``prepared`` (or ``num_items``, ``stats`` ...), so the CLI can read
    ``num_items`` right after construction; ``prepare_data`` loads it too (Lightning runs that on local rank 0).

    Args:
        dataset: Registry name (ml-100k, ml-1m, amazon-beauty, kuairand, steam); downloaded when missing.
        path: A file of interactions to read instead of a registry name.
        format: File format: auto | atomic | ml-1m | ml-100k | amazon | kuairand | csv | tsv | parquet.
        user_field: User column name (default per format; atomic: user_id).
        item_field: Item column name (default per format; atomic: item_id).
        time_field: Timestamp column name (default per format; atomic: timestamp).
        time_unit: Timestamp unit for csv/tsv/parquet: s | ms | iso | auto (numbers all above 1e11: ms, all below: s,
            both: an error).
        separator: Column separator for csv/tsv files (default per format).
        drop_null_ids: Drop rows with a null user or item id instead of failing.
        data_dir: Root of downloads and prepared caches.
        max_seq_len: L, the number of most recent interactions a history holds.
        min_user_inter: k-core: keep users with at least this many interactions.
        min_item_inter: k-core: keep items with at least this many interactions.
        drop_duplicates: Drop exact (user, item, timestamp) duplicates (RecBole keeps them).
        time_sort: Sort within a user on float32-rounded timestamps (faithful, ties keep file order) or exact ones.
        train_mode: prefix: one sample per training target (RecBole); all_positions: windows of L targets each.
        batch_size: Training batch size.
        eval_batch_size: Validation, test and predict batch size.
        num_workers: DataLoader worker processes (0: load in the main process).
        pin_memory: Pin batches in page-locked memory (faster host-to-GPU copies).
        seed: Seed of the training shuffle (default: torch.initial_seed() at setup, i.e. seed_everything's).
    """

    def __init__(
        self,
        dataset: str | None = "ml-100k",
        path: str | None = None,
        format: Literal["auto", "atomic", "ml-1m", "ml-100k", "amazon", "kuairand", "csv", "tsv", "parquet"] = "auto",
        user_field: str | None = None,
        item_field: str | None = None,
        time_field: str | None = None,
        time_unit: Literal["s", "ms", "iso", "auto"] = "auto",
        separator: str | None = None,
        drop_null_ids: bool = False,
        data_dir: str = "data",
        max_seq_len: int = 50,
        min_user_inter: int = 5,
        min_item_inter: int = 5,
        drop_duplicates: bool = False,
        time_sort: Literal["float32", "exact"] = "float32",
        train_mode: Literal["prefix", "all_positions"] = "prefix",
        batch_size: int = 2048,
        eval_batch_size: int = 2048,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        for name, value, low in (("max_seq_len", max_seq_len, 1), ("batch_size", batch_size, 1),
                                 ("eval_batch_size", eval_batch_size, 1), ("num_workers", num_workers, 0)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UserError(f"data: {name} must be an integer >= {low}, got {value!r}; set data.{name}")
        if train_mode not in TRAIN_MODES:
            raise UserError(f"data: unknown train_mode {train_mode!r}; use one of {', '.join(TRAIN_MODES)}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise UserError(f"data: seed must be a non-negative integer or null, got {seed!r}; fix data.seed")
        self.save_hyperparameters()
        self.max_seq_len = max_seq_len
        self.train_mode = train_mode
        self.train_sampler: TrainSampler | None = None  # the live training sampler (for resume state)
        self._prepared: PreparedData | None = None
        self._arrays: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._datasets: dict[str, SeqRecDataset] = {}
        self._seed: int | None = None
        self._stats_logged = False
        # What `predict_dataloader` serves (see `set_predict_request`).
        self._predict_split: Literal["next", "test"] = "next"
        self._predict_users: list[int] | None = None  # dense user ids, in output order (None: every user)

    @classmethod
    def from_prepared(cls, prepared: PreparedData, **kwargs: Any) -> SeqRecDataModule:
        """A data module over already prepared data (tests, notebooks); ``kwargs`` are the constructor's."""
        module = cls(**{"dataset": None, **kwargs})
        module._prepared = prepared
        return module

    # -- the prepared data -------------------------------------------------------------------------------------

    @property
    def prepared(self) -> PreparedData:
        """The interactions after the protocol; loaded (or prepared and cached) on first access."""
        if self._prepared is None:
            from tim4rec_pl.data.prepare import ProtocolConfig, SourceConfig, load_or_prepare

            hp = self.hparams
            if hp.dataset is None and hp.path is None:
                raise UserError("data: no input; set data.dataset to a registry name (e.g. ml-100k) or data.path")
            source = SourceConfig(
                dataset=hp.dataset, path=hp.path, format=hp.format, user_field=hp.user_field,
                item_field=hp.item_field, time_field=hp.time_field, time_unit=hp.time_unit,
                separator=hp.separator, drop_null_ids=hp.drop_null_ids,
            )  # fmt: skip
            protocol = ProtocolConfig(
                min_user_inter=hp.min_user_inter, min_item_inter=hp.min_item_inter,
                drop_duplicates=hp.drop_duplicates, time_sort=hp.time_sort,
            )  # fmt: skip
            self._prepared = load_or_prepare(source, protocol, data_dir=hp.data_dir, progress=rank_zero_only.rank == 0)
        return self._prepared

    @property
    def num_items(self) -> int:
        """Item ids including the padding id 0 (the size of the embedding table)."""
        return self.prepared.num_items

    @property
    def num_users(self) -> int:
        return self.prepared.num_users

    @property
    def stats(self) -> dict:
        return self.prepared.stats

    @property
    def manifest(self) -> dict:
        return self.prepared.manifest

    @property
    def user_tokens(self) -> list[str]:
        return self.prepared.user_tokens

    @property
    def item_tokens(self) -> list[str]:
        return self.prepared.item_tokens

    @property
    def sample_counts(self) -> dict[str, int]:
        """Samples per split (``train`` counts windows in all_positions mode) and training targets."""
        n = np.diff(np.asarray(self.prepared.offsets, dtype=np.int64))
        targets = np.maximum(n - 3, 0)
        windows = -(-targets // self.max_seq_len)
        return {
            "train": int(targets.sum() if self.train_mode == "prefix" else windows.sum()),
            "train_targets": int(targets.sum()),
            "val": int((n >= 3).sum()),
            "test": int((n >= 2).sum()),
        }

    # -- Lightning hooks ---------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        _ = self.prepared

    def setup(self, stage: str | None = None) -> None:
        if self._seed is None:
            self._seed = self._resolve_seed()
        self._log_stats()

    def train_dataloader(self) -> DataLoader:
        dataset = self._dataset("train")
        if len(dataset) == 0:
            raise UserError("data: no training samples (every user has < 4 interactions); lower min_user_inter")
        world, rank = self._world()
        if self._seed is None:
            self._seed = self._resolve_seed()
        self.train_sampler = TrainSampler(dataset, num_replicas=world, rank=rank, seed=self._seed)
        # Stateful: Lightning checkpoints the position within the epoch and resumes the same order (resilience.py).
        return self._loader(dataset, self.train_sampler, self.hparams.batch_size, resumable=True)

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader(self.eval_dataset("val"))

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader(self.eval_dataset("test"))

    def set_predict_request(self, split: Literal["next", "test"], users: list[int] | None = None) -> None:
        """What `predict_dataloader` serves: the window before each user's next interaction ("next") or before the
        held-out test item ("test"), for `users` (dense ids, in output order) or every user (None)."""
        self._predict_split, self._predict_users = split, users

    def predict_dataloader(self) -> DataLoader:
        return self.eval_dataloader(self.eval_dataset(self._predict_split, self._predict_users))

    # -- building blocks for the lead's predict modes ----------------------------------------------------------

    def eval_dataset(self, split: Literal["val", "test", "next"], users: list[int] | None = None) -> SeqRecDataset:
        """Validation or test samples, or (``next``) every user's whole recent history with target -1.

        Args:
            split: val | test | next.
            users: Dense user ids to serve, in this order (default: all). Users without that split are skipped.
        """
        if split not in ("val", "test", "next"):
            raise UserError(f"data: unknown evaluation split {split!r}; use val, test or next")
        if users is None:
            return self._dataset(split)
        users_arr = np.asarray(users, dtype=np.int64).reshape(-1)
        bad = users_arr[(users_arr < 0) | (users_arr >= self.num_users)]
        if len(bad):
            raise UserError(f"data: user id {int(bad[0])} out of range [0, {self.num_users}); use dense user ids")
        return self._make_dataset(split, users_arr)

    def eval_dataloader(self, dataset: SeqRecDataset) -> DataLoader:
        """A loader over ``dataset`` that gives every sample to exactly one rank, in order, without padding."""
        world, rank = self._world()
        return self._loader(dataset, EvalSampler(dataset, num_replicas=world, rank=rank), self.hparams.eval_batch_size)

    # -- internals ---------------------------------------------------------------------------------------------

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (1, 0) if trainer is None else (trainer.world_size, trainer.global_rank)

    def _resolve_seed(self) -> int:
        if self.hparams.seed is not None:
            return int(self.hparams.seed)
        seed = torch.initial_seed()
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:  # every rank must shuffle alike
            seed = trainer.strategy.broadcast(seed, src=0)
        return int(seed)

    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._arrays is None:
            data = self.prepared
            items = np.zeros(data.num_interactions + 1, dtype=np.int64)  # (N + 1,): a padding sentinel at N
            times = np.zeros(data.num_interactions + 1, dtype=np.float32)  # (N + 1,): float32 of the seconds
            items[:-1], times[:-1] = data.items, data.timestamps
            offsets = np.ascontiguousarray(data.offsets, dtype=np.int64)  # (U + 1,)
            self._arrays = (torch.from_numpy(items), torch.from_numpy(times), torch.from_numpy(offsets))
        return self._arrays

    def _make_dataset(self, split: str, users: np.ndarray | None = None) -> SeqRecDataset:
        items, times, offsets = self._tensors()
        ends, user = split_ends(offsets.numpy(), split, self.max_seq_len, self.train_mode, users)
        kind = "window" if split == "train" and self.train_mode != "prefix" else "target"
        kind = "next" if split == "next" else kind
        return SeqRecDataset(items, times, offsets, ends, user, self.max_seq_len, kind)

    def _dataset(self, split: str) -> SeqRecDataset:
        if split not in self._datasets:
            self._datasets[split] = self._make_dataset(split)
        return self._datasets[split]

    def _loader(
        self, dataset: SeqRecDataset, sampler: DistributedSampler, batch_size: int, resumable: bool = False
    ) -> DataLoader:
        workers = self.hparams.num_workers
        loader_class, extra = (ResumableDataLoader, {"trainer": self.trainer}) if resumable else (DataLoader, {})
        return loader_class(
            dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_batch, num_workers=workers,
            pin_memory=self.hparams.pin_memory, persistent_workers=workers > 0, drop_last=False, **extra,
        )  # fmt: skip

    def _log_stats(self) -> None:
        if self._stats_logged:
            return
        self._stats_logged = True
        if rank_zero_only.rank != 0:
            return
        data, counts = self.prepared, self.sample_counts
        windows = f" ({counts['train_targets']:,} targets)" if self.train_mode != "prefix" else ""
        log.info(
            f"data: {data.num_users:,} users, {data.num_items - 1:,} items, {data.num_interactions:,} interactions "
            f"after filtering; samples: train {counts['train']:,}{windows} [{self.train_mode}], "
            f"val {counts['val']:,}, test {counts['test']:,}; max_seq_len {self.max_seq_len}"
        )
