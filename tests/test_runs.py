"""Run folders and one W&B record per experiment: every fit gets its own folder, best / last find the newest run
(or the one asked for), a resumed fit and a test continue the same W&B run; the output in a log file is one line
per epoch; the SLURM script resumes only its own requeued job."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import finish, load, of_type, start_cli, wandb_key, wandb_records, write_fixture, write_rooted_config

from tim4rec_pl import runs as runs_module
from tim4rec_pl.errors import UserError
from tim4rec_pl.runs import create_run, find_run, list_runs, newest_run_with

REPO = Path(__file__).resolve().parents[1]


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (W&B's own log files aside)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "wandb" not in p.relative_to(folder).parts
    }


def wandb_env(home: Path) -> dict[str, str | None]:
    """No key, no WANDB_MODE: the logger goes offline by itself."""
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("WANDB_")}
    env.update(HOME=str(home), WANDB_MODE=None)
    return env


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """fit A; fit B (other lr); test best (B); test --run A; fit --ckpt_path last --run A (resume A)."""
    tmp = tmp_path_factory.mktemp("runs")
    (tmp / "home").mkdir()
    cfg = write_rooted_config(tmp, write_fixture(tmp / "tiny.inter"), wandb=True)
    env = wandb_env(tmp / "home")
    root = tmp / "runs" / "tiny"

    def cli(*args: str) -> SimpleNamespace:
        res = finish(start_cli(*args, cwd=tmp, **env))
        assert res.returncode == 0, res.stderr[-3000:]
        return res

    fit_a = cli("fit", "--config", str(cfg))
    (run_a,) = list_runs(root)
    a_files = digest(run_a)
    fit_b = cli("fit", "--config", str(cfg), "--model.lr", "5e-4")
    run_b = next(p for p in list_runs(root) if p != run_a)
    a_after_b = digest(run_a)
    test_newest = cli("test", "--config", str(cfg), "--ckpt_path", "best")
    run_a_id = json.loads((run_a / "run.json").read_text())["id"]
    test_a = cli("test", "--config", str(cfg), "--ckpt_path", "best", "--run", run_a_id)
    resume_a = cli("fit", "--config", str(cfg), "--ckpt_path", "last", "--run", run_a.name, "--trainer.max_epochs", "3")
    return SimpleNamespace(
        tmp=tmp, cfg=cfg, root=root, run_a=run_a, run_b=run_b, run_a_id=run_a_id, a_files=a_files,
        a_after_b=a_after_b, fit_a=fit_a, fit_b=fit_b, test_newest=test_newest, test_a=test_a, resume_a=resume_a,
    )  # fmt: skip


def test_every_fit_gets_its_own_folder_and_never_touches_another(experiment):
    e = experiment
    assert sorted(list_runs(e.root)) == sorted([e.run_a, e.run_b])  # the resume and the tests made no new folder
    for run in (e.run_a, e.run_b):
        assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
        assert (run / "config.yaml").is_file() and (run / "csv" / "version_0" / "metrics.csv").is_file()
        assert any((run / "wandb").glob("offline-run-*"))
    assert e.a_after_b == e.a_files  # the second fit changed not one byte of the first run
    assert yaml.safe_load((e.run_b / "config.yaml").read_text())["model"]["lr"] == 5e-4
    assert yaml.safe_load((e.run_a / "config.yaml").read_text())["model"]["lr"] == 1e-3
    assert f"new run {e.run_a}" in e.fit_a.stderr


def test_best_means_the_newest_run_and_says_so(experiment):
    e = experiment
    best_b = e.run_b / "checkpoints" / "best.ckpt"
    lines = [line for line in e.test_newest.stderr.splitlines() if "--ckpt_path best:" in line]
    assert len(lines) == 1 and str(best_b) in lines[0] and "newest of 2 runs" in lines[0]
    # the test's metrics went into run B's folder, as the next CSV version and a config-test.yaml
    test_rows = (e.run_b / "csv" / "version_1" / "metrics.csv").read_text()
    assert "test/ndcg@10" in test_rows and (e.run_b / "config-test.yaml").is_file()
    # --run A picks A's best.ckpt, and A's folder gets the test metrics
    assert f"{e.run_a / 'checkpoints' / 'best.ckpt'}" in e.test_a.stderr
    assert "test/ndcg@10" in (e.run_a / "csv" / "version_1" / "metrics.csv").read_text()


def test_resume_continues_the_run_in_its_own_folder(experiment):
    e = experiment
    assert f"resuming run {e.run_a}" in e.resume_a.stderr
    last = load(e.run_a / "checkpoints" / "last.ckpt")
    assert last["epoch"] == 3 and last["global_step"] == 3 * 16  # one more epoch of 16 batches on the 2-epoch state
    fit_rows = (e.run_a / "csv" / "version_2" / "metrics.csv").read_text().splitlines()
    assert "val/ndcg@10" in fit_rows[0] and len(fit_rows) > 1
    commands = [c["command"] for c in json.loads((e.run_a / "run.json").read_text())["commands"]]
    assert commands == ["fit", "test", "fit"]
    assert [c["command"] for c in json.loads((e.run_b / "run.json").read_text())["commands"]] == ["fit", "test"]


def _run_records(run: Path) -> list[list]:
    folders = sorted((run / "wandb").glob("offline-run-*"), key=lambda p: p.name)
    return [wandb_records(next(f.glob("run-*.wandb"))) for f in folders]


def test_one_wandb_run_per_experiment(experiment):
    e = experiment
    pieces = _run_records(e.run_a)  # fit, test, resumed fit: three offline directories of one W&B run
    assert len(pieces) == 3
    heads = [of_type(records, "run")[0].run for records in pieces]
    assert {h.run_id for h in heads} == {e.run_a_id}
    assert {h.run_group for h in heads} == {"tiny"} and [h.job_type for h in heads] == ["fit", "", ""]
    assert heads[0].display_name == f"tiny/{e.run_a.name}"
    b_ids = {of_type(records, "run")[0].run.run_id for records in _run_records(e.run_b)}
    assert len(b_ids) == 1 and b_ids != {e.run_a_id}
    # the test's own config goes beside the fit's (test_config), never over it
    test_keys = {wandb_key(i) for r in of_type(pieces[1], "config") for i in r.config.update}
    assert "test_config" in test_keys and "config" not in test_keys
    # the test's metrics are in that same run
    history = [{wandb_key(i): json.loads(i.value_json) for i in r.history.item} for r in of_type(pieces[1], "history")]
    assert any("test/ndcg@10" in h for h in history)


def test_wandb_metrics_are_defined_and_the_environment_recorded(experiment):
    fit = _run_records(experiment.run_a)[0]
    defined = {r.metric.name: r.metric for r in of_type(fit, "metric") if r.metric.name}
    assert defined["val/ndcg@10"].step_metric == "trainer/global_step"
    assert defined["val/ndcg@10"].summary.max and defined["train/loss_epoch"].summary.min
    summary: dict = {}
    for record in of_type(fit, "summary"):
        summary.update({wandb_key(i): json.loads(i.value_json) for i in record.summary.update})
    history = [{wandb_key(i): json.loads(i.value_json) for i in r.history.item} for r in of_type(fit, "history")]
    val = [h["val/ndcg@10"] for h in history if "val/ndcg@10" in h]
    assert summary["val/ndcg@10"] == {"max": max(val), "last": val[-1]}
    config: dict = {}
    for record in of_type(fit, "config"):
        config.update({wandb_key(i): json.loads(i.value_json) for i in record.config.update})
    env = config["env"]
    assert env["device"] == "cpu" and env["world_size"] == 1 and env["num_nodes"] == 1
    assert env["run_folder"] == str(experiment.run_a)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    if commit.strip():
        assert env["git_commit"].split("+")[0] == commit.strip()
    perf = [h for h in history if "perf/samples_per_s" in h]
    assert len(perf) == 2 and all(h["perf/samples_per_s"] > 0 and h["perf/epoch_time_s"] > 0 for h in perf)


# ------------------------------------------------------------------------------------------------- in-process
def test_concurrent_creation_never_shares_a_folder(tmp_path, monkeypatch):
    ids = iter(["sameid00", "sameid00", "otherid1", "mine0000", "mine0001"])
    monkeypatch.setattr(runs_module, "new_id", lambda: next(ids))
    monkeypatch.setattr(runs_module.time, "strftime", lambda fmt, *a: "20260101-000000" if "%Y%m%d" in fmt else "t")
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    first, second = create_run(tmp_path), create_run(tmp_path)  # the same time stamp and, first, the same id
    assert first.path != second.path and second.id == "otherid1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["20260101-000000-otherid1", "20260101-000000-sameid00"]
    create_run(tmp_path, "mine")
    with pytest.raises(UserError, match="already exists"):
        create_run(tmp_path, "mine")


def test_many_processes_at_once_get_distinct_folders(tmp_path):
    code = "import sys; from tim4rec_pl.runs import create_run; print(create_run(sys.argv[1]).path)"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("WANDB_RUN_ID", None)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(8)]  # fmt: skip
    paths = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert len(set(paths)) == 8 and len(list_runs(tmp_path)) == 8


def test_find_run_by_name_id_prefix_and_path(tmp_path):
    a, b = create_run(tmp_path), create_run(tmp_path)
    (b.checkpoints).mkdir()
    (b.checkpoints / "best.ckpt").write_bytes(b"x")
    assert find_run(tmp_path, a.id[:5]).path == a.path and find_run(tmp_path, str(b.path)).path == b.path
    assert find_run(tmp_path, b.name).id == b.id
    assert newest_run_with(tmp_path, "best.ckpt")[0].path == b.path
    assert newest_run_with(tmp_path, "last.ckpt") is None
    with pytest.raises(UserError, match="no run folder"):
        find_run(tmp_path, "zzzzzzzz")


# ------------------------------------------------------------------------------------------------- output
def test_redirected_fit_prints_one_line_per_epoch(tmp_path):
    cfg = write_rooted_config(tmp_path, write_fixture(tmp_path / "tiny.inter"), batch_size=20, max_epochs=1)
    log = tmp_path / "fit.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    env.pop("PYTHONWARNINGS", None)  # the warnings a user would see, not a silenced run
    with log.open("w") as out:
        exe = Path(sys.executable).with_name("tim4rec-pl")
        code = subprocess.run([str(exe), "fit", "--config", str(cfg)], cwd=tmp_path, env=env, stdout=out,
                              stderr=subprocess.STDOUT, timeout=600).returncode  # fmt: skip
    text = log.read_text()
    assert code == 0, text[-3000:]
    (run,) = list_runs(tmp_path / "runs" / "tiny")
    rows = (run / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    assert max(int(r.split(",")[rows[0].split(",").index("step")]) for r in rows[1:]) == 24  # 25 batches
    assert "\r" not in text
    assert len(text.splitlines()) <= 40, text
    epoch_lines = [line for line in text.splitlines() if line.startswith("epoch 0 ")]
    assert len(epoch_lines) == 1
    assert "train/loss" in epoch_lines[0] and "val/ndcg@10" in epoch_lines[0] and "best" in epoch_lines[0]
    for noise in ("Tip:", "litlogger", "TPU available", "Warning", "deprecated", "v_num"):
        assert noise not in text, noise


# ------------------------------------------------------------------------------------------------- SLURM
def run_slurm_script(tmp: Path, restart: int) -> list[str]:
    """scripts/slurm.sh with srun replaced by a stub that records its arguments; the srun lines it ran."""
    (tmp / "configs" / "presets").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "configs" / "ml-1m.yaml", tmp / "configs" / "ml-1m.yaml")
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / "srun"
    log = tmp / "srun.log"
    stub.write_text(f'#!/bin/sh\necho "$@" >> {log}\necho "WANDB_MODE=${{WANDB_MODE:-unset}}" >> {log}\n')
    stub.chmod(0o755)
    (tmp / "srun.log").unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WANDB_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_SUBMIT_DIR=str(tmp), SLURM_JOB_ID="4242", SLURM_NNODES="2",
               SLURM_NTASKS_PER_NODE="8", SLURM_RESTART_COUNT=str(restart))  # fmt: skip
    res = subprocess.run(["bash", str(REPO / "scripts" / "slurm.sh"), "configs/ml-1m.yaml", "--model.lr", "5e-4"],
                         cwd=tmp, env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stderr
    return (tmp / "srun.log").read_text().splitlines()


def test_slurm_script_resumes_only_its_own_requeued_run(tmp_path):
    # an older run of the same config with a last.ckpt: a new submission must not resume it
    old = tmp_path / "runs" / "ml-1m" / "20250101-000000-oldrun00" / "checkpoints"
    old.mkdir(parents=True)
    (old / "last.ckpt").write_bytes(b"old")
    fit, mode, test, _ = run_slurm_script(tmp_path, restart=0)
    assert fit.startswith("tim4rec-pl fit") and "--run slurm-4242" in fit and "--ckpt_path" not in fit
    assert "--model.lr 5e-4" in fit and "--trainer.num_nodes 2" in fit and "--trainer.devices 8" in fit
    assert test.startswith("tim4rec-pl test") and "--run slurm-4242 --ckpt_path best" in test
    assert mode == "WANDB_MODE=unset"  # the script leaves W&B's mode to the user's environment
    # the same job requeued after its own last.ckpt was written: resume that one
    own = tmp_path / "runs" / "ml-1m" / "slurm-4242" / "checkpoints"
    own.mkdir(parents=True)
    (own / "last.ckpt").write_bytes(b"own")
    fit = run_slurm_script(tmp_path, restart=1)[0]
    assert "--run slurm-4242" in fit and "--ckpt_path last" in fit
    # requeued after a newer hpc checkpoint: no --ckpt_path, Lightning resumes from hpc_ckpt_N.ckpt itself
    hpc = own.parent / "hpc_ckpt_1.ckpt"
    hpc.write_bytes(b"hpc")
    os.utime(own / "last.ckpt", (1, 1))
    fit = run_slurm_script(tmp_path, restart=2)[0]
    assert "--run slurm-4242" in fit and "--ckpt_path" not in fit


def test_sigterm_names_the_run_and_its_resume_continues_it(tmp_path):
    cfg = write_rooted_config(tmp_path, write_fixture(tmp_path / "tiny.inter"), wandb=True)
    (tmp_path / "home").mkdir()
    env = {**wandb_env(tmp_path / "home"), "TIM4REC_TEST_SIGNAL_AFTER_STEPS": "5"}
    stopped = finish(start_cli("fit", "--config", str(cfg), "--trainer.callbacks+=conftest.SignalAfterSteps",
                               cwd=tmp_path, **env))  # fmt: skip
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    (run,) = list_runs(tmp_path / "runs" / "tiny")
    line = next(line for line in stopped.stderr.splitlines() if "resume with:" in line)
    command = line.split("resume with: tim4rec-pl ", 1)[1].split()
    assert command[-4:] == ["--run", run.name, "--ckpt_path", "last"]
    create_run(tmp_path / "runs" / "tiny")  # a newer run appears meanwhile: the resume still goes to this one
    resumed = finish(start_cli(*[a for a in command if "SignalAfterSteps" not in a], cwd=tmp_path,
                               **{**env, "TIM4REC_TEST_SIGNAL_AFTER_STEPS": None}))  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert load(run / "checkpoints" / "last.ckpt")["global_step"] == 2 * 16
    ids = {of_type(records, "run")[0].run.run_id for records in _run_records(run)}
    assert len(_run_records(run)) == 2 and ids == {json.loads((run / "run.json").read_text())["id"]}
