"""Fault tolerance: a SIGTERM mid-epoch writes an atomic checkpoint and exits 143 with one line; `fit --ckpt_path last`
then ends exactly where an uninterrupted run ends (weights, optimiser, callbacks, metrics). Also: SIGINT, a
non-finite loss, incompatible and unsafe checkpoints, RNG states and the stateful training loader in isolation."""

from __future__ import annotations

import csv
import io
import math
import os
import pickle
import random
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import finish, load, run_in_process, start_cli, write_fixture, write_run_config
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from tim4rec_pl import __version__
from tim4rec_pl.data.datamodule import SeqRecDataModule, TrainSampler
from tim4rec_pl.data.loader import ResumableDataLoader
from tim4rec_pl.errors import UserError
from tim4rec_pl.resilience import (
    Interrupted,
    describe_interrupt,
    rng_state,
    save_checkpoint_atomically,
    set_rng_state,
)

TESTS = Path(__file__).resolve().parent
STEPS_PER_EPOCH = 16  # the fixture: 487 training samples, batch 32
SIGNAL_AT_STEP = 20  # epoch 1, after its 4th batch


def val_rows(run_dir: Path) -> list[dict[str, str]]:
    rows = []
    for metrics in sorted((run_dir / "csv").rglob("metrics.csv")):
        with metrics.open() as f:
            rows += [r for r in csv.DictReader(f) if r.get("val/ndcg@10")]
    return rows


def read_test_metrics(run_dir: Path) -> dict[str, float]:
    found: dict[str, float] = {}
    for metrics in sorted((run_dir / "csv").rglob("metrics.csv")):
        with metrics.open() as f:
            for row in csv.DictReader(f):
                found.update({k: float(v) for k, v in row.items() if k.startswith("test/") and v})
    return found


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one intra-op thread


@pytest.fixture(autouse=True)
def _quiet_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr(sys, "argv", ["tim4rec-pl"])


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, one_torch_thread):
    """An uninterrupted 2-epoch fit, and the same fit stopped by SIGTERM at step 20 then resumed in this process."""
    tmp = tmp_path_factory.mktemp("resilience")
    data = write_fixture(tmp / "tiny.inter")
    ref_cfg = write_run_config(tmp / "ref", data, tmp / "data")
    int_cfg = write_run_config(tmp / "int", data, tmp / "data")
    SeqRecDataModule(dataset=None, path=str(data), data_dir=str(tmp / "data")).prepare_data()  # shared cache
    # both fits side by side (2 cores)
    ref = start_cli("fit", "--config", str(ref_cfg), cwd=tmp)
    stop = start_cli(
        "fit", "--config", str(int_cfg), "--trainer.callbacks+=conftest.SignalAfterSteps", cwd=tmp,
        TIM4REC_TEST_SIGNAL_AFTER_STEPS=str(SIGNAL_AT_STEP),
    )  # fmt: skip
    ref, stop = finish(ref), finish(stop)
    assert ref.returncode == 0, ref.stderr[-3000:]
    ckpt_dir = tmp / "int" / "checkpoints"
    interrupt_ckpt = ckpt_dir / "last.ckpt"
    snapshot = (interrupt_ckpt.read_bytes() if interrupt_ckpt.is_file() else b"", sorted(os.listdir(ckpt_dir)))

    loads: list[object] = []
    real_load = torch.load

    def spy(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "load", spy)
        mp.setattr(sys, "argv", ["tim4rec-pl"])
        resume_code = run_in_process("fit", "--config", str(int_cfg), "--ckpt_path", "last")
    return SimpleNamespace(tmp=tmp, ref_cfg=ref_cfg, int_cfg=int_cfg, ref=ref, stop=stop, snapshot=snapshot,
                           resume_code=resume_code, loads=loads)  # fmt: skip


def test_sigterm_exits_128_plus_signal_with_one_line(interrupted):
    stop = interrupted.stop
    assert stop.returncode == 128 + signal.SIGTERM, stop.stderr[-3000:]
    assert "Traceback" not in stop.stderr
    final = [line for line in stop.stderr.splitlines() if line.startswith("tim4rec-pl: stopped")]
    assert len(final) == 1, stop.stderr[-3000:]
    ckpt = interrupted.tmp / "int" / "checkpoints" / "last.ckpt"
    assert f"at epoch 1, step {SIGNAL_AT_STEP}" in final[0]
    assert f"checkpoint: {ckpt}" in final[0]
    assert final[0].endswith(f"resume with: tim4rec-pl fit --config {interrupted.int_cfg} "
                             f"--trainer.callbacks+=conftest.SignalAfterSteps --ckpt_path last")  # fmt: skip


def test_interrupt_checkpoint_is_complete_safe_and_atomic(interrupted):
    data, listing = interrupted.snapshot
    assert listing == ["best.ckpt", "last.ckpt"]  # the temporary file was renamed into place, nothing left over
    ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)  # safe loading works
    assert ckpt["global_step"] == SIGNAL_AT_STEP and ckpt["epoch"] == 1
    loop = ckpt["loops"]["fit_loop"]
    assert loop["epoch_loop.batch_progress"]["current"]["completed"] == SIGNAL_AT_STEP - STEPS_PER_EPOCH
    # the data order: epoch 1 of seed 7, the first 4 batches of 32 consumed
    sampler = loop["state_dict"]["combined_loader"][0]["sampler"]
    assert sampler == {"epoch": 1, "seed": 7, "consumed": (SIGNAL_AT_STEP - STEPS_PER_EPOCH) * 32}
    assert ckpt["optimizer_states"][0]["state"]  # Adam moments
    callbacks = ckpt["callbacks"]
    assert set(callbacks["FaultTolerance"]["rng"]) >= {"torch", "numpy", "python"}
    assert any(k.startswith("EarlyStopping") for k in callbacks) and any(
        k.startswith("ModelCheckpoint") for k in callbacks
    )
    meta = ckpt["tim4rec_pl"]
    assert meta["version"] == __version__
    assert meta["data"]["stats"]["users"] == 40 and len(meta["data"]["checksum"]) == 64
    assert meta["config"]["model"]["network"]["init_args"]["d_model"] == 16
    assert meta["config"]["trainer"]["max_epochs"] == 2 and meta["config"]["seed_everything"] == 7
    # the same data as the uninterrupted run, recorded by the same manifest
    ref_best = load(interrupted.tmp / "ref" / "checkpoints" / "best.ckpt")
    assert ref_best["tim4rec_pl"]["data"]["checksum"] == meta["data"]["checksum"]


def test_resume_reaches_the_uninterrupted_result(interrupted):
    assert interrupted.resume_code == 0
    ref = load(interrupted.tmp / "ref" / "checkpoints" / "last.ckpt")
    res = load(interrupted.tmp / "int" / "checkpoints" / "last.ckpt")
    assert res["global_step"] == ref["global_step"] == 2 * STEPS_PER_EPOCH
    assert res["state_dict"].keys() == ref["state_dict"].keys()
    for key, value in ref["state_dict"].items():
        torch.testing.assert_close(res["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)
    for key, value in ref["optimizer_states"][0]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(res["optimizer_states"][0]["state"][key][name], value[name], rtol=0, atol=1e-6)
    for name in ref["callbacks"]:
        if name.startswith("EarlyStopping"):
            assert res["callbacks"][name]["wait_count"] == ref["callbacks"][name]["wait_count"]
            torch.testing.assert_close(res["callbacks"][name]["best_score"], ref["callbacks"][name]["best_score"])
        if name.startswith("ModelCheckpoint"):
            torch.testing.assert_close(
                res["callbacks"][name]["best_model_score"], ref["callbacks"][name]["best_model_score"]
            )
    ref_val, res_val = val_rows(interrupted.tmp / "ref"), val_rows(interrupted.tmp / "int")
    assert [r["epoch"] for r in ref_val] == ["0", "1"] and [r["epoch"] for r in res_val] == ["0", "1"]
    for a, b in zip(ref_val, res_val):
        for key in a:
            if key.startswith("val/"):
                assert abs(float(a[key]) - float(b[key])) <= 1e-6, (key, a[key], b[key])


def test_resumed_model_tests_like_the_uninterrupted_one(interrupted):
    for cfg in (interrupted.ref_cfg, interrupted.int_cfg):
        assert run_in_process("test", "--config", str(cfg), "--ckpt_path", "last") == 0
    ref, res = read_test_metrics(interrupted.tmp / "ref"), read_test_metrics(interrupted.tmp / "int")
    assert set(ref) == {f"test/{m}@{k}" for m in ("hr", "ndcg", "mrr") for k in (5, 10, 20)}
    for key, value in ref.items():
        assert abs(res[key] - value) <= 1e-6, (key, res[key], value)


def test_resume_loads_checkpoints_with_weights_only(interrupted):
    assert interrupted.loads and all(flag is True for flag in interrupted.loads), interrupted.loads


def test_sigint_stops_like_sigterm(tmp_path, capsys, monkeypatch):
    cfg = write_run_config(tmp_path / "run", write_fixture(tmp_path / "tiny.inter"), tmp_path / "data", max_epochs=1)
    monkeypatch.setenv("TIM4REC_TEST_SIGNAL", "SIGINT")
    monkeypatch.setenv("TIM4REC_TEST_SIGNAL_AFTER_STEPS", "5")
    before = signal.getsignal(signal.SIGINT)
    code = run_in_process("fit", "--config", str(cfg), "--trainer.callbacks+=conftest.SignalAfterSteps")
    err = capsys.readouterr().err
    assert code == 128 + signal.SIGINT, err[-3000:]
    assert "Traceback" not in err and "stopped by SIGINT at epoch 0, step 5" in err
    assert signal.getsignal(signal.SIGINT) is before  # handlers are put back after fit
    ckpt = load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 5
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["sampler"]["consumed"] == 5 * 32


def test_nonfinite_loss_stops_with_one_line_naming_the_step(tmp_path, capsys):
    cfg = write_run_config(tmp_path / "run", write_fixture(tmp_path / "tiny.inter"), tmp_path / "data", max_epochs=1)
    code = run_in_process("fit", "--config", str(cfg), "--model.lr", "1e30")  # the first Adam step: NaN weights
    err = capsys.readouterr().err
    assert code == 1, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("tim4rec-pl: error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert "training loss became nan at global step 1 (epoch 0)" in lines[0]


def test_incompatible_checkpoint_is_one_clear_line(interrupted, tmp_path, capsys):
    best = interrupted.tmp / "ref" / "checkpoints" / "best.ckpt"
    wider = ("--model.network.init_args.d_model", "32")
    code = run_in_process("test", "--config", str(interrupted.ref_cfg), "--ckpt_path", str(best), *wider)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("tim4rec-pl: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert (
        "checkpoint does not fit this config" in lines[0] and "(31, 16) in the checkpoint but (31, 32) here" in lines[0]
    )
    other = write_fixture(tmp_path / "bigger.inter", users=40, items=36, seed=1)  # a larger catalogue
    code = run_in_process("test", "--config", str(interrupted.ref_cfg), "--ckpt_path", str(best),
                          "--data.path", str(other), "--data.data_dir", str(tmp_path / "data"))  # fmt: skip
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("tim4rec-pl: error:")]
    assert code == 2 and len(lines) == 1, err[-3000:]
    assert "network.item_embedding.weight has shape (31, 16) in the checkpoint but (37, 16) here" in lines[0]


class _Payload:
    """Unpickling this would create a file: what a malicious checkpoint could do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_unsafe_checkpoint_is_refused_without_running_it(interrupted, tmp_path, capsys):
    ckpt = load(interrupted.tmp / "ref" / "checkpoints" / "best.ckpt")
    marker = tmp_path / "payload-ran"
    ckpt["extra"] = _Payload(str(marker))
    evil = tmp_path / "evil.ckpt"
    torch.save(ckpt, evil)
    code = run_in_process("test", "--config", str(interrupted.ref_cfg), "--ckpt_path", str(evil))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "weights_only=True" in err
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(evil, weights_only=True)


# -------------------------------------------------------------------------------------------------- pieces
def test_rng_state_round_trips_through_a_safe_checkpoint(tmp_path):
    torch.manual_seed(3), np.random.seed(4), random.seed(5)
    torch.randn(3), np.random.randn(), random.gauss(0, 1)  # leaves a cached gaussian in numpy and python
    path = tmp_path / "rng.pt"
    torch.save({"rng": rng_state()}, path)
    expected = (
        torch.rand(5),
        np.random.randn(5),
        [random.gauss(0, 1) for _ in range(3)],
        torch.nn.Dropout(0.5)(torch.ones(8)),
    )
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    set_rng_state(torch.load(path, weights_only=True)["rng"])
    again = (
        torch.rand(5),
        np.random.randn(5),
        [random.gauss(0, 1) for _ in range(3)],
        torch.nn.Dropout(0.5)(torch.ones(8)),
    )
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2] == again[2] and torch.equal(expected[3], again[3])


class _Trainer:
    """The bits of a Trainer that ResumableDataLoader reads."""

    def __init__(self, processed: int) -> None:
        self.state = SimpleNamespace(fn=TrainerFn.FITTING)
        progress = SimpleNamespace(current=SimpleNamespace(processed=processed))
        self.fit_loop = SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress))


def _loader(trainer=None, batch_size: int = 4, rank: int = 0, world: int = 1) -> ResumableDataLoader:
    data = list(range(23))
    sampler = TrainSampler(data, num_replicas=world, rank=rank, seed=11)
    sampler.set_epoch(2)
    return ResumableDataLoader(data, batch_size=batch_size, sampler=sampler, trainer=trainer)


@pytest.mark.parametrize("world", [1, 2])
def test_loader_state_counts_finished_batches_and_resumes_the_order(world):
    trainer = _Trainer(processed=2)
    loaders = [_loader(trainer, rank=r, world=world) for r in range(world)]
    full = [[b.tolist() for b in loader] for loader in loaders]  # the whole epoch 2, per rank
    its = [iter(loader) for loader in loaders]
    for it in its:
        next(it), next(it), next(it)  # 3 handed out (a prefetch), 2 finished: the count comes from the trainer
    state = loaders[0].state_dict()
    assert state == {
        "sampler": {"epoch": 2, "seed": 11, "consumed": 2 * 4 * world},
        "batch_size": 4,
        "num_replicas": world,
    }
    for rank in range(world):
        fresh = _loader(rank=rank, world=world)
        fresh.load_state_dict(state)
        assert (
            len(fresh) == len(full[rank]) == math.ceil(math.ceil(23 / world) / 4)
        )  # the whole epoch, as Lightning counts
        assert [b.tolist() for b in fresh] == full[rank][2:]  # exactly the batches not yet trained on


def test_loader_refuses_a_mid_epoch_state_from_another_batch_size():
    one, six = _Trainer(processed=1), _Trainer(processed=6)  # (the loader holds its trainer by a weak reference)
    state = _loader(one).state_dict()
    with pytest.raises(UserError, match="batch_size=4"):
        _loader(batch_size=8).load_state_dict(state)
    end_of_epoch = _loader(six).state_dict()  # the whole epoch: the next one starts afresh
    assert end_of_epoch["sampler"]["consumed"] == 23
    _loader(batch_size=8).load_state_dict(end_of_epoch)


def test_loader_does_not_draw_from_the_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    list(_loader())  # creating the iterator draws a base seed: from the loader's own generator
    assert torch.equal(torch.rand(3), expected)


class _SavingTrainer:
    is_global_zero = True

    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.strategy = SimpleNamespace(barrier=lambda name=None: None)

    def save_checkpoint(self, path, weights_only=None) -> None:
        with open(path, "wb") as f:
            f.write(b"partial")
            if self.fail:
                raise OSError("disk full")
            f.write(b" and complete")


def test_atomic_save_never_leaves_a_torn_checkpoint(tmp_path):
    target = tmp_path / "ckpts" / "last.ckpt"
    save_checkpoint_atomically(_SavingTrainer(fail=False), target)
    assert target.read_bytes() == b"partial and complete" and os.listdir(target.parent) == ["last.ckpt"]
    with pytest.raises(OSError):
        save_checkpoint_atomically(_SavingTrainer(fail=True), target)
    assert target.read_bytes() == b"partial and complete"  # the old checkpoint survives a failed write
    assert os.listdir(target.parent) == ["last.ckpt"]  # and no temporary file is left


def test_describe_interrupt_builds_the_resume_command():
    stop = Interrupted("SIGTERM", epoch=3, step=120, rank=0, checkpoint="/r/last.ckpt")
    code, line = describe_interrupt(
        stop, ["fit", "--config", "my run.yaml", "--ckpt_path", "old.ckpt", "--seed_everything=1"]
    )
    assert code == 143
    assert line == ("tim4rec-pl: stopped by SIGTERM at epoch 3, step 120; checkpoint: /r/last.ckpt; resume with: "
                    "tim4rec-pl fit --config 'my run.yaml' --seed_everything=1 --ckpt_path last")  # fmt: skip
    in_run = describe_interrupt(stop.in_run("20261204-101500-abcd"), ["fit", "--config", "c.yaml"])[1]
    assert in_run.endswith("resume with: tim4rec-pl fit --config c.yaml --run 20261204-101500-abcd --ckpt_path last")
    assert describe_interrupt(Interrupted("SIGINT", 0, 5, 0, None), ["fit"]) == (
        130, "tim4rec-pl: stopped by SIGINT at epoch 0, step 5; no checkpoint written (trainer.enable_checkpointing "
        "is false)")  # fmt: skip
    assert describe_interrupt(Interrupted("SIGTERM", 3, 120, 1, "/r/last.ckpt"), ["fit"]) == (143, None)  # rank 0 only
    assert describe_interrupt(SIGTERMException(), ["test"]) == (143, "tim4rec-pl: stopped by SIGTERM")
