"""Streaming inference latency: one `step` per new interaction vs recomputing the user's window.

The network is TiM4Rec with the causal time path in the paper's ML-1M 64d shape (d 64, 2 layers, N 32, P 32,
3,417 items). For each batch size B (users served at once) it measures, interleaved so that a noisy shared machine
hits all of them alike, the median latency of

    step          model.step(state, item, timestamp): one new interaction (the state has a fixed size, so the
                  cost does not depend on how many interactions it holds)
    window 200    model(item_seq, ...) over the last 200 interactions (the training window of ML-1M)
    window 3200   the same over 3,200 interactions

all to the (B, d) user representation (scoring the catalogue is the same matmul for every method, reported apart).

Usage: python benchmarks/streaming.py [--batch 1 64] [--repeats 15] [--threads 1]
Writes benchmarks/results/streaming.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from tim4rec_pl import inference
from tim4rec_pl.model.tim4rec import TiM4Rec

ROOT = Path(__file__).resolve().parents[1]
NUM_ITEMS = 3417


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def bench(batch: int, repeats: int, history: int = 3200, warm: int = 32) -> dict:
    torch.manual_seed(0)
    model = TiM4Rec(NUM_ITEMS, max_seq_len=200, time_path="causal", ssd_backend="torch").eval()
    encoder = inference.for_network(model)  # windows run as validation runs them
    gen = torch.Generator().manual_seed(batch)
    items = torch.randint(1, NUM_ITEMS, (batch, history + repeats + 1), generator=gen)
    ts = (1.0e9 + torch.randint(0, 3600, items.shape, generator=gen).double().cumsum(1)).float()
    lens = {n: torch.full((batch,), n) for n in (200, 3200)}
    with torch.inference_mode():
        state = model.init_state(batch)  # a few real steps first, so the state is not trivially zero
        for t in range(history - warm, history):
            state, _ = model.step(state, items[:, t], ts[:, t], output="repr")
        cursor = {"t": history}

        def one_step() -> None:
            nonlocal state
            t = cursor["t"]
            state, _ = model.step(state, items[:, t], ts[:, t], output="repr")
            cursor["t"] = t + 1 if t + 1 < items.shape[1] else history

        def window(n: int):
            seq, times = items[:, history - n : history], ts[:, history - n : history]
            return lambda: encoder(seq, lens[n], times)

        rep = encoder(items[:, history - 200 : history], lens[200], ts[:, history - 200 : history])
        score = lambda: rep @ model.item_embedding.weight.T  # noqa: E731
        fns = {"step": one_step, "window 200": window(200), "window 3200": window(3200), "score catalogue": score}
        for fn in fns.values():  # warm-up
            fn()
        samples: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(repeats):  # interleaved rounds
            for name, fn in fns.items():
                samples[name].append(_median_ms(fn, 1 if name.startswith("window 32") else 3))
    ms = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "batch": batch,
        "ms": ms,
        "speedup_vs_window_200": ms["window 200"] / ms["step"],
        "speedup_vs_window_3200": ms["window 3200"] / ms["step"],
        "state_floats_per_user": sum(t[0].numel() for t in state.conv + state.ssd) + state.gaps[0].numel(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64], help="users served at once")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved rounds (medians are reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [bench(b, args.repeats) for b in args.batch]
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]  # fmt: skip
        cpu = names[0] if names else cpu
    machine = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "load_avg": os.getloadavg()[0]}  # fmt: skip
    lines = [
        "| users B | step (ms) | window 200 (ms) | window 3200 (ms) | step vs 200 | step vs 3200 | score items (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = r["ms"]
        lines.append(
            f"| {r['batch']} | {ms['step']:.2f} | {ms['window 200']:.2f} | {ms['window 3200']:.1f} | "
            f"{r['speedup_vs_window_200']:.1f}x | {r['speedup_vs_window_3200']:.0f}x | {ms['score catalogue']:.2f} |"
        )
    lines += [
        "",
        f"TiM4Rec causal, ML-1M 64d shape, {NUM_ITEMS} items, eval, torch backend. State per user: "
        f"{rows[0]['state_floats_per_user']} floats whatever the history length. Machine: {machine['cpu']}, "
        f"{machine['cores']} cores, {machine['threads']} torch threads, torch {machine['torch']}, "
        f"load average {machine['load_avg']:.1f} (shared machine: medians of interleaved rounds).",
    ]
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "streaming.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    (args.out / "streaming.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
