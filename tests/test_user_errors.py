"""Every user error through the real CLI: exit code 2, one line on stderr, nothing left behind; atomic writes on a
full disk and with TMPDIR on another filesystem; no litter from killed runs or W&B.

Each command runs as a subprocess of the ``tim4rec-pl`` console script (the only way to see every line a user
sees), with TMPDIR pointed at a folder of the test, so that temporary folders left in "the system temp folder" are
seen too.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import finish, load, run_in_process, start_cli, write_fixture, write_run_config
from lightning.pytorch.callbacks import Callback

from tim4rec_pl.atomic import _HOST, remove_stale_temporaries, temporary_name
from tim4rec_pl.data.prepare import ProtocolConfig, SourceConfig, load_or_prepare
from tim4rec_pl.errors import UserError
from tim4rec_pl.leftovers import RunFiles
from tim4rec_pl.model.sasrec import SASRec

PREFIX = "tim4rec-pl: error: "


class FailAtTestStart(Callback):
    """Test-only: a failure after setup (config.yaml and the W&B run exist), before any result."""

    def on_test_start(self, trainer, pl_module) -> None:  # noqa: D102
        raise UserError("injected failure after setup; nothing to fix")


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path("/nonexistent/payload-ran"),))


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one intra-op thread


def tree(*roots: Path) -> set[str]:
    """Every path under ``roots`` (what a command may have left)."""
    found = set()
    for root in roots:
        for folder, dirs, files in os.walk(root):
            found.update(str(Path(folder) / n) for n in dirs + files)
    return found


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A trained tiny run, and the bad files a user might pass instead of its checkpoint."""
    tmp = tmp_path_factory.mktemp("user_errors")
    data = write_fixture(tmp / "tiny.inter")
    cfg = write_run_config(tmp / "run", data, tmp / "data", max_epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert run_in_process("fit", "--config", str(cfg)) == 0
    best = tmp / "run" / "checkpoints" / "best.ckpt"
    bad = tmp / "bad"
    bad.mkdir()
    (bad / "random.ckpt").write_bytes(os.urandom(4096))
    (bad / "truncated.ckpt").write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    (bad / "plain.pkl").write_bytes(pickle.dumps({"weights": [1.0, 2.0]}))
    ckpt = load(best)
    ckpt["extra"] = _Payload()
    torch.save(ckpt, bad / "payload.ckpt")
    ckpt = load(best)  # the same run, but the network is a SASRec (what `fit` with the SASRec config writes)
    sasrec = SASRec(num_items=31, max_seq_len=10, d_model=16)
    ckpt["state_dict"] = {f"network.{k}": v for k, v in sasrec.state_dict().items()}
    ckpt["tim4rec_pl"]["config"]["model"]["network"] = {"class_path": "tim4rec_pl.model.sasrec.SASRec"}
    torch.save(ckpt, bad / "sasrec.ckpt")
    mixed = tmp / "mixed.csv"
    mixed.write_text("user_id,item_id,timestamp\n" + "".join(f"u{k % 7},i{k % 5},{978300760 + k}\n" for k in range(60))
                     + "u1,i1,978300760500\n")  # fmt: skip
    (tmp / "systmp").mkdir()
    return tmp, cfg, best, bad


def run_cli(tmp: Path, *args: str, **env: str) -> object:
    """``tim4rec-pl ARGS`` in a subprocess, TMPDIR in the test's folder."""
    return finish(start_cli(*args, cwd=tmp, TMPDIR=str(tmp / "systmp"), **env))


def assert_one_line(result, *fragments: str) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX), result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "weights_only=False" not in lines[0]  # never suggested
    return lines[0]


CKPT_CASES = {
    "random.ckpt": "not a PyTorch checkpoint (neither the zip archive torch.save writes nor its older format",
    "truncated.ckpt": "the checkpoint file is truncated or damaged (PytorchStreamReader failed reading zip archive",
    "plain.pkl": "not a PyTorch checkpoint (a plain Python pickle; nothing in it was loaded)",
    "payload.ckpt": "holds pickled Python objects (",
}


@pytest.mark.parametrize("option", ["--ckpt_path", "--model.init_from"])
@pytest.mark.parametrize("name", list(CKPT_CASES))
def test_foreign_or_damaged_checkpoints_are_one_line_for_both_options(world, option, name):
    tmp, cfg, _, bad = world
    before = tree(tmp)
    result = run_cli(tmp, "test", "--config", str(cfg), option, str(bad / name))
    line = assert_one_line(result, f"{option} {bad / name}: ", CKPT_CASES[name])
    if name == "payload.ckpt":
        assert "that safe loading (weights_only=True) refuses, and nothing in it was run" in line
    fix = "a .pth written by the reference TiM4Rec code" if option == "--model.init_from" else "(best, last or its"
    assert fix in line
    assert tree(tmp) == before
    assert not Path("/nonexistent/payload-ran").exists()


def test_checkpoint_of_another_network_is_one_line(world):
    tmp, cfg, _, bad = world
    before = tree(tmp)
    result = run_cli(tmp, "test", "--config", str(cfg), "--ckpt_path", str(bad / "sasrec.ckpt"))
    assert_one_line(result, "checkpoint does not fit this config: it holds a SASRec network, this config builds",
                    "TiM4Rec (", "use the config the checkpoint was trained with")  # fmt: skip
    assert tree(tmp) == before


def test_checkpoint_of_another_shape_is_one_line(world):
    tmp, cfg, best, _ = world
    before = tree(tmp)
    result = run_cli(tmp, "validate", "--config", str(cfg), "--ckpt_path", str(best),
                     "--model.network.init_args.d_model", "32")  # fmt: skip
    assert_one_line(result, "network.item_embedding.weight has shape (31, 16) in the checkpoint but (31, 32) here")
    assert tree(tmp) == before


def test_unwritable_predictions_target_is_refused_before_scoring(world):
    tmp, cfg, best, _ = world
    blocker = tmp / "a-file"
    blocker.write_text("not a folder\n")
    before = tree(tmp)
    result = run_cli(tmp, "predict", "--config", str(cfg), "--ckpt_path", str(best),
                     "--predictions.output", str(blocker / "out" / "top.parquet"))  # fmt: skip
    assert_one_line(result, f"--predictions.output {blocker / 'out' / 'top.parquet'}: cannot write there",
                    "is a file, not a folder")  # fmt: skip
    assert tree(tmp) == before


def test_read_only_predictions_folder_is_refused_before_scoring(world, tmp_path, mount_small_fs):
    tmp, cfg, best, _ = world
    read_only = mount_small_fs(tmp_path / "ro", "size=1m,ro")  # read-only even for root
    before = tree(tmp)
    result = run_cli(tmp, "predict", "--config", str(cfg), "--ckpt_path", str(best),
                     "--predictions.output", str(read_only / "top.parquet"))  # fmt: skip
    assert_one_line(result, f"cannot write there ({read_only}: Read-only file system); choose a file in a folder")
    assert tree(tmp) == before and os.listdir(read_only) == []


def test_top_k_beyond_the_catalogue_is_one_line(world):
    tmp, cfg, best, _ = world
    before = tree(tmp)
    result = run_cli(tmp, "predict", "--config", str(cfg), "--ckpt_path", str(best), "--predictions.top_k", "31",
                     "--predictions.output", str(tmp / "top.parquet"))  # fmt: skip
    assert_one_line(result, "--predictions.top_k 31 is more than the 30 items of the catalogue; use at most 30")
    assert tree(tmp) == before


def test_bad_timestamps_in_test_data_are_one_line_and_leave_nothing(world):
    tmp, cfg, best, _ = world
    before = tree(tmp)
    result = run_cli(tmp, "test", "--config", str(cfg), "--ckpt_path", str(best), "--data.path", str(tmp / "mixed.csv"))
    assert_one_line(result, "mixes units: 1 timestamp above 1e11 (milliseconds?) among 60 that are not (data row 61;",
                    "set time_unit to s or ms")  # fmt: skip
    assert tree(tmp) == before


def test_failure_after_setup_removes_the_run_files_of_that_command_only(world):
    tmp, _, best, _ = world
    wandb_logger = f"""
    - class_path: tim4rec_pl.tracking.WandbLogger
      init_args: {{save_dir: {tmp}/wb, name: wb}}
    - class_path: lightning.pytorch.loggers.CSVLogger
      init_args: {{save_dir: {tmp}/wb, name: csv}}"""
    cfg = write_run_config(tmp / "wb", tmp / "tiny.inter", tmp / "data", max_epochs=1, loggers=wandb_logger)
    ok = run_cli(tmp, "test", "--config", str(cfg), "--ckpt_path", str(best), WANDB_MODE="offline")
    assert ok.returncode == 0, ok.stderr[-3000:]
    earlier = tree(tmp)  # an earlier run's files: config.yaml, csv/version_0, a W&B offline run
    assert any(p.endswith("config.yaml") for p in earlier) and any("offline-run-" in p for p in earlier)
    result = run_cli(tmp, "test", "--config", str(cfg), "--ckpt_path", str(best),
                     "--trainer.callbacks+=test_user_errors.FailAtTestStart", WANDB_MODE="offline")  # fmt: skip
    assert_one_line(result, "injected failure after setup")
    assert tree(tmp) == earlier


# ------------------------------------------------------------------------------------- atomic checkpoint writes
@pytest.fixture
def mount_small_fs():
    """Mounts a 6 MB tmpfs at a given folder (root only); skips the test where mounting is not possible."""
    mounted = []

    def mount(folder: Path, options: str = "size=6m") -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                              text=True)  # fmt: skip
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({(done.stderr or 'mount failed').strip()[:100]})")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_full_disk_keeps_the_previous_best_checkpoint_and_is_one_error_line(tmp_path, mount_small_fs):
    data = write_fixture(tmp_path / "tiny.inter")
    run = tmp_path / "run"
    small_fs = mount_small_fs(run / "checkpoints")  # the checkpoint folder on a small filesystem
    cfg = write_run_config(run, data, tmp_path / "data", max_epochs=1)
    first = finish(start_cli("fit", "--config", str(cfg), cwd=tmp_path, TMPDIR=str(tmp_path)))
    assert first.returncode == 0, first.stderr[-3000:]
    best = run / "checkpoints" / "best.ckpt"
    saved = best.read_bytes()
    fd = os.open(small_fs / "filler", os.O_WRONLY | os.O_CREAT)  # fill the filesystem to the last byte
    for size in (1 << 20, 1 << 12, 1):
        try:
            while os.write(fd, b"\0" * size) == size:
                pass
        except OSError:
            pass
    os.close(fd)
    again = finish(start_cli("fit", "--config", str(cfg), "--seed_everything", "8", cwd=tmp_path, TMPDIR=str(tmp_path)))
    errors = [line for line in again.stderr.splitlines() if line.startswith(PREFIX)]
    assert again.returncode == 2 and len(errors) == 1 and "Traceback" not in again.stderr, again.stderr[-3000:]
    assert f"cannot write checkpoint {best} (No space left on device); the previous file is unchanged" in errors[0]
    assert again.stderr.splitlines()[-1] == errors[0]
    assert best.read_bytes() == saved and "state_dict" in load(best)  # the old best.ckpt still loads
    assert sorted(os.listdir(best.parent)) == ["best.ckpt", "filler", "last.ckpt"]  # no temporary left


def test_tmpdir_on_another_filesystem_still_replaces_checkpoints_by_rename(tmp_path, mount_small_fs):
    small_fs = mount_small_fs(tmp_path / "systmp")
    data = write_fixture(tmp_path / "tiny.inter")
    cfg = write_run_config(tmp_path / "run", data, tmp_path / "data", max_epochs=1)
    best = tmp_path / "run" / "checkpoints" / "best.ckpt"
    for attempt in range(2):
        if attempt:
            os.link(best, tmp_path / "old-best.ckpt")  # the first file's inode
        done = finish(start_cli("fit", "--config", str(cfg), cwd=tmp_path, TMPDIR=str(small_fs)))
        assert done.returncode == 0, done.stderr[-3000:]
    old = tmp_path / "old-best.ckpt"
    assert best.stat().st_ino != old.stat().st_ino  # a new file renamed into place, not a copy over the old one
    assert "state_dict" in load(old) and "state_dict" in load(best)
    assert os.listdir(small_fs) == []  # and nothing left in the temp folder


# ------------------------------------------------------------------------------------------------- no litter
def test_killed_runs_leave_nothing_the_next_start_does_not_remove(tmp_path):
    data = write_fixture(tmp_path / "tiny.inter")
    folder = tmp_path / "data" / "tiny"
    folder.mkdir(parents=True)
    gone, alive = dead_pid(), os.getpid()
    killed = folder / f".prepared-0123456789ab.tmp-{_HOST}-{gone}-00000000"  # what a killed `data prepare` leaves
    running = folder / f".prepared-0123456789ab.tmp-{_HOST}-{alive}-00000000"  # another process still preparing
    fetch = folder / f".fetch.tmp-{_HOST}-{gone}-00000000-abcd"  # a killed download
    for path in (killed, running, fetch):
        path.mkdir()
        (path / "items.npy").write_bytes(b"partial")
    load_or_prepare(SourceConfig(path=str(data)), ProtocolConfig(), tmp_path / "data", progress=False)
    assert not killed.exists() and not fetch.exists() and running.exists()
    assert remove_stale_temporaries(folder) == []  # nothing else looks stale


def test_a_cli_run_leaves_nothing_in_the_temp_folder(world):
    tmp, cfg, best, _ = world
    systmp = tmp / "systmp"
    stale = systmp / f".tim4rec-pl.tmp-{_HOST}-{dead_pid()}-00000000"  # the private temp folder of a killed run
    (stale / "tmpx-wandb-media").mkdir(parents=True)
    result = run_cli(tmp, "validate", "--config", str(cfg), "--ckpt_path", str(best))
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.listdir(systmp) == []


def test_edited_manifest_statistics_are_noticed(tmp_path):
    data = write_fixture(tmp_path / "tiny.inter")
    first = load_or_prepare(SourceConfig(path=str(data)), ProtocolConfig(), tmp_path / "data", progress=False)
    manifest = Path(first.manifest["cache_dir"]) / "manifest.json"
    manifest.write_text(manifest.read_text().replace(f'"users": {first.stats["users"]}', '"users": 4000'))
    with pytest.warns(UserWarning, match="statistics in manifest.json do not match their checksum"):
        again = load_or_prepare(SourceConfig(path=str(data)), ProtocolConfig(), tmp_path / "data", progress=False)
    assert again.stats == first.stats and f'"users": {first.stats["users"]}' in manifest.read_text()


def test_temporary_names_record_host_and_process():
    name = temporary_name("best.ckpt")
    assert name.startswith(".best.ckpt.tmp-") and f"-{os.getpid()}-" in name and _HOST in name


def test_a_mistake_in_the_command_line_is_one_line_too(world):
    tmp, cfg, _, _ = world
    before = tree(tmp)
    result = run_cli(tmp, "test", "--config", str(cfg), "--model.lr", "fast")
    assert_one_line(result, 'Parser key "model.lr": Expected a', "Got value: fast; see tim4rec-pl test --help")
    assert tree(tmp) == before


def test_run_files_removes_only_what_the_failed_command_added(tmp_path):
    root = tmp_path / "runs"
    (root / "csv" / "version_0").mkdir(parents=True)
    (root / "csv" / "version_0" / "metrics.csv").write_text("an earlier run\n")
    (root / "wandb").mkdir()
    (root / "wandb" / "latest-run").symlink_to("offline-run-old")
    files = RunFiles([root, tmp_path / "new" / "deeper"], keep=[root / "checkpoints"])
    before = tree(tmp_path)
    # what the failed command wrote
    (root / "csv" / "version_1").mkdir()
    (root / "csv" / "version_1" / "config.yaml").write_text("this command\n")
    (root / "wandb" / "offline-run-new").mkdir()
    (root / "wandb" / "latest-run").unlink()
    (root / "wandb" / "latest-run").symlink_to("offline-run-new")
    (tmp_path / "new" / "deeper").mkdir(parents=True)
    # what a fit running beside it wrote meanwhile: kept
    (root / "checkpoints").mkdir()
    (root / "checkpoints" / "best.ckpt").write_text("weights\n")
    temporary = root / temporary_name("metrics.csv")
    temporary.write_text("half\n")
    files.remove_new()
    kept = {str(root / "checkpoints"), str(root / "checkpoints" / "best.ckpt"), str(temporary)}
    assert tree(tmp_path) == before | kept
    assert os.readlink(root / "wandb" / "latest-run") == "offline-run-old"
