"""Reference vs causal time path on real data: test HR/NDCG/MRR@10/20, time to the best validation.

Every run is an ordinary `tim4rec-pl fit` + `tim4rec-pl test --ckpt_path best` on a config written into its run
folder (``<run_dir>/<dataset>/<setting>/seed<k>/config.yaml``, runnable by hand), derived from the dataset's
shipped config (configs/ml-100k.yaml, configs/ml-1m.yaml) with only these changes: the network (TiM4Rec reference,
TiM4Rec causal, SSD4Rec* = TiM4Rec without time, SASRec), ``data.train_mode`` and its batch size, the seed, a wall
time cap (``trainer.max_time``), how often to validate, the early-stopping patience, and a CSV logger. Data, splits
and evaluation (docs/data.md, docs/evaluation.md) are the same for every run (same targets, same metric code).

Settings:
    tim4rec-ref       TiM4Rec, reference time path (docs/model.md), prefix training (the only mode it supports)
    tim4rec-causal    TiM4Rec, causal time path, all-position training
    tim4rec-causal-10 the same with a wall budget of a tenth of tim4rec-ref's time to its best validation
    ssd4rec-prefix / ssd4rec-all    SSD4Rec* (TiM4Rec with is_time false), prefix / all-position training
    sasrec-prefix / sasrec-all      SASRec, prefix / all-position training

Timing comes from a callback in this file (`EpochTimer`): wall and process CPU seconds from the start of training
to each validation. The machine may be shared: CPU seconds are the steadier measure, both are reported.

Usage:
    python benchmarks/compare_time_paths.py --quick                     # smoke run, a few minutes
    python benchmarks/compare_time_paths.py                             # the default plan (see PLAN)
    python benchmarks/compare_time_paths.py --plan ml-100k:tim4rec-causal:1:8 ml-100k:tim4rec-causal:2:8
    python benchmarks/compare_time_paths.py --report-only               # rebuild the tables from finished runs
Writes benchmarks/results/compare_time_paths.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"ml-100k": ROOT / "configs/ml-100k.yaml", "ml-1m": ROOT / "configs/ml-1m.yaml"}
METRICS = ["hr@10", "hr@20", "ndcg@10", "ndcg@20", "mrr@10", "mrr@20"]
TIM4REC, SASREC = "tim4rec_pl.model.tim4rec.TiM4Rec", "tim4rec_pl.model.sasrec.SASRec"

# setting -> (network class, network init_args, train mode)
SETTINGS: dict[str, tuple[str, dict, str]] = {
    "tim4rec-ref": (TIM4REC, {}, "prefix"),
    "tim4rec-causal": (TIM4REC, {"time_path": "causal"}, "all_positions"),
    "tim4rec-causal-10": (TIM4REC, {"time_path": "causal"}, "all_positions"),
    "ssd4rec-prefix": (TIM4REC, {"is_time": False}, "prefix"),
    "ssd4rec-all": (TIM4REC, {"is_time": False}, "all_positions"),
    "sasrec-prefix": (SASREC, {}, "prefix"),
    "sasrec-all": (SASREC, {}, "all_positions"),
}
# per dataset and train mode: batch size, validation interval (float: fraction of an epoch; int: batches), patience
SCHEDULE: dict[tuple[str, str], dict[str, Any]] = {
    ("ml-100k", "prefix"): {"batch_size": 2048, "val_check_interval": 8, "patience": 20},
    ("ml-100k", "all_positions"): {"batch_size": 32, "val_check_interval": 1.0, "patience": 10},
    ("ml-1m", "prefix"): {"batch_size": 2048, "val_check_interval": 2, "patience": 20},
    ("ml-1m", "all_positions"): {"batch_size": 32, "val_check_interval": 0.25, "patience": 10},
}
# dataset:setting:seed:wall minutes, run in this order (ML-100K first, ML-1M all-position runs next, the ML-1M
# reference capped); the causal-10 budget is computed from the finished tim4rec-ref run of the same dataset/seed.
PLAN = [
    "ml-100k:tim4rec-ref:0:12",
    "ml-100k:tim4rec-causal-10:0:auto",
    "ml-100k:tim4rec-causal:0:7",
    "ml-100k:ssd4rec-all:0:4",
    "ml-100k:sasrec-all:0:4",
    "ml-100k:ssd4rec-prefix:0:5",
    "ml-100k:sasrec-prefix:0:5",
    "ml-1m:tim4rec-ref:0:10",
    "ml-1m:tim4rec-causal-10:0:auto",
    "ml-1m:tim4rec-causal:0:12",
    "ml-1m:ssd4rec-all:0:3",
    "ml-1m:sasrec-all:0:3",
]
QUICK_PLAN = [
    "ml-100k:tim4rec-ref:0:1",
    "ml-100k:tim4rec-causal-10:0:auto",
    "ml-100k:tim4rec-causal:0:1",
    "ml-100k:sasrec-all:0:1",
]


class EpochTimer(Callback):
    """Records wall and CPU seconds since the start of training at every validation; test metrics after test.

    Args:
        folder: Where timeline.json (fit) and test.json (test) go.
    """

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.points: list[dict] = []
        self.t0 = self.c0 = 0.0
        self.batches_per_epoch = 0

    def _write(self, name: str, payload: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / name).write_text(json.dumps(payload, indent=1))

    def on_train_start(self, trainer, pl_module) -> None:
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        self.batches_per_epoch = int(trainer.num_training_batches)

    def _timeline(self, trainer, finished: bool) -> dict:
        return {
            "points": self.points,
            "batches_per_epoch": self.batches_per_epoch,
            "global_step": int(trainer.global_step),
            "wall": time.perf_counter() - self.t0,
            "cpu": time.process_time() - self.c0,
            "finished": finished,
        }

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not self.t0:
            return
        value = trainer.callback_metrics.get("val/ndcg@10")
        self.points.append(
            {
                "step": int(trainer.global_step),
                "epoch": int(trainer.current_epoch),
                "wall": time.perf_counter() - self.t0,
                "cpu": time.process_time() - self.c0,
                "val_ndcg@10": None if value is None else float(value),
            }
        )
        self._write("timeline.json", self._timeline(trainer, False))

    def on_train_end(self, trainer, pl_module) -> None:
        self._write("timeline.json", self._timeline(trainer, True))

    def on_test_end(self, trainer, pl_module) -> None:
        metrics = {k.removeprefix("test/"): float(v) for k, v in trainer.callback_metrics.items() if "test/" in k}
        self._write("test.json", metrics)


def _minutes_to_max_time(minutes: float) -> str:
    s = max(int(round(minutes * 60)), 1)
    return f"00:{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def write_config(dataset: str, setting: str, seed: int, minutes: float, folder: Path, quick: bool) -> Path:
    """The run's config: the dataset's shipped config with the setting's network, mode, seed and budget."""
    cfg = yaml.safe_load(CONFIGS[dataset].read_text())
    cls, init_args, mode = SETTINGS[setting]
    sched = SCHEDULE[(dataset, mode)]
    cfg["seed_everything"] = seed
    cfg.pop("run_root", None)  # this job's folder is given explicitly below: no run folders inside it
    trainer = cfg["trainer"]
    trainer.update(
        max_epochs=300,
        max_time=_minutes_to_max_time(minutes),
        val_check_interval=sched["val_check_interval"],
        check_val_every_n_epoch=None if isinstance(sched["val_check_interval"], int) else 1,
        enable_progress_bar=False,
        logger=[{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(folder)}}],
        callbacks=[
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {
                    "dirpath": str(folder / "checkpoints"),
                    "filename": "best",
                    "monitor": "val/ndcg@10",
                    "mode": "max",
                    "save_top_k": 1,
                    "save_last": False,
                    "enable_version_counter": False,
                },
            },
            {
                "class_path": "lightning.pytorch.callbacks.EarlyStopping",
                "init_args": {"monitor": "val/ndcg@10", "mode": "max", "patience": sched["patience"]},
            },
            {"class_path": "compare_time_paths.EpochTimer", "init_args": {"folder": str(folder)}},
        ],
    )
    cfg["model"] = {"network": {"class_path": cls, "init_args": dict(init_args)}, "lr": 1.0e-3}
    cfg["data"].update(train_mode=mode, batch_size=sched["batch_size"], data_dir=str(ROOT / "data"))
    if quick:
        trainer.update(limit_train_batches=4, max_epochs=2, val_check_interval=1.0, check_val_every_n_epoch=1)
        cfg["data"]["batch_size"] = 256 if mode == "prefix" else 32
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _cli(*args: str, log: Path) -> int:
    exe = Path(sys.executable).with_name("tim4rec-pl")
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")]))
    with log.open("a") as out:
        return subprocess.run([str(exe), *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT).returncode


def summarise_run(folder: Path) -> dict | None:
    """One finished run: its best validation point, times, epochs and test metrics (None if nothing ran)."""
    meta_path = folder / "run.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    timeline = json.loads((folder / "timeline.json").read_text()) if (folder / "timeline.json").is_file() else {}
    points = [p for p in timeline.get("points", []) if p.get("val_ndcg@10") is not None]
    test = json.loads((folder / "test.json").read_text()) if (folder / "test.json").is_file() else {}
    per_epoch = max(int(timeline.get("batches_per_epoch") or 0), 1)
    best = max(points, key=lambda p: p["val_ndcg@10"]) if points else None
    return {
        **meta,
        "validations": len(points),
        "best_val_ndcg@10": best["val_ndcg@10"] if best else None,
        "wall_to_best": best["wall"] if best else None,
        "cpu_to_best": best["cpu"] if best else None,
        "epochs_to_best": best["step"] / per_epoch if best else None,
        "epochs_run": timeline.get("global_step", 0) / per_epoch if timeline else 0.0,
        "train_wall": timeline.get("wall"),
        "train_cpu": timeline.get("cpu"),
        "batches_per_epoch": timeline.get("batches_per_epoch"),
        "test": test,
    }


def run_one(spec: str, run_dir: Path, quick: bool, results: list[dict]) -> dict | None:
    dataset, setting, seed_s, budget = spec.split(":")
    seed = int(seed_s)
    folder = run_dir / dataset / setting / f"seed{seed}"
    if budget == "auto":  # a tenth of the reference's wall time to its best validation, same dataset and seed
        ref = next((r for r in results if (r["dataset"], r["setting"], r["seed"]) == (dataset, "tim4rec-ref", seed)),
                   None)  # fmt: skip
        if ref is None or ref.get("wall_to_best") is None:
            print(f"skip {spec}: no finished tim4rec-ref run for {dataset} seed {seed} to take a tenth of", flush=True)
            return None
        minutes = ref["wall_to_best"] / 60.0 / 10.0
    else:
        minutes = float(budget)
    if folder.exists():
        for name in ("timeline.json", "test.json", "run.json", "log.txt"):
            (folder / name).unlink(missing_ok=True)
        ckpt = folder / "checkpoints" / "best.ckpt"
        ckpt.unlink(missing_ok=True)
    cfg = write_config(dataset, setting, seed, minutes, folder, quick)
    log = folder / "log.txt"
    print(f"run {spec} ({minutes:.2f} min cap): tim4rec-pl fit --config {cfg.relative_to(ROOT)}", flush=True)
    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    fit_rc = _cli("fit", "--config", str(cfg), log=log)
    test_rc = None
    if (folder / "checkpoints" / "best.ckpt").is_file():
        test_rc = _cli("test", "--config", str(cfg), "--ckpt_path", "best", log=log)
    meta = {
        "dataset": dataset,
        "setting": setting,
        "seed": seed,
        "budget_min": minutes,
        "fit_rc": fit_rc,
        "test_rc": test_rc,
        "elapsed_incl_test": time.perf_counter() - start,
        "load_avg_start": load_before,
        "load_avg_end": os.getloadavg()[0],
        "config": str(cfg.relative_to(ROOT)) if cfg.is_relative_to(ROOT) else str(cfg),
    }
    (folder / "run.json").write_text(json.dumps(meta, indent=1))
    summary = summarise_run(folder)
    print(
        f"  -> rc {fit_rc}/{test_rc}, val NDCG@10 {summary['best_val_ndcg@10']}, test NDCG@10 "
        f"{summary['test'].get('ndcg@10')}, wall to best {summary['wall_to_best']}, epochs {summary['epochs_run']:.2f}",
        flush=True,
    )
    return summary


def _fmt(values: list[float], digits: int = 4) -> str:
    if not values:
        return "—"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def aggregate(results: list[dict]) -> list[dict]:
    """Group runs by (dataset, setting): mean and sample standard deviation over seeds."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["dataset"], r["setting"]), []).append(r)
    order = list(SETTINGS)
    rows = []
    for (dataset, setting), runs in sorted(groups.items(), key=lambda kv: (kv[0][0], order.index(kv[0][1]))):
        done = [r for r in runs if r["test"]]
        row = {"dataset": dataset, "setting": setting, "seeds": [r["seed"] for r in done], "runs": len(runs)}
        for m in METRICS:
            row[m] = [r["test"][m] for r in done if m in r["test"]]
        for key in ("wall_to_best", "cpu_to_best", "epochs_to_best", "epochs_run", "budget_min", "train_wall"):
            row[key] = [r[key] for r in done if r.get(key) is not None]
        rows.append(row)
    return rows


def _per_epoch(throughput: dict, row: dict) -> float | None:
    setting = "tim4rec-causal" if row["setting"] == "tim4rec-causal-10" else row["setting"]
    entry = throughput.get("settings", {}).get(f"{row['dataset']}:{setting}")
    return entry["cpu_per_epoch"] if entry else None


def markdown(rows: list[dict], machine: dict, throughput: dict) -> str:
    head = ["dataset", "model (training)", "seeds"] + [m.upper() for m in METRICS]
    head += ["wall s to best val", "CPU s to best val", "epochs to best / run", "wall cap (min)"]
    head += ["CPU s/epoch side by side", "epochs to best x CPU s/epoch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["dataset"], row["setting"], str(len(row["seeds"]))]
        cells += [_fmt(row[m]) for m in METRICS]
        cells += [_fmt(row["wall_to_best"], 0), _fmt(row["cpu_to_best"], 0)]
        cells += [f"{_fmt(row['epochs_to_best'], 2)} / {_fmt(row['epochs_run'], 2)}", _fmt(row["budget_min"], 1)]
        per_epoch = _per_epoch(throughput, row)
        cells += [_fmt([per_epoch], 1) if per_epoch else "—"]
        cells += [_fmt([e * per_epoch for e in row["epochs_to_best"]], 0) if per_epoch else "—"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Machine: {machine['cpu']} ({machine['cores']} cores, torch {machine['torch']}, "
                 f"{machine['threads']} threads); load average during the runs {machine['load']}.")  # fmt: skip
    if throughput:
        lines.append(f"CPU s/epoch: median CPU seconds of {throughput['steps']} training steps per setting, taken in "
                     f"turn in one process on {throughput['threads']} thread(s), times batches per epoch.")  # fmt: skip
    lines += ["", *conclusions(rows, throughput)]
    return "\n".join(lines) + "\n"


def conclusions(rows: list[dict], throughput: dict) -> list[str]:
    """Per dataset: does the causal path reach the reference's test NDCG@10, and within a tenth of its time?"""
    out = []
    by = {(r["dataset"], r["setting"]): r for r in rows}
    for dataset in sorted({r["dataset"] for r in rows}):
        ref = by.get((dataset, "tim4rec-ref"))
        if not ref or not ref["ndcg@10"]:
            continue
        ref_ndcg, ref_wall = statistics.fmean(ref["ndcg@10"]), statistics.fmean(ref["wall_to_best"])
        for setting in ("tim4rec-causal-10", "tim4rec-causal"):
            row = by.get((dataset, setting))
            if not row or not row["ndcg@10"]:
                continue
            ndcg, wall = statistics.fmean(row["ndcg@10"]), statistics.fmean(row["wall_to_best"])
            verdict = "reaches" if ndcg >= ref_ndcg else "does not reach"
            line = (
                f"- {dataset}: {setting} test NDCG@10 {ndcg:.4f} {verdict} tim4rec-ref's {ref_ndcg:.4f}; its best "
                f"validation came after {wall:.0f} s, {wall / ref_wall:.2f} of the reference's {ref_wall:.0f} s"
            )
            mine, theirs = _per_epoch(throughput, row), _per_epoch(throughput, ref)
            if mine and theirs:
                ratio = (
                    statistics.fmean(row["epochs_to_best"]) * mine / (statistics.fmean(ref["epochs_to_best"]) * theirs)
                )
                line += f"; epochs to best x side-by-side CPU s/epoch: {ratio:.3f} of the reference's"
            out.append(line + ".")
    return out


def machine_info(results: list[dict]) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    loads = [r.get("load_avg_start") for r in results if r.get("load_avg_start") is not None]
    load = f"{min(loads):.1f}-{max(loads):.1f}" if loads else "n/a"
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load": load}  # fmt: skip


def report(run_dir: Path, out_dir: Path, name: str) -> None:
    results = [s for f in sorted(run_dir.glob("*/*/seed*")) if (s := summarise_run(f)) is not None]
    rows = aggregate(results)
    machine = machine_info(results)
    tp_path = out_dir / f"{name.replace('_quick', '')}_throughput.json"
    throughput = json.loads(tp_path.read_text()) if tp_path.is_file() else {}
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine, "runs": results, "table": rows, "throughput": throughput}
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=1))
    text = markdown(rows, machine, throughput)
    (out_dir / f"{name}.md").write_text(text)
    print(text, flush=True)


def measure_throughput(
    datasets: list[str], settings: list[str], steps: int, out_dir: Path, quick: bool, threads: int = 1
) -> dict:
    """Seconds per training step and per epoch of every setting, measured side by side in one process.

    On a shared machine the runs' own clocks differ by whatever else ran at the time; here every setting takes its
    steps in turn (round robin, real batches of the real data, Adam), so all of them meet the same load, on one
    thread, whose CPU seconds measure work rather than OpenMP threads spinning on a busy machine. Multiplied by the
    epochs a run needed to reach its best validation, this gives a load-independent cost to best.
    """
    import torch
    import torch.nn.functional as F

    from tim4rec_pl.data.datamodule import SeqRecDataModule
    from tim4rec_pl.model.sasrec import SASRec
    from tim4rec_pl.model.tim4rec import TiM4Rec

    classes = {TIM4REC: TiM4Rec, SASREC: SASRec}
    torch.set_num_threads(threads)  # one thread: CPU seconds count work, not spinning on a busy machine
    results: dict = {"threads": threads, "steps": steps, "settings": {}}
    for dataset in datasets:
        cfg = yaml.safe_load(CONFIGS[dataset].read_text())
        length = int(cfg["data"]["max_seq_len"])
        jobs = {}
        for setting in settings:
            cls, init_args, mode = SETTINGS[setting]
            batch_size = 256 if quick and mode == "prefix" else SCHEDULE[(dataset, mode)]["batch_size"]
            dm = SeqRecDataModule(dataset=dataset, data_dir=str(ROOT / "data"), max_seq_len=length,
                                  train_mode=mode, batch_size=batch_size, seed=0)  # fmt: skip
            dm.setup("fit")
            loader = dm.train_dataloader()
            batches = [b for _, b in zip(range(steps + 1), loader)]
            torch.manual_seed(0)
            net = classes[cls](dm.num_items, max_seq_len=length, **init_args).train()
            jobs[setting] = (net, torch.optim.Adam(net.parameters(), lr=1e-3), batches, len(loader), [], [])

        def train_step(net, opt, batch) -> None:
            inputs = (batch["item_seq"], batch["item_seq_len"], batch["timestamps"])
            weight = net.item_embedding.weight
            if "targets" in batch:  # as SeqRecModule.training_step
                mask = batch["targets"] > 0
                loss = F.cross_entropy(net.encode(*inputs)[mask] @ weight.T, batch["targets"][mask])
            else:
                loss = F.cross_entropy(net(*inputs) @ weight.T, batch["target"])
            opt.zero_grad()
            loss.backward()
            opt.step()

        for r in range(steps + 1):  # round 0 warms up
            for net, opt, batches, _, walls, cpus in jobs.values():
                t, c = time.perf_counter(), time.process_time()
                train_step(net, opt, batches[r % len(batches)])
                if r:
                    walls.append(time.perf_counter() - t)
                    cpus.append(time.process_time() - c)
            print(f"throughput {dataset}: round {r} done", flush=True)
        for setting, (_, _, _, per_epoch, walls, cpus) in jobs.items():
            wall, cpu = statistics.median(walls), statistics.median(cpus)
            results["settings"][f"{dataset}:{setting}"] = {
                "wall_per_step": wall, "cpu_per_step": cpu, "batches_per_epoch": per_epoch,
                "wall_per_epoch": wall * per_epoch, "cpu_per_epoch": cpu * per_epoch,
            }  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "compare_time_paths_throughput.json"
    if path.is_file():  # keep other datasets' measurements
        results["settings"] = {**json.loads(path.read_text()).get("settings", {}), **results["settings"]}
    path.write_text(json.dumps(results, indent=1))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", nargs="*", help="runs as dataset:setting:seed:minutes (minutes 'auto' for -10)")
    parser.add_argument("--quick", action="store_true", help="smoke run: ML-100K, 4 batches x 2 epochs per run")
    parser.add_argument("--run_dir", type=Path, default=None, help="where run folders go (default runs/compare)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the tables from finished runs")
    parser.add_argument(
        "--throughput",
        nargs="*",
        metavar="DATASET",
        default=None,
        help="measure s/step of every setting side by side on these datasets (then report)",
    )
    parser.add_argument("--throughput_steps", type=int, default=3, help="timed steps per setting (after 1 warm-up)")
    parser.add_argument("--throughput_threads", type=int, default=1, help="torch threads for --throughput")
    args = parser.parse_args(argv)  # fmt: skip
    run_dir = (args.run_dir or ROOT / ("runs/compare-quick" if args.quick else "runs/compare")).resolve()
    name = "compare_time_paths_quick" if args.quick else "compare_time_paths"
    if args.throughput is not None:
        settings = [k for k in SETTINGS if k != "tim4rec-causal-10"]
        datasets = args.throughput or list(CONFIGS)
        measure_throughput(datasets, settings, args.throughput_steps, args.out, args.quick, args.throughput_threads)
        args.report_only = True
    if not args.report_only:
        plan = args.plan or (QUICK_PLAN if args.quick else PLAN)
        for spec in plan:
            if spec.count(":") != 3 or spec.split(":")[1] not in SETTINGS or spec.split(":")[0] not in CONFIGS:
                parser.error(f"bad run {spec!r}: use dataset:setting:seed:minutes with settings {', '.join(SETTINGS)}")
        results = [s for f in sorted(run_dir.glob("*/*/seed*")) if (s := summarise_run(f)) is not None]
        for spec in plan:
            summary = run_one(spec, run_dir, args.quick, results)
            if summary is not None:
                results = [r for r in results if (r["dataset"], r["setting"], r["seed"]) != (
                    summary["dataset"], summary["setting"], summary["seed"])] + [summary]  # fmt: skip
            report(run_dir, args.out, name)
        return
    report(run_dir, args.out, name)


if __name__ == "__main__":
    main()
