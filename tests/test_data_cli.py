"""``tim4rec-pl data prepare|stats``: options, config files, output, and one-line errors with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tim4rec_pl.data.cli import main

FIXTURES = Path(__file__).parent / "fixtures"
KCORE = str(FIXTURES / "kcore.inter")
K3 = ["--min_user_inter", "3", "--min_item_inter", "3"]


def run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_stats_json(tmp_path, capsys):
    code, out, err = run(capsys, ["stats", "--path", KCORE, *K3, "--data_dir", str(tmp_path), "--json"])
    assert code == 0 and err == ""
    report = json.loads(out)
    # the fixture's known result (see tests/test_prepare.py): 4 users x 3 rows over 3 items, one zero gap of eight
    assert (report["users"], report["items"], report["interactions"]) == (4, 3, 12)
    assert (report["min_seq_len"], report["median_seq_len"], report["max_seq_len"]) == (3, 3.0, 3)
    assert report["avg_seq_len"] == 3.0 and report["density"] == 1.0 and report["zero_gap_share"] == 0.125
    assert report["time_span_days"] == pytest.approx(2190 / 86400)
    assert report["cache_dir"].startswith(str(tmp_path)) and len(report["checksum"]) == 64


def test_stats_table_and_prepare(tmp_path, capsys):
    code, out, _ = run(capsys, ["prepare", "--path", KCORE, *K3, "--data-dir", str(tmp_path), "--no-progress"])
    assert code == 0 and "4 users, 3 items, 12 interactions" in out
    cache = out.split("-> ")[1].split(" (")[0]
    assert (Path(cache) / "manifest.json").is_file()
    code, out, _ = run(capsys, ["stats", "--path", KCORE, *K3, "--data_dir", str(tmp_path)])
    assert code == 0
    table = dict(line.split("  ", 1) for line in out.splitlines())
    assert (
        table["users"].strip() == "4" and table["same-second neighbours / zero float32 gaps"].strip() == "12.5% / 50.0%"
    )
    assert table["cache"].strip() == cache


@pytest.mark.parametrize("nested", [True, False])
def test_config_data_section(tmp_path, capsys, nested):
    args = {"path": KCORE, "min_user_inter": 3, "min_item_inter": 3, "data_dir": str(tmp_path),
            "time_sort": "exact", "batch_size": 64, "max_seq_len": 50, "num_workers": 2}  # fmt: skip
    data = {"class_path": "tim4rec_pl.data.datamodule.SeqRecDataModule", "init_args": args} if nested else args
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"trainer": {"max_epochs": 1}, "model": {"lr": 0.001}, "data": data}))  # JSON is YAML
    code, out, _ = run(capsys, ["stats", "--config", str(config), "--json"])
    assert code == 0
    report = json.loads(out)
    assert report["interactions"] == 12
    manifest = json.loads((Path(report["cache_dir"]) / "manifest.json").read_text())
    assert manifest["params"]["protocol"]["time_sort"] == "exact"
    # the command line overrides the config
    code, out, _ = run(capsys, ["stats", "--config", str(config), "--json", "--drop_duplicates"])
    assert json.loads(out)["users"] == 3


def test_help_is_helpful(capsys):
    code, out, _ = run(capsys, ["stats", "--help"])
    assert code == 0
    for option in ("--config", "--dataset", "--path", "--time_unit", "--min_user_inter", "--time_sort", "--json"):
        assert option in out
    assert "ml-100k, ml-1m, amazon-beauty, kuairand, steam" in " ".join(out.split())  # wrapped by argparse


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["stats", "--path", "nowhere.csv"], "nowhere.csv: file not found"),
        (["stats", "--dataset", "ml-10m"], "unknown dataset 'ml-10m'; known datasets: ml-100k"),
        (["stats", "--path", KCORE], "nothing left after the user filter min_user_inter=5"),
        (["stats", "--path", KCORE, "--format", "excel"], "argument --format: invalid choice: 'excel'"),
        (["stats", "--colour"], "unrecognized arguments: --colour"),
        (["stats"], "no data source; pass --dataset NAME, --path FILE or --config"),
        (["stats", "--config", "missing.yaml"], "--config missing.yaml: cannot read it"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_errors_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    code, out, err = run(capsys, [*argv, "--data_dir", str(tmp_path / "data")] if argv != ["frobnicate"] else argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("tim4rec-pl: error: ") and message in err
    assert not (tmp_path / "data").exists()


def test_bad_config_value_is_a_user_error(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  path: {KCORE}\n  min_user_inter: lots\n")
    code, _, err = run(capsys, ["stats", "--config", str(config)])
    assert code == 2 and "min_user_inter='lots' is not valid" in err and err.count("\n") == 1
