"""SeqRecDataModule against hand-computed windows, targets and splits (docs/data.md), and its samplers."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import lightning
import numpy as np
import pytest
import torch

import tim4rec_pl.data.prepare as prepare
from tim4rec_pl.data.datamodule import EvalSampler, SeqRecDataModule, TrainSampler
from tim4rec_pl.data.prepare import PreparedData
from tim4rec_pl.errors import UserError

# Three users, protocol order. Global positions: user 0 -> 0..5, user 1 -> 6..9, user 2 -> 10..17.
SEQS = [[5, 3, 7, 2, 9, 4], [1, 2, 3, 1], [8, 6, 5, 4, 3, 2, 1, 9]]
# Unix seconds with a fraction: float32 rounds them to multiples of 128, so exact and float32 values differ.
TIMES = [1_600_000_000.3 + 1000.0 * p for p in range(18)]


def make_prepared(seqs: list[list[int]] = SEQS, times: list[float] | None = None, num_items: int = 10) -> PreparedData:
    lengths = [len(s) for s in seqs]
    total = sum(lengths)
    return PreparedData(
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        items=np.array([i for s in seqs for i in s], dtype=np.int64),
        timestamps=np.array(times if times is not None else TIMES[:total], dtype=np.float64),
        user_tokens=[f"u{u}" for u in range(len(seqs))],
        item_tokens=["[PAD]"] + [f"i{i}" for i in range(1, num_items)],
        manifest={"stats": {"users": len(seqs)}},
    )


def unique_prepared(lengths: list[int]) -> PreparedData:
    """Item id = global position + 1, so a batch tells exactly which positions it holds."""
    total = sum(lengths)
    seqs, start = [], 1
    for n in lengths:
        seqs.append(list(range(start, start + n)))
        start += n
    return make_prepared(seqs, times=[1e9 + 60.0 * p for p in range(total)], num_items=total + 1)


def all_samples(dataset) -> dict[str, torch.Tensor]:
    return dataset.__getitems__(list(range(len(dataset))))


def rows(batch: dict[str, torch.Tensor], key: str = "target") -> list[tuple]:
    """(user, history without padding, item_seq_len, target) per sample."""
    return [
        (int(u), batch["item_seq"][b, : int(n)].tolist(), int(n), batch[key][b].tolist())
        for b, (u, n) in enumerate(zip(batch["user"], batch["item_seq_len"]))
    ]


def test_num_items_and_metadata_readable_right_after_init(monkeypatch, tmp_path):
    calls = []

    def fake_load(source, protocol, data_dir="data", progress=True):
        calls.append((source, protocol, data_dir))
        return make_prepared()

    monkeypatch.setattr(prepare, "load_or_prepare", fake_load)
    dm = SeqRecDataModule(dataset="ml-100k", data_dir=str(tmp_path), min_user_inter=7, time_sort="exact")
    assert calls == []  # lazy: nothing read at construction
    assert dm.num_items == 10 and dm.num_users == 3
    assert dm.item_tokens[0] == "[PAD]" and dm.user_tokens == ["u0", "u1", "u2"]
    assert dm.stats == {"users": 3} and dm.manifest["stats"]["users"] == 3
    dm.prepare_data()
    dm.setup("fit")
    assert len(calls) == 1  # loaded once, kept
    source, protocol, data_dir = calls[0]
    assert source.dataset == "ml-100k" and source.path is None and data_dir == str(tmp_path)
    assert protocol.min_user_inter == 7 and protocol.min_item_inter == 5 and protocol.time_sort == "exact"
    assert dm.max_seq_len == 50 and dm.hparams.batch_size == 2048


def test_prefix_training_windows_hand_computed():
    dm = SeqRecDataModule.from_prepared(make_prepared(), max_seq_len=3)
    batch = all_samples(dm.train_dataloader().dataset)
    assert rows(batch) == [
        (0, [5], 1, 3),
        (0, [5, 3], 2, 7),
        (0, [5, 3, 7], 3, 2),
        (1, [1], 1, 2),
        (2, [8], 1, 6),
        (2, [8, 6], 2, 5),
        (2, [8, 6, 5], 3, 4),
        (2, [6, 5, 4], 3, 3),  # truncated to the most recent 3
        (2, [5, 4, 3], 3, 2),
    ]
    # Left-aligned, right-padded with item 0.
    assert batch["item_seq"][0].tolist() == [5, 0, 0] and batch["item_seq"][1].tolist() == [5, 3, 0]
    assert batch["item_seq"].shape == (9, 3) and batch["item_seq"].dtype == torch.long
    assert batch["target"].dtype == torch.long and batch["user"].dtype == torch.long
    assert batch["item_seq_len"].dtype == torch.long


def test_timestamps_are_float32_seconds_with_zero_padding():
    dm = SeqRecDataModule.from_prepared(make_prepared(), max_seq_len=3)
    batch = all_samples(dm.train_dataloader().dataset)
    assert batch["timestamps"].dtype == torch.float32
    f32 = [np.float32(t) for t in TIMES]
    assert float(f32[0]) != TIMES[0]  # the fixture really exercises the rounding
    assert batch["timestamps"][1].tolist() == [f32[0], f32[1], 0.0]  # user 0, target at position 2
    assert batch["timestamps"][7].tolist() == [f32[11], f32[12], f32[13]]  # user 2, target at position 14


def test_val_test_and_next_hand_computed():
    dm = SeqRecDataModule.from_prepared(make_prepared(), max_seq_len=3)
    val, test = all_samples(dm.eval_dataset("val")), all_samples(dm.eval_dataset("test"))
    assert rows(val) == [(0, [3, 7, 2], 3, 9), (1, [1, 2], 2, 3), (2, [4, 3, 2], 3, 1)]
    assert rows(test) == [(0, [7, 2, 9], 3, 4), (1, [1, 2, 3], 3, 1), (2, [3, 2, 1], 3, 9)]
    nxt = all_samples(dm.eval_dataset("next"))
    assert rows(nxt) == [(0, [2, 9, 4], 3, -1), (1, [2, 3, 1], 3, -1), (2, [2, 1, 9], 3, -1)]
    assert nxt["timestamps"][1].tolist() == [np.float32(TIMES[p]) for p in (7, 8, 9)]
    sub = all_samples(dm.eval_dataset("test", users=[2, 0]))
    assert rows(sub) == [(2, [3, 2, 1], 3, 9), (0, [7, 2, 9], 3, 4)]
    # Loaders serve the same samples in order; each batch carries `user`.
    loaded = [b for b in dm.val_dataloader()]
    assert len(loaded) == 1 and loaded[0]["target"].tolist() == [9, 3, 1] and loaded[0]["user"].tolist() == [0, 1, 2]
    assert [b["target"].tolist() for b in dm.test_dataloader()] == [[4, 1, 9]]
    assert [b["target"].tolist() for b in dm.predict_dataloader()] == [[-1, -1, -1]]
    # Validation and test do not depend on the training mode.
    windows = SeqRecDataModule.from_prepared(make_prepared(), max_seq_len=3, train_mode="all_positions")
    assert rows(all_samples(windows.eval_dataset("val"))) == rows(val)
    assert rows(all_samples(windows.eval_dataset("test"))) == rows(test)


def test_sample_counts_per_user():
    lengths = [5, 9, 6, 20, 5]
    dm = SeqRecDataModule.from_prepared(unique_prepared(lengths), max_seq_len=4)
    assert len(dm.train_dataloader().dataset) == sum(n - 3 for n in lengths) == 30
    assert len(dm.eval_dataset("val")) == len(dm.eval_dataset("test")) == len(dm.eval_dataset("next")) == 5
    assert dm.sample_counts == {"train": 30, "train_targets": 30, "val": 5, "test": 5}
    users = all_samples(dm.train_dataloader().dataset)["user"]
    assert torch.bincount(users).tolist() == [n - 3 for n in lengths]


def test_short_users_get_only_the_splits_they_can_fill():
    dm = SeqRecDataModule.from_prepared(make_prepared([[1, 2], [3, 4, 5], [6, 7, 8, 9]]), max_seq_len=5)
    assert rows(all_samples(dm.eval_dataset("test"))) == [(0, [1], 1, 2), (1, [3, 4], 2, 5), (2, [6, 7, 8], 3, 9)]
    assert rows(all_samples(dm.eval_dataset("val"))) == [(1, [3], 1, 4), (2, [6, 7], 2, 8)]
    assert rows(all_samples(dm.train_dataloader().dataset)) == [(2, [6], 1, 7)]


def test_all_positions_windows_hand_computed():
    dm = SeqRecDataModule.from_prepared(make_prepared(), max_seq_len=3, train_mode="all_positions")
    batch = all_samples(dm.train_dataloader().dataset)
    assert "target" not in batch and batch["targets"].shape == (4, 3) and batch["targets"].dtype == torch.long
    got = sorted(rows(batch, "targets"))
    assert got == [
        (0, [5, 3, 7], 3, [3, 7, 2]),  # training region 5 3 7 2 -> one window of L + 1 items
        (1, [1], 1, [2, 0, 0]),  # region 1 2
        (2, [5, 4, 3], 3, [4, 3, 2]),  # region 8 6 5 4 3 2: the last window holds the most recent L + 1 items
        (2, [8, 6], 2, [6, 5, 0]),  # the earlier, shorter window ends where the next one starts
    ]
    for b in range(4):  # padding: item 0, timestamp 0, target 0
        n = int(batch["item_seq_len"][b])
        assert batch["item_seq"][b, n:].eq(0).all() and batch["timestamps"][b, n:].eq(0).all()
    assert dm.sample_counts == {"train": 4, "train_targets": 9, "val": 3, "test": 3}


@pytest.mark.parametrize("train_mode", ["prefix", "all_positions"])
@pytest.mark.parametrize("max_seq_len", [1, 4, 50])
def test_each_training_target_exactly_once_per_epoch(train_mode, max_seq_len):
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 30, size=25).tolist()
    data = unique_prepared(lengths)
    dm = SeqRecDataModule.from_prepared(data, max_seq_len=max_seq_len, train_mode=train_mode, batch_size=7, seed=3)
    expected = sorted(p for o, n in zip(data.offsets[:-1], lengths) for p in range(o + 1, o + n - 2))
    loader = dm.train_dataloader()
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        seen = []
        for batch in loader:
            assert batch["item_seq"].shape[1] == max_seq_len
            for b in range(len(batch["user"])):
                u, n = int(batch["user"][b]), int(batch["item_seq_len"][b])
                hist = batch["item_seq"][b, :n].tolist()
                first = hist[0] - 1  # the history is consecutive positions of user u, at most L of them
                assert hist == list(range(first + 1, first + n + 1)) and data.offsets[u] <= first
                assert batch["item_seq"][b, n:].eq(0).all()
                if train_mode == "prefix":
                    end = first + n  # the target follows the history
                    assert int(batch["target"][b]) == end + 1
                    assert n == min(max_seq_len, end - int(data.offsets[u]))
                    seen.append(end)
                else:
                    targets = batch["targets"][b]
                    assert targets[:n].tolist() == [p + 2 for p in range(first, first + n)]
                    assert targets[n:].eq(0).all()
                    seen.extend(t - 1 for t in targets[:n].tolist())
        assert sorted(seen) == expected


@pytest.mark.parametrize("size", [0, 1, 7, 10, 11])
def test_eval_sampler_partitions_exactly(size):
    dataset = list(range(size))
    for world in (1, 2, 3):
        parts = [list(EvalSampler(dataset, num_replicas=world, rank=r)) for r in range(world)]
        for r, part in enumerate(parts):
            assert part == list(range(r, size, world))
            assert len(EvalSampler(dataset, num_replicas=world, rank=r)) == len(part)
        assert sorted(i for part in parts for i in part) == dataset


def test_eval_loaders_give_every_user_to_one_rank():
    lengths = [5] * 7
    dm = SeqRecDataModule.from_prepared(unique_prepared(lengths), max_seq_len=3, eval_batch_size=2)
    for world in (2, 3):
        users = []
        for rank in range(world):
            dm.trainer = SimpleNamespace(world_size=world, global_rank=rank)
            loader = dm.val_dataloader()
            assert isinstance(loader.sampler, EvalSampler)
            users += [u for batch in loader for u in batch["user"].tolist()]
        assert sorted(users) == list(range(7))


def test_train_sampler_seeded_per_epoch_and_sharded():
    dataset = list(range(23))
    a, b = TrainSampler(dataset, seed=5), TrainSampler(dataset, seed=5)
    assert list(a) == list(b) and sorted(a) == dataset
    epoch0 = list(a)
    a.set_epoch(1)
    assert list(a) != epoch0 and sorted(a) == dataset
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(TrainSampler(dataset, seed=6)) != epoch0
    for world in (2, 3):  # like DistributedSampler: equal shares, padded by repeating the start of the order
        shards = [TrainSampler(dataset, num_replicas=world, rank=r, seed=5) for r in range(world)]
        lists = [list(s) for s in shards]
        assert all(len(x) == len(s) == -(-23 // world) for x, s in zip(lists, shards))
        flat = [i for row in zip(*lists) for i in row]
        assert flat[:23] == epoch0 and flat[23:] == epoch0[: len(flat) - 23]


def test_train_sampler_state_dict_resumes_the_same_order():
    dataset = list(range(20))
    for world in (1, 2):
        samplers = [TrainSampler(dataset, num_replicas=world, rank=r, seed=9) for r in range(world)]
        full = []
        for s in samplers:
            s.set_epoch(2)
            full.append(list(s))
        its = [iter(s) for s in samplers]
        for it in its:  # each rank consumes 3 samples
            for _ in range(3):
                next(it)
        state = samplers[0].state_dict()
        assert state == {"epoch": 2, "seed": 9, "consumed": 3 * world}
        resumed = [TrainSampler(dataset, num_replicas=world, rank=r, seed=0) for r in range(world)]
        rest = []
        for r, s in enumerate(resumed):
            s.load_state_dict(state)
            s.set_epoch(2)  # Lightning calls this at the start of the resumed epoch
            assert len(s) == -(-(20 - 3 * world) // world)
            rest.append(list(s))
            assert rest[r][: len(full[r]) - 3] == full[r][3:]
            assert s.state_dict()["consumed"] == 20
            s.set_epoch(3)
            assert s.state_dict()["consumed"] == 0 and len(s) == -(-20 // world)
        done = {i for part in full for i in part[:3]} | {i for part in rest for i in part}
        assert done == set(dataset)


def test_default_seed_is_captured_at_setup():
    data = unique_prepared([8] * 6)
    torch.manual_seed(123)
    dm = SeqRecDataModule.from_prepared(data, max_seq_len=4)
    dm.setup("fit")
    torch.manual_seed(999)
    sampler = dm.train_dataloader().sampler
    assert isinstance(sampler, TrainSampler) and sampler.seed == 123
    assert list(sampler) == list(TrainSampler(dm.train_dataloader().dataset, seed=123))
    explicit = SeqRecDataModule.from_prepared(data, max_seq_len=4, seed=42)
    explicit.setup("fit")
    assert explicit.train_dataloader().sampler.seed == 42


@pytest.mark.parametrize("train_mode", ["prefix", "all_positions"])
def test_memory_does_not_grow_with_max_seq_len(train_mode):
    data = unique_prepared([40] * 30)  # 1,200 interactions, 1,110 training targets
    owned = {}
    for length in (2, 200):
        dm = SeqRecDataModule.from_prepared(data, max_seq_len=length, train_mode=train_mode)
        ds = dm.train_dataloader().dataset
        arrays = [v for v in vars(ds).values() if isinstance(v, (torch.Tensor, np.ndarray))]
        assert arrays and all(a.ndim == 1 for a in arrays)  # no (samples x L) matrix
        assert all(a.shape[0] <= max(data.num_interactions + 1, len(ds), length) for a in arrays)
        assert ds.items.data_ptr() == dm.eval_dataset("val").items.data_ptr()  # splits share the flat arrays
        owned[length] = sum(a.numel() * a.element_size() if isinstance(a, torch.Tensor) else a.nbytes for a in arrays)
    assert owned[200] <= owned[2] + 200 * 8


def test_statistics_logged_once(caplog):
    dm = SeqRecDataModule.from_prepared(make_prepared(), max_seq_len=3)
    with caplog.at_level(logging.INFO, logger="tim4rec_pl"):
        dm.setup("fit")
        dm.setup("test")
    records = [r for r in caplog.records if r.name == "tim4rec_pl"]
    assert len(records) == 1
    msg = records[0].getMessage()
    assert "3 users" in msg and "9 items" in msg and "18 interactions" in msg
    assert "train 9" in msg and "val 3" in msg and "test 3" in msg


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_seq_len": 0},
        {"batch_size": 0},
        {"eval_batch_size": -1},
        {"num_workers": -1},
        {"train_mode": "windows"},
        {"seed": -3},
        {"max_seq_len": 2.5},
    ],
)
def test_bad_arguments_raise_user_error(kwargs):
    with pytest.raises(UserError):
        SeqRecDataModule(**kwargs)


def test_bad_inputs_raise_user_error():
    with pytest.raises(UserError, match="dataset"):
        _ = SeqRecDataModule(dataset=None).num_items
    dm = SeqRecDataModule.from_prepared(make_prepared(), max_seq_len=3)
    with pytest.raises(UserError, match="out of range"):
        dm.eval_dataset("test", users=[0, 3])
    with pytest.raises(UserError, match="split"):
        dm.eval_dataset("train")
    short = SeqRecDataModule.from_prepared(make_prepared([[1, 2, 3], [4, 5]]), max_seq_len=3)
    with pytest.raises(UserError, match="no training samples"):
        short.train_dataloader()


def test_worker_processes_serve_the_same_batches():
    data = unique_prepared([12] * 10)
    ref = SeqRecDataModule.from_prepared(data, max_seq_len=5, batch_size=16, seed=1)
    par = SeqRecDataModule.from_prepared(data, max_seq_len=5, batch_size=16, seed=1, num_workers=1)
    loader = par.train_dataloader()
    assert loader.persistent_workers
    for got, want in zip(loader, ref.train_dataloader(), strict=True):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


class _Recorder(lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.train_targets: list[list[int]] = []
        self.val_users: list[int] = []

    def on_train_epoch_start(self) -> None:
        self.train_targets.append([])

    def training_step(self, batch, batch_idx):
        self.train_targets[-1] += batch["target"].tolist()
        return (self.w * batch["item_seq_len"].float()).mean()

    def validation_step(self, batch, batch_idx):
        self.val_users += batch["user"].tolist()

    def predict_step(self, batch, batch_idx):
        return batch["user"], batch["target"]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_keeps_samplers_sets_epochs_and_predicts():
    lengths = [6, 9, 5, 7, 12, 5, 8]
    data = unique_prepared(lengths)
    dm = SeqRecDataModule.from_prepared(data, max_seq_len=4, batch_size=5, eval_batch_size=3)
    model = _Recorder()
    trainer = lightning.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    lightning.seed_everything(11, verbose=False)
    trainer.fit(model, datamodule=dm)
    assert isinstance(trainer.train_dataloader.sampler, TrainSampler) and trainer.train_dataloader.sampler.seed == 11
    expected = sorted(p + 1 for o, n in zip(data.offsets[:-1], lengths) for p in range(o + 1, o + n - 2))
    first, second = model.train_targets
    assert sorted(first) == sorted(second) == expected and first != second  # set_epoch reshuffled
    assert sorted(model.val_users) == sorted(list(range(7)) * 2)
    out = trainer.predict(model, datamodule=dm)
    assert torch.cat([u for u, _ in out]).tolist() == list(range(7))
    assert torch.cat([t for _, t in out]).eq(-1).all()


def test_end_to_end_through_load_or_prepare(tmp_path):
    # 6 users x 6 items, every pair once: 5-core keeps everything. User k sees item (k + j) % 6 at time 1e9 + 300 j.
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for k in range(6):
        for j in range(6):
            lines.append(f"u{k}\tit{(k + j) % 6}\t3\t{1_000_000_000 + 300 * j + k}")
    path = tmp_path / "tiny.inter"
    path.write_text("\n".join(lines) + "\n")
    dm = SeqRecDataModule(
        dataset=None, path=str(path), format="atomic", data_dir=str(tmp_path / "data"), max_seq_len=4, batch_size=4
    )
    assert dm.num_items == 7 and dm.num_users == 6
    assert dm.sample_counts == {"train": 18, "train_targets": 18, "val": 6, "test": 6}
    dm.setup("fit")
    test = all_samples(dm.eval_dataset("test"))
    for b in range(6):
        token = dm.user_tokens[int(test["user"][b])]
        k = int(token[1:])
        assert dm.item_tokens[int(test["target"][b])] == f"it{(k + 5) % 6}"
        assert [dm.item_tokens[i] for i in test["item_seq"][b].tolist()] == [f"it{(k + j) % 6}" for j in range(1, 5)]
        assert test["timestamps"][b].tolist() == [np.float32(1_000_000_000 + 300 * j + k) for j in range(1, 5)]
    assert sum(len(batch["user"]) for batch in dm.train_dataloader()) == 18
