"""The analysis notebook runs top to bottom on two tiny finished runs, and what it shows matches the run files.

Two runs (TiM4Rec with the time path on, SSD4Rec* with it off) are trained and tested through the ``tim4rec-pl``
command with W&B offline and HOME in a temporary folder (so no W&B key can be found); the notebook is executed with
nbclient in a kernel of this very interpreter. Its numbers (saved in ``summary.json``) are checked against the CSV
files read here with the csv module, and against facts that hold independently of the notebook: the best checkpoint
is the epoch with the highest validation NDCG@10, and the time path is the only difference in parameters.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOK = NOTEBOOKS / "analysis.ipynb"
KERNEL = "tim4rec-pl-test"
METRICS = [f"{m}@{k}" for m in ("hr", "ndcg", "mrr") for k in (5, 10, 20)]


def load_make_tiny_runs():
    spec = importlib.util.spec_from_file_location("make_tiny_runs", NOTEBOOKS / "make_tiny_runs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def csv_metrics(run: Path) -> tuple[list[dict[str, str]], dict[str, str]]:
    """(fit rows with validation metrics, the test row), straight from the CSVLogger files."""
    versions = sorted((run / "csv").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    assert len(versions) == 2  # fit, then test
    with versions[0].open() as f:
        val = [r for r in csv.DictReader(f) if r.get("val/ndcg@10")]
    with versions[1].open() as f:
        test = [r for r in csv.DictReader(f) if r.get("test/hr@10")]
    assert len(test) == 1
    return val, test[0]


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("notebook")
    home = tmp / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(home), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    runs = load_make_tiny_runs().make_tiny_runs(tmp, epochs=3, wandb_mode="offline", env=env)

    # a kernel spec for this interpreter, found first through JUPYTER_PATH
    spec_dir = tmp / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec_dir / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))
    out = tmp / "analysis"
    kernel_env = {
        **env,
        "JUPYTER_PATH": str(tmp / "jupyter"),
        "TIM4REC_RUNS": json.dumps({**runs, "Missing": str(tmp / "runs" / "never-trained")}),
        "TIM4REC_NB_OUTPUT": str(out),
    }
    nb = nbformat.read(NOTEBOOK, as_version=4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(tmp / "jupyter"))
        client = nbclient.NotebookClient(
            nb, kernel_name=KERNEL, timeout=300, resources={"metadata": {"path": str(NOTEBOOKS)}}
        )
        client.execute(env=kernel_env)  # raises CellExecutionError on the first failing cell
    summary = json.loads((out / "summary.json").read_text())
    return nb, summary, {name: Path(p) for name, p in runs.items()}, out


def outputs(nb) -> list:
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]


def test_notebook_runs_without_errors_and_draws_its_figures(executed):
    nb, summary, _, out = executed
    assert not [o for o in outputs(nb) if o.output_type == "error"]
    images = [o for o in outputs(nb) if "image/png" in o.get("data", {})]
    assert len(images) == 3  # learning curves, metrics against K, time-path effect
    assert sorted(summary["figures"]) == ["learning_curves.png", "metrics_vs_k.png", "time_effect.png"]
    for name in summary["figures"]:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    text = "".join(o.get("text", "") for o in outputs(nb) if o.output_type == "stream")
    assert "skipped Missing: no run folder" in text  # a missing run is reported, not fatal
    assert set(summary["runs"]) == {"TiM4Rec", "SSD4Rec*"}


def test_history_and_test_metrics_match_the_csv_files(executed):
    _, summary, runs, _ = executed
    for name, folder in runs.items():
        val, test = csv_metrics(folder)
        got = summary["runs"][name]
        assert got["epochs"] == [0, 1, 2]
        assert got["val_curve"] == [float(r["val/ndcg@10"]) for r in val]
        curve = got["val_curve"]
        assert got["best_epoch"] == curve.index(max(curve))
        assert got["test"] == {f"test/{m}": float(test[f"test/{m}"]) for m in METRICS}
        assert summary["final_metrics"][name] == {"split": "test", **{m: float(test[f"test/{m}"]) for m in METRICS}}
        # the offline W&B runs (fit and test) carry the same numbers in their summaries
        wandb = got["wandb_summary"]
        for m in METRICS:
            assert wandb[f"test/{m}"] == pytest.approx(float(test[f"test/{m}"]), rel=1e-9)
        # validation metrics are summarised by their maximum and their last value
        assert wandb["val/ndcg@10.last"] == pytest.approx(curve[-1], rel=1e-9)
        assert wandb["val/ndcg@10.max"] == pytest.approx(max(curve), rel=1e-9)


def test_checkpoint_is_the_best_epoch_and_records_its_metadata(executed):
    from tim4rec_pl import __version__

    _, summary, _, _ = executed
    tim, ssd = summary["runs"]["TiM4Rec"], summary["runs"]["SSD4Rec*"]
    for run in (tim, ssd):
        ckpt = run["checkpoint"]
        assert ckpt["loaded"] == "weights_only=True"
        assert ckpt["version"] == __version__ and len(ckpt["data_checksum"]) == 64
        assert ckpt["epoch"] == run["best_epoch"]
        assert ckpt["best_model_score"] == pytest.approx(max(run["val_curve"]), rel=1e-6)
    assert tim["checkpoint"]["data_checksum"] == ssd["checkpoint"]["data_checksum"]  # same data
    assert (tim["is_time"], ssd["is_time"]) == (True, False)
    # the time path is the only difference between the two networks
    assert ssd["checkpoint"]["time_parameters"] == 0 < tim["checkpoint"]["time_parameters"]
    extra = tim["checkpoint"]["parameters"] - ssd["checkpoint"]["parameters"]
    assert extra == tim["checkpoint"]["time_parameters"]


def test_time_path_table_is_the_relative_difference_of_test_metrics(executed):
    _, summary, runs, _ = executed
    effect = summary["time_effect"]
    assert (effect["with_time"], effect["without_time"]) == ("TiM4Rec", "SSD4Rec*")
    (_, on), (_, off) = csv_metrics(runs["TiM4Rec"]), csv_metrics(runs["SSD4Rec*"])
    assert [r["metric"] for r in effect["rows"]] == METRICS
    for row in effect["rows"]:
        a, b = float(on[f"test/{row['metric']}"]), float(off[f"test/{row['metric']}"])
        assert (row["TiM4Rec"], row["SSD4Rec*"]) == (a, b)
        assert row["relative %"] == pytest.approx(100 * (a - b) / b, rel=1e-12)


def test_test_mode_predictions_reproduce_the_test_metrics(executed):
    _, summary, runs, _ = executed
    stats = summary["runs"]["TiM4Rec"]["predictions"]  # tim4rec-pl predict --predictions.mode test, top 20
    assert Path(stats["file"]) == runs["TiM4Rec"] / "predictions" / "test.parquet"
    assert (stats["rows"], stats["users"], stats["k"]) == (40 * 20, 40, 20)  # every user of the fixture, top 20
    assert 0 < stats["top1_most_common_share"] <= 1 and 1 <= stats["distinct_items"] <= 30
    _, test = csv_metrics(runs["TiM4Rec"])
    audit = {row["metric"]: row for row in stats["audit"]}
    assert sorted(audit) == sorted(METRICS)  # every K of the run is <= 20
    for metric, row in audit.items():
        assert row["tim4rec-pl test"] == float(test[f"test/{metric}"])
        assert row["from predictions"] == pytest.approx(float(test[f"test/{metric}"]), abs=1e-6)
    assert summary["runs"]["SSD4Rec*"]["predictions"] is None  # a run without predictions is reported, not fatal


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    assert "parameters" in code[0].metadata.get("tags", [])
