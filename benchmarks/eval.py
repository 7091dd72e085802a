"""Full-ranking evaluation speed and memory: users per second, and peak memory that the item blocks keep bounded.

Two measurements, each in a fresh process (so that peak memory belongs to that measurement alone):

1. **ML-1M-sized** (6,040 users, 3,416 items, L = 200, TiM4Rec 64d with the paper's ML-1M setting): what one
   validation pass costs, i.e. network forward + :func:`tim4rec_pl.metrics.full_ranks`, on synthetic histories
   (random items, increasing timestamps, window lengths drawn between 20 and 200 with a third at full length).
2. **A 1,000,000-item catalogue**, ranking only (random 64-d user and item vectors): ``full_ranks`` for several
   ``eval_block_size`` values, and ``topk_items`` (what ``predict`` uses) for one, with the peak memory above the
   item table. The largest block size is the whole catalogue in one matmul, i.e. what evaluation without blocks
   would cost; smaller blocks bound the score buffer to (users per batch) x (block) floats.

Peak memory: on CPU the growth of the process's peak RSS during the measurement (reset at its start on Linux); on
CUDA the growth of ``torch.cuda.max_memory_allocated``. Results go to ``benchmarks/results/eval.json`` and ``eval.md``
(git-ignored) and the markdown table is printed.

Usage::

    .venv/bin/python benchmarks/eval.py                       # CPU, defaults below
    .venv/bin/python benchmarks/eval.py --device cuda --batch 2048 --big_batch 2048
    .venv/bin/python benchmarks/eval.py --skip_model          # only the 1M-item ranking part
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "results"


def _proc_status_mib(key: str) -> float | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB
    return None


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to /proc/self/clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


class PeakMemory:
    """Peak memory growth (MiB) between ``start()`` and ``stop()``: CUDA allocator, or the process's peak RSS.

    On Linux the peak RSS is reset at ``start()``, so a larger peak before (imports, building the inputs) cannot hide
    the measured one; elsewhere ``ru_maxrss`` is used and a growth of 0 means "no higher than before".
    """

    def __init__(self, device: str) -> None:
        self.device = device

    def start(self) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
        elif _reset_peak_rss() and _proc_status_mib("VmRSS") is not None:
            self.base, self.key = _proc_status_mib("VmRSS"), "VmHWM"
        else:
            self.base, self.key = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, None  # Linux: KiB

    def stop(self) -> float:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20 - self.base
        peak = _proc_status_mib(self.key) if self.key else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return peak - self.base


# --- workers (one per process) ------------------------------------------------------------------------------------


def model_worker(args: argparse.Namespace) -> dict:
    """ML-1M-sized validation pass: TiM4Rec forward + full_ranks over every user, in batches."""
    import torch

    from tim4rec_pl import inference
    from tim4rec_pl.metrics import full_ranks
    from tim4rec_pl.model.tim4rec import TiM4Rec

    torch.manual_seed(0)
    dev, users, items, L = args.device, args.users, args.items, args.seq_len
    net = TiM4Rec(num_items=items + 1, max_seq_len=L).to(dev).eval()  # the paper's ML-1M 64d defaults
    encoder = inference.for_network(net)  # what validation runs
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(20, L + 1, (users,), generator=gen)  # (U,)
    lengths[torch.rand(users, generator=gen) < 1 / 3] = L  # long ML-1M histories fill the window
    steps = torch.arange(L)
    pad = steps >= lengths[:, None]  # (U, L)
    item_seq = torch.randint(1, items + 1, (users, L), generator=gen).masked_fill_(pad, 0)  # (U, L)
    gaps = torch.randint(0, 3600, (users, L), generator=gen).float()
    timestamps = (9.6e8 + torch.cumsum(gaps, 1)).masked_fill_(pad, 0.0)  # (U, L) float32 seconds
    target = torch.randint(1, items + 1, (users,), generator=gen)  # (U,)
    weight = net.item_embedding.weight
    batches = [slice(s, min(s + args.batch, users)) for s in range(0, users, args.batch)]

    def one_batch(sl: slice) -> tuple[float, float]:
        seq, ln, ts, tg = (t[sl].to(dev) for t in (item_seq, lengths, timestamps, target))
        t0 = time.perf_counter()
        repr_ = encoder(seq, ln, ts)  # (B, d)
        _sync(dev)
        t1 = time.perf_counter()
        full_ranks(repr_, weight, tg, args.block)
        _sync(dev)
        return t1 - t0, time.perf_counter() - t1

    with torch.no_grad():
        mem = PeakMemory(dev)
        mem.start()  # after the model and the histories exist: what remains is activations and scores
        one_batch(batches[0])  # warm-up (allocator, kernels)
        runs = []
        for _ in range(args.repeats):
            parts = [one_batch(sl) for sl in batches]
            runs.append((sum(p[0] for p in parts), sum(p[1] for p in parts)))
        peak = mem.stop()
    forward, ranking = min(r[0] for r in runs), min(r[1] for r in runs)  # best of repeats: least disturbed
    return {
        "users": users, "items": items, "seq_len": L, "batch": args.batch, "block": args.block,
        "forward_s": forward, "ranking_s": ranking, "total_s": forward + ranking,
        "users_per_s": users / (forward + ranking), "ranking_users_per_s": users / ranking,
        "peak_extra_mib": peak, "repeats": args.repeats,
    }  # fmt: skip


def ranking_worker(args: argparse.Namespace) -> dict:
    """full_ranks (or topk_items) of random users against a random catalogue of ``args.big_items`` items."""
    import torch

    from tim4rec_pl.metrics import full_ranks, topk_items

    dev, n, d, B = args.device, args.big_items, args.dim, args.big_batch
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(n + 1, d, generator=gen).mul_(0.02).to(dev)  # (n + 1, d); row 0 = padding
    user_repr = torch.randn(args.big_users, d, generator=gen).to(dev)  # (U, d)
    target = torch.randint(1, n + 1, (args.big_users,), generator=gen).to(dev)  # (U,)
    batches = [slice(s, min(s + B, args.big_users)) for s in range(0, args.big_users, B)]

    def run_all() -> None:
        for sl in batches:
            if args.op == "rank":
                full_ranks(user_repr[sl], weight, target[sl], args.block)
            else:
                topk_items(user_repr[sl], weight, args.k, block_size=args.block)
        _sync(dev)

    with torch.no_grad():
        mem = PeakMemory(dev)
        mem.start()  # after the item table exists: what remains is the evaluation's own memory
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            run_all()
            times.append(time.perf_counter() - t0)
        peak = mem.stop()
    best = min(times)
    return {
        "op": args.op, "items": n, "dim": d, "users": args.big_users, "batch": B, "block": args.block,
        "k": args.k if args.op == "topk" else None, "seconds": best, "median_s": statistics.median(times),
        "users_per_s": args.big_users / best, "peak_extra_mib": peak,
        "score_buffer_mib": B * min(args.block, n) * 4 / 2**20, "item_table_mib": (n + 1) * d * 4 / 2**20,
    }  # fmt: skip


# --- driver -------------------------------------------------------------------------------------------------------


def in_fresh_process(worker: str, args: argparse.Namespace, **overrides) -> dict:
    argv = [sys.executable, str(HERE), "--_worker", worker]
    for key, value in {**vars(args), **overrides}.items():
        if key.startswith("_") or key in ("skip_model", "skip_ranking", "blocks"):
            continue
        argv += [f"--{key}", str(value)]
    res = subprocess.run(argv, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{worker} worker failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def markdown(model: dict | None, ranking: list[dict], args: argparse.Namespace) -> str:
    lines = [f"Device: {args.device} ({platform.processor() or platform.machine()}, torch threads "
             f"{args.threads or 'default'}).", ""]  # fmt: skip
    if model:
        lines += [
            f"**ML-1M-sized validation pass** ({model['users']:,} users, {model['items']:,} items, L = "
            f"{model['seq_len']}, TiM4Rec 64d, batch {model['batch']}, best of {model['repeats']}):",
            "",
            "| part | seconds | users / s |",
            "|---|---:|---:|",
            f"| network forward | {model['forward_s']:.2f} | {model['users'] / model['forward_s']:,.0f} |",
            f"| full ranking (exact ranks) | {model['ranking_s']:.3f} | {model['ranking_users_per_s']:,.0f} |",
            f"| **total** | **{model['total_s']:.2f}** | **{model['users_per_s']:,.0f}** |",
            "",
            f"Peak memory above the model: {model['peak_extra_mib']:,.0f} MiB.",
            "",
        ]
    if ranking:
        r0 = ranking[0]
        lines += [
            f"**{r0['items']:,}-item catalogue, ranking only** ({r0['users']:,} users in batches of {r0['batch']}, "
            f"d = {r0['dim']}; item table {r0['item_table_mib']:,.0f} MiB, not counted below):",
            "",
            "| operation | eval_block_size | users / s | peak extra MiB | score buffer MiB |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in ranking:
            op = "full_ranks" if r["op"] == "rank" else f"topk_items (k = {r['k']})"
            block = f"{r['block']:,}" + (" (one block)" if r["block"] >= r["items"] else "")
            lines.append(f"| {op} | {block} | {r['users_per_s']:,.0f} | {r['peak_extra_mib']:,.0f} | "
                         f"{r['score_buffer_mib']:,.0f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--users", type=int, default=6040, help="ML-1M-sized part: users")
    p.add_argument("--items", type=int, default=3416, help="ML-1M-sized part: items (without padding)")
    p.add_argument("--seq_len", type=int, default=200, help="ML-1M-sized part: window L")
    p.add_argument("--batch", type=int, default=512, help="ML-1M-sized part: users per batch")
    p.add_argument("--block", type=int, default=65536, help="eval_block_size (ML-1M part; worker)")
    p.add_argument("--repeats", type=int, default=1, help="timed passes (the best is reported)")
    p.add_argument("--big_items", type=int, default=1_000_000, help="large catalogue: items")
    p.add_argument("--big_users", type=int, default=512, help="large catalogue: users ranked")
    p.add_argument("--big_batch", type=int, default=256, help="large catalogue: users per batch")
    p.add_argument("--dim", type=int, default=64, help="large catalogue: embedding size")
    p.add_argument("--blocks", default="16384,65536,262144,1000000", help="large catalogue: block sizes to try")
    p.add_argument("--k", type=int, default=10, help="top-K for the topk_items row")
    p.add_argument("--op", default="rank", help=argparse.SUPPRESS)
    p.add_argument("--skip_model", action="store_true", help="skip the ML-1M-sized model part")
    p.add_argument("--skip_ranking", action="store_true", help="skip the large-catalogue part")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._worker:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        worker = {"model": model_worker, "ranking": ranking_worker}[args._worker]
        print(json.dumps(worker(args)))
        return

    model = None
    if not args.skip_model:
        print(f"ML-1M-sized pass: {args.users} users x L={args.seq_len} on {args.device} ...", flush=True)
        model = in_fresh_process("model", args)
    ranking = []
    if not args.skip_ranking:
        blocks = [int(b) for b in args.blocks.split(",")]
        for block in blocks:
            print(f"{args.big_items:,} items, full_ranks, block {block:,} ...", flush=True)
            ranking.append(in_fresh_process("ranking", args, block=block, op="rank"))
        print(f"{args.big_items:,} items, topk_items, block {blocks[1 if len(blocks) > 1 else 0]:,} ...", flush=True)
        ranking.append(in_fresh_process("ranking", args, block=blocks[1 if len(blocks) > 1 else 0], op="topk"))
    table = markdown(model, ranking, args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"args": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "model": model,
              "ranking": ranking, "torch_threads": args.threads or None, "machine": platform.platform()}  # fmt: skip
    (RESULTS / "eval.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / "eval.md").write_text(table)
    print()
    print(table)
    print(f"written: {RESULTS / 'eval.json'}, {RESULTS / 'eval.md'}")


if __name__ == "__main__":
    main()
