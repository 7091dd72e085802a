"""Data preparation on the real ML-1M file: tim4rec-pl (polars) side by side with RecBole.

Times each stage of our pipeline (read, filter, remap, sort, arrays, training index) and its peak memory, each
repeat in a fresh process, then RecBole 1.2.1's ``create_dataset + data_preparation`` on the same file in its own
virtual environment, and prints the ratio. It also checks that both agree on every user's validation and test
target (docs/data.md: float32 sorting reproduces RecBole; exact sorting does not) and on the training sample count.
Results go to ``benchmarks/results/data_prep.json`` and ``.md`` (git-ignored).

Usage::

    .venv/bin/python benchmarks/data_prep.py --recbole-python /tmp/rbenv/bin/python [--data_dir data] [--repeats 3]

Without ``--recbole-python`` (or when that interpreter is missing) the RecBole half is skipped with a message.
The ML-1M file comes from the dataset registry (``tim4rec-pl data prepare --dataset ml-1m`` fetches it).

The RecBole environment (RecBole 1.2.1 needs NumPy < 2; the other packages are what its import path needs)::

    python3 -m venv /tmp/rbenv
    /tmp/rbenv/bin/pip install torch==2.13.0
    /tmp/rbenv/bin/pip install --no-deps recbole==1.2.1
    /tmp/rbenv/bin/pip install "numpy<2" "pandas<2.2" "scipy<1.14" "scikit-learn<1.6" tqdm colorlog==4.7.2 \\
        colorama==0.4.4 pyyaml texttable psutil tabulate tensorboard
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "results"
MAX_SEQ_LEN = 200  # the paper's ML-1M setting; RecBole materialises histories of this length


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# --- our pipeline, one run per process ----------------------------------------------------------------------------


def ours_worker(file: str, ends_out: str | None) -> dict:
    import numpy as np

    from tim4rec_pl.data.prepare import ProtocolConfig, filter_interactions, remap, sort_interactions, to_prepared
    from tim4rec_pl.data.sources import read_interactions

    base = rss_mib()
    protocol, times = ProtocolConfig(), {}
    t = time.perf_counter()
    frame, _ = read_interactions(file)
    times["read"], t = time.perf_counter() - t, time.perf_counter()
    frame, _ = filter_interactions(frame, protocol)
    times["filter"], t = time.perf_counter() - t, time.perf_counter()
    frame = remap(frame)
    times["remap"], t = time.perf_counter() - t, time.perf_counter()
    frame = sort_interactions(frame, protocol.time_sort)
    times["sort"], t = time.perf_counter() - t, time.perf_counter()
    data = to_prepared(frame)
    times["arrays"], t = time.perf_counter() - t, time.perf_counter()
    # the training index of the DataModule (prefix mode): targets o+1 .. o+n-3 of every user (docs/data.md)
    count = np.maximum(np.diff(data.offsets) - 3, 0)
    within = np.arange(int(count.sum()), dtype=np.int64) - np.repeat(np.cumsum(count) - count, count)
    ends = np.repeat(data.offsets[:-1] + 1, count) + within
    times["train_index"] = time.perf_counter() - t
    times["total"] = sum(times.values())
    if ends_out:
        np.save(ends_out, ends)
    return {"times": times, "rss_base_mib": base, "rss_peak_mib": rss_mib(), "train_samples": len(ends),
            "stats": data.stats}  # fmt: skip


def cache_worker(file: str, data_dir: str) -> dict:
    """Cold load_or_prepare (read + protocol + sha256 + write) and then a warm one (verify + read the cache)."""
    from tim4rec_pl.data.prepare import ProtocolConfig, SourceConfig, load_or_prepare

    source, protocol = SourceConfig(path=file), ProtocolConfig()
    t = time.perf_counter()
    load_or_prepare(source, protocol, data_dir, progress=False)
    cold = time.perf_counter() - t
    t = time.perf_counter()
    load_or_prepare(source, protocol, data_dir, progress=False)
    return {"cold_s": cold, "warm_s": time.perf_counter() - t}


# --- RecBole, run by the RecBole interpreter -----------------------------------------------------------------------


def recbole_worker(inter_file: str, targets_out: str) -> dict:
    import logging

    t = time.perf_counter()
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation

    import_s, base = time.perf_counter() - t, rss_mib()
    path = Path(inter_file)
    config = Config(
        model="SASRec",
        dataset=path.stem,
        config_dict={
            "data_path": str(path.parent.parent),
            "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
            "user_inter_num_interval": "[5,inf)",
            "item_inter_num_interval": "[5,inf)",
            "MAX_ITEM_LIST_LENGTH": MAX_SEQ_LEN,
            "train_neg_sample_args": None,
            "loss_type": "CE",
            "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
            "show_progress": False,
            "use_gpu": False,
            "save_dataset": False,
            "save_dataloaders": False,
            "state": "ERROR",
        },
    )
    logging.disable(logging.CRITICAL)
    t = time.perf_counter()
    dataset = create_dataset(config)
    create_s, t = time.perf_counter() - t, time.perf_counter()
    train, valid, test = data_preparation(config, dataset)
    prep_s = time.perf_counter() - t
    peak = rss_mib()
    targets = {}
    for split, loader in (("valid", valid), ("test", test)):
        feat = loader._dataset.inter_feat
        users = dataset.id2token("user_id", feat["user_id"].numpy())
        items = dataset.id2token("item_id", feat["item_id"].numpy())
        targets[split] = dict(zip(users.tolist(), items.tolist()))
    Path(targets_out).write_text(json.dumps(targets))
    return {
        "times": {"create_dataset": create_s, "data_preparation": prep_s, "total": create_s + prep_s},
        "import_s": import_s,
        "rss_base_mib": base,
        "rss_peak_mib": peak,
        "train_samples": len(train._dataset.inter_feat),
        "users": dataset.user_num - 1,
        "items": dataset.item_num - 1,
    }


# --- driver --------------------------------------------------------------------------------------------------------


def run_json(cmd: list[str], cwd: str | None = None) -> dict:
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def our_targets(file: Path, time_sort: str, data_dir: str) -> dict[str, dict[str, str]]:
    from tim4rec_pl.data.prepare import ProtocolConfig, SourceConfig, load_or_prepare

    data = load_or_prepare(SourceConfig(path=str(file)), ProtocolConfig(time_sort=time_sort), data_dir, progress=False)
    out: dict[str, dict[str, str]] = {"valid": {}, "test": {}}
    for u, token in enumerate(data.user_tokens):
        end = int(data.offsets[u + 1])
        out["valid"][token] = data.item_tokens[data.items[end - 2]]
        out["test"][token] = data.item_tokens[data.items[end - 1]]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default="data", help="registry data folder (ML-1M is fetched there if missing)")
    parser.add_argument("--recbole-python", help="python of a virtual environment with recbole==1.2.1")
    parser.add_argument("--repeats", type=int, default=3, help="fresh-process repeats of each side (median reported)")
    parser.add_argument("--ours-worker", nargs=2, metavar=("FILE", "ENDS_NPY"), help=argparse.SUPPRESS)
    parser.add_argument("--cache-worker", nargs=2, metavar=("FILE", "DATA_DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--recbole-worker", nargs=2, metavar=("INTER", "TARGETS_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ours_worker:
        return print(json.dumps(ours_worker(*args.ours_worker)))
    if args.cache_worker:
        return print(json.dumps(cache_worker(*args.cache_worker)))
    if args.recbole_worker:
        return print(json.dumps(recbole_worker(*args.recbole_worker)))

    import numpy as np

    from tim4rec_pl.data.sources import find_or_fetch

    file, _ = find_or_fetch("ml-1m", args.data_dir)
    print(f"ML-1M source: {file}")
    result: dict = {"file": str(file), "max_seq_len": MAX_SEQ_LEN, "repeats": args.repeats}
    with tempfile.TemporaryDirectory() as tmp:
        ours = [run_json([sys.executable, str(HERE), "--ours-worker", str(file), f"{tmp}/ends.npy"])
                for _ in range(args.repeats)]  # fmt: skip
        stages = {k: statistics.median(r["times"][k] for r in ours) for k in ours[0]["times"]}
        result["ours"] = {"times_s": stages, "rss_peak_mib": max(r["rss_peak_mib"] for r in ours),
                          "rss_base_mib": ours[0]["rss_base_mib"], "train_samples": ours[0]["train_samples"],
                          "stats": ours[0]["stats"]}  # fmt: skip
        cache = run_json([sys.executable, str(HERE), "--cache-worker", str(file), f"{tmp}/cache"])
        result["ours"]["load_or_prepare_cold_s"], result["ours"]["load_or_prepare_warm_s"] = cache.values()
        try:  # the index built here is the DataModule's own
            from tim4rec_pl.data.datamodule import split_ends
            from tim4rec_pl.data.prepare import ProtocolConfig, SourceConfig, load_or_prepare

            data = load_or_prepare(SourceConfig(path=str(file)), ProtocolConfig(), f"{tmp}/cache", progress=False)
            ends, _ = split_ends(data.offsets, "train", MAX_SEQ_LEN)
            result["ours"]["train_index_equals_datamodule"] = bool(np.array_equal(ends, np.load(f"{tmp}/ends.npy")))
        except ImportError:
            result["ours"]["train_index_equals_datamodule"] = None

        rb_python = args.recbole_python
        if not rb_python or not Path(rb_python).exists():
            print("RecBole comparison skipped: pass --recbole-python PATH (see this script's docstring)")
        else:
            inter = file
            if file.suffix != ".inter":  # RecBole reads atomic files only
                from tim4rec_pl.data.sources import read_interactions

                inter = Path(tmp) / "ml-1m" / "ml-1m.inter"
                inter.parent.mkdir()
                frame = read_interactions(file)[0].rename({"user": "user_id:token", "item": "item_id:token",
                                                           "timestamp": "timestamp:float"})  # fmt: skip
                frame.write_csv(inter, separator="\t", quote_style="never")
            runs = []
            for i in range(args.repeats):
                work = Path(tmp) / f"recbole-{i}"  # RecBole writes log/ and saved/ into its working folder
                work.mkdir()
                cmd = [rb_python, str(HERE), "--recbole-worker", str(inter), f"{tmp}/targets.json"]
                runs.append(run_json(cmd, cwd=str(work)))
            times = {k: statistics.median(r["times"][k] for r in runs) for k in runs[0]["times"]}
            result["recbole"] = {k: v for k, v in runs[0].items() if k != "times"} | {
                "times_s": times, "rss_peak_mib": max(r["rss_peak_mib"] for r in runs)}  # fmt: skip
            result["ratio_recbole_over_ours"] = times["total"] / stages["total"]
            theirs = json.loads(Path(f"{tmp}/targets.json").read_text())
            for time_sort in ("float32", "exact"):
                mine = our_targets(file, time_sort, f"{tmp}/cache")
                result[f"target_mismatches_{time_sort}"] = {
                    split: sum(mine[split].get(u) != item for u, item in theirs[split].items()) for split in theirs
                } | {"users": len(theirs["test"])}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "data_prep.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (RESULTS / "data_prep.md").write_text(table + "\n")
    print(table)


def markdown(r: dict) -> str:
    o = r["ours"]
    lines = ["| step | tim4rec-pl (s) |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in o["times_s"].items()]
    cold, warm = o["load_or_prepare_cold_s"], o["load_or_prepare_warm_s"]
    lines += [f"| load_or_prepare cold (with sha256 + cache write) / warm | {cold:.3f} / {warm:.3f} |",
              f"| peak RSS (MiB; after imports {o['rss_base_mib']:.0f}) | {o['rss_peak_mib']:.0f} |",
              f"| training samples | {o['train_samples']:,} |"]  # fmt: skip
    if "recbole" in r:
        b = r["recbole"]
        lines += ["", "| RecBole 1.2.1 | value |", "|---|---|"]
        lines += [f"| {k} (s) | {v:.3f} |" for k, v in b["times_s"].items()]
        lines += [f"| peak RSS (MiB; after imports {b['rss_base_mib']:.0f}) | {b['rss_peak_mib']:.0f} |",
                  f"| training samples | {b['train_samples']:,} |",
                  f"| **RecBole / tim4rec-pl time** | **{r['ratio_recbole_over_ours']:.1f}x** |",
                  f"| target mismatches, float32 sort (valid / test of users) | "
                  f"{r['target_mismatches_float32']['valid']} / {r['target_mismatches_float32']['test']} of "
                  f"{r['target_mismatches_float32']['users']} |",
                  f"| target mismatches, exact sort (valid / test) | {r['target_mismatches_exact']['valid']} / "
                  f"{r['target_mismatches_exact']['test']} |"]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
