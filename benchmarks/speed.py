"""Training and inference speed of TiM4Rec, SSD4Rec* and SASRec side by side, against the window length L.

For each L (default 50, 200, 800, 3200) and each model (d = 64, 2 layers, the paper's ML-1M settings; SASRec with
RecBole's settings), on one device and in one process, with the models' turns interleaved over the repeats:

- training samples/s: forward + backward + Adam step of a batch of ``--batch-size`` samples (default 256). A batch
  runs as micro-batches of at most ``--micro-tokens`` tokens (gradients accumulate; the same gradient as the whole
  batch), so long windows fit in memory. ``--quick`` times only the first two micro-batches of each batch and adds
  one measured optimiser step: samples/s = batch / (batch x seconds per micro-batch sample + optimiser step);
- inference sequences/s: eval mode, the sequence representation and its rank among all items (full ranking, the
  code validation runs);
- peak memory of a training micro-batch above the resting model and optimiser state (CUDA: the allocator's peak;
  CPU: the peak resident set, reset before each measurement), per sample.

Synthetic data with ML-1M's catalogue (3,416 items + padding), full windows, increasing Unix timestamps. Results:
``<out>.json``, a markdown table ``<out>.md`` (ratios against SASRec, growth exponents of cost in L between the two
longest windows, the CPU speed targets) and a log-log plot ``<out>.png``. The process uses the same OpenMP/malloc
settings as the ``tim4rec-pl`` command (``tim4rec_pl.cpu_runtime``; ``--no-tuning`` switches them off).

Models: ``tim4rec`` (faithful time path), ``ssd4rec`` (time path off), ``sasrec`` (RecBole settings: attention
dropout 0.5, which PyTorch runs on the math attention path on CPU) and ``sasrec-flash`` (attention dropout 0, so
``scaled_dot_product_attention`` uses its fused flash kernel: the fastest attention baseline). On CUDA with mamba-ssm
installed, ``tim4rec-triton`` and ``ssd4rec-triton`` are added (``ssd_backend: triton``). ``--compile`` and
``--bf16`` add ``+compile`` (torch.compile) and ``+bf16`` (bfloat16 autocast) variants of the chosen models.

Usage::

    .venv/bin/python benchmarks/speed.py --quick            # CPU: under 10 minutes
    .venv/bin/python benchmarks/speed.py --device cuda      # whole batches, GPU, Triton rows added
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
NUM_ITEMS = 3417  # ML-1M after 5-core: 3,416 items + the padding item 0
BASE_MODELS = ("tim4rec", "ssd4rec", "sasrec", "sasrec-flash")
REFERENCE = "sasrec"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller micro-batches, 2 timed micro-batches per step")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    p.add_argument("--lengths", type=int, nargs="+", default=[50, 200, 800, 3200], help="window lengths L")
    p.add_argument("--batch-size", type=int, default=256, help="training and inference batch")
    p.add_argument("--models", nargs="+", default=list(BASE_MODELS), choices=BASE_MODELS)
    p.add_argument("--compile", action="store_true", help="add torch.compile variants")
    p.add_argument("--bf16", action="store_true", help="add bfloat16-autocast variants")
    p.add_argument(
        "--sliced-baseline",
        action="store_true",
        help="add sasrec+slices: SASRec inference with TiM4Rec's batch slices side by side "
        "(tim4rec_pl.inference.parallel)",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per model and L (default 3; quick 2)")
    p.add_argument(
        "--memory-gib",
        type=float,
        default=None,
        help="memory budget of a micro-batch's activations (default: 2 on CPU, 16 on CUDA)",
    )
    p.add_argument("--probe-tokens", type=int, default=6400, help="tokens of the micro-batch that measures memory")
    p.add_argument("--timed-micro", type=int, default=None, help="micro-batches timed per step (default all; quick 1)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--no-tuning", action="store_true", help="without the CLI's OpenMP/malloc settings")
    p.add_argument("--out", default=str(HERE / "results" / "speed"), help="output path without extension")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.timed_micro = args.timed_micro or (1 if args.quick else 10**9)
    return args


@dataclass
class Variant:
    name: str
    base: str
    backend: str = "torch"
    compile: bool = False
    bf16: bool = False
    sliced: bool = False  # inference in batch slices side by side (TiM4Rec does this itself)
    runs: dict = field(default_factory=dict)


def make_variants(args: argparse.Namespace, device) -> list[Variant]:
    from tim4rec_pl.model.ssd import _mamba_available

    out = [Variant(m, m) for m in args.models]
    if device.type == "cuda" and _mamba_available():
        out += [Variant(f"{m}-triton", m, backend="triton") for m in args.models if m in ("tim4rec", "ssd4rec")]
    base = list(out)
    if args.compile:
        out += [Variant(f"{v.name}+compile", v.base, v.backend, compile=True) for v in base]
    if args.sliced_baseline and "sasrec" in args.models:
        out.append(Variant("sasrec+slices", "sasrec", sliced=True))
    if args.bf16:
        out += [Variant(f"{v.name}+bf16", v.base, v.backend, bf16=True) for v in base]
    return out


def build(variant: Variant, length: int, device):
    import torch

    from tim4rec_pl import inference
    from tim4rec_pl.model.sasrec import SASRec
    from tim4rec_pl.model.tim4rec import TiM4Rec

    torch.manual_seed(0)
    if variant.base in ("tim4rec", "ssd4rec"):  # the paper's ML-1M 64d setting: the constructor defaults
        net = TiM4Rec(NUM_ITEMS, max_seq_len=length, is_time=variant.base == "tim4rec", ssd_backend=variant.backend)
    else:  # RecBole's SASRec: 2 layers, 2 heads, d 64, inner 256, dropout 0.5, attention dropout 0.5
        net = SASRec(NUM_ITEMS, max_seq_len=length, attn_dropout=0.0 if variant.base == "sasrec-flash" else 0.5)
    net = net.to(device)
    fn = torch.compile(net) if variant.compile else net
    # Inference runs what validation runs: the network's inference encoder (tim4rec_pl.inference), or the compiled
    # network itself for +compile variants.
    infer = fn if variant.compile else inference.for_network(net)
    if variant.sliced:
        from tim4rec_pl.inference import parallel

        def fn(item_seq, item_seq_len, timestamps, _net=net):
            ranges = parallel.slices(item_seq.shape[0], item_seq.shape[1], item_seq.device)
            return parallel.run_sliced(_net, ranges, item_seq, item_seq_len, timestamps)

        infer = fn
    return net, fn, torch.optim.Adam(net.parameters(), lr=1e-3), infer


def synthetic_batch(n: int, length: int, device, seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    gaps = torch.distributions.Exponential(1 / 3600.0).sample((n, length))  # seconds between interactions
    return {
        "item_seq": torch.randint(1, NUM_ITEMS, (n, length), generator=g).to(device),  # (n, L)
        "item_seq_len": torch.full((n,), length, dtype=torch.long, device=device),  # (n,)
        "timestamps": (1.0e9 + gaps.double().cumsum(1)).float().to(device),  # (n, L) float32 seconds
        "target": torch.randint(1, NUM_ITEMS, (n,), generator=g).to(device),  # (n,)
    }


def chunk(batch: dict, start: int, size: int) -> dict:
    return {k: v[start : start + size] for k, v in batch.items()}


def micro_size(batch: int, per_sample: float, budget: float) -> int:
    """The largest of batch, batch/2, batch/4, ... (rounded up) whose cost per_sample x size fits the budget."""
    mb = batch
    while mb > 1 and mb * per_sample > budget:
        mb = -(-mb // 2)
    return mb


class Clock:
    """Wall time with device synchronisation."""

    def __init__(self, device) -> None:
        import torch

        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def __call__(self) -> float:
        self.sync()
        return time.perf_counter()


def autocast(variant: Variant, device):
    import contextlib

    import torch

    if not variant.bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def train_micro(variant: Variant, net, fn, mb: dict, total: int) -> None:
    """Forward + backward of one micro-batch; the loss is weighted so that the gradients sum to the batch mean."""
    import torch.nn.functional as F

    with autocast(variant, mb["item_seq"].device):
        logits = fn(mb["item_seq"], mb["item_seq_len"], mb["timestamps"]) @ net.item_embedding.weight.T  # (n, I)
        loss = F.cross_entropy(logits.float(), mb["target"]) * (len(mb["target"]) / total)
    loss.backward()


def time_train(variant: Variant, net, fn, opt, batch: dict, mb_size: int, timed_micro: int, clock: Clock) -> dict:
    """Seconds per training step of the whole batch (measured, or from `timed_micro` micro-batches + the step)."""
    n = len(batch["target"])
    starts = list(range(0, n, mb_size))
    timed = starts[: max(1, timed_micro)]
    net.train()
    t0 = clock()
    for s in timed:
        train_micro(variant, net, fn, chunk(batch, s, mb_size), n)
    t1 = clock()
    opt.step()
    opt.zero_grad(set_to_none=True)
    t2 = clock()
    samples = sum(min(mb_size, n - s) for s in timed)
    per_sample = (t1 - t0) / samples
    return {
        "step_s": per_sample * n + (t2 - t1),
        "micro_s_per_sample": per_sample,
        "optimizer_s": t2 - t1,
        "timed_samples": samples,
    }


def time_infer(variant: Variant, net, fn, batch: dict, mb_size: int, timed_micro: int, clock: Clock) -> float:
    """Seconds per sequence of full-ranking inference."""
    import torch

    from tim4rec_pl.metrics import full_ranks

    n = len(batch["target"])
    starts = list(range(0, n, mb_size))[: max(1, timed_micro)]
    net.eval()
    t0 = clock()
    with torch.inference_mode(), autocast(variant, batch["target"].device):
        for s in starts:
            mb = chunk(batch, s, mb_size)
            user = fn(mb["item_seq"], mb["item_seq_len"], mb["timestamps"])  # (n, d)
            full_ranks(user.float(), net.item_embedding.weight, mb["target"])
    t1 = clock()
    net.train()
    return (t1 - t0) / sum(min(mb_size, n - s) for s in starts)


class PeakMemory:
    """Peak memory above the current level during a block: CUDA allocator peak, or the CPU resident-set peak."""

    def __init__(self, device) -> None:
        self.device = device

    def __enter__(self) -> PeakMemory:
        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            from tim4rec_pl.cpu_runtime import release_free_memory

            release_free_memory()  # freed heap back to the OS, so that the resident set is what is live
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the resident-set high-water mark (VmHWM) to the current resident set
            self.base = _proc_status("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = _proc_status("VmHWM") - self.base


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def memory_supported(device) -> bool:
    if device.type == "cuda":
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def activation_memory(
    variant: Variant, net, fn, opt, infer, batch: dict, size: int, infer_size: int, device
) -> tuple[float, float]:
    """Peak bytes per sample above the resting state: a training micro-batch (gradient buffers already allocated,
    as for every micro-batch after a step's first), and an inference batch."""
    n = len(batch["target"])
    mb = chunk(batch, 0, size)
    net.train()
    train_micro(variant, net, fn, mb, n)  # allocates the gradient buffers
    with PeakMemory(device) as m_train:
        train_micro(variant, net, fn, mb, n)
    opt.zero_grad(set_to_none=True)
    with PeakMemory(device) as m_infer:
        time_infer(variant, net, infer, chunk(batch, 0, infer_size), infer_size, 1, Clock(device))
    return m_train.peak / size, m_infer.peak / infer_size


def bench_length(variants: list[Variant], length: int, args: argparse.Namespace, device, log) -> None:
    import torch

    batch = synthetic_batch(args.batch_size, length, device)
    clock, mem_ok = Clock(device), memory_supported(device)
    budget = (args.memory_gib or (16.0 if device.type == "cuda" else 2.0)) * 2**30
    probe = micro_size(args.batch_size, length, args.probe_tokens)
    built, sizes, memory = {}, {}, {}
    for v in variants:  # build, warm up (compilation, allocator, first touch), measure memory, size micro-batches
        net, fn, opt, infer = build(v, length, device)
        t = time.perf_counter()
        time_train(v, net, fn, opt, batch, probe, 1, clock)
        if mem_ok:
            # to size micro-batches
            memory[v.name] = activation_memory(v, net, fn, opt, infer, batch, probe, probe, device)
        per_train, per_infer = memory.get(v.name, (length * 20e3, length * 5e3))  # rough fallback, bytes
        sizes[v.name] = (micro_size(args.batch_size, per_train, budget), micro_size(args.batch_size, per_infer, budget))
        if mem_ok:  # what is reported: the memory at the micro-batch sizes the run uses
            memory[v.name] = activation_memory(v, net, fn, opt, infer, batch, *sizes[v.name], device)
        time_train(v, net, fn, opt, batch, sizes[v.name][0], 1, clock)
        time_infer(v, net, infer, batch, sizes[v.name][1], 1, clock)
        built[v.name] = (net, fn, opt, infer)
        log(
            f"  L={length} {v.name}: micro-batches {sizes[v.name][0]} (train) / {sizes[v.name][1]} (inference); "
            f"set up in {time.perf_counter() - t:.1f}s"
        )
    # Warm up once more: measuring memory (above) hands freed heap back to the OS (malloc_trim), which would make
    # the first timed step of every variant set up before it page-fault its buffers again.
    for v in variants:
        time_train(v, *built[v.name][:3], batch, sizes[v.name][0], 1, clock)
        time_infer(v, built[v.name][0], built[v.name][3], batch, sizes[v.name][1], 1, clock)
    train = {v.name: [] for v in variants}
    infer = {v.name: [] for v in variants}
    for rep in range(args.repeats):  # interleaved: every model sees the same machine load
        for v in variants:
            train[v.name].append(time_train(v, *built[v.name][:3], batch, sizes[v.name][0], args.timed_micro, clock))
        for v in variants:
            infer[v.name].append(
                time_infer(v, built[v.name][0], built[v.name][3], batch, sizes[v.name][1], args.timed_micro, clock)
            )
        log(
            f"  L={length} repeat {rep + 1}/{args.repeats}: "
            + ", ".join(f"{v.name} {args.batch_size / train[v.name][-1]['step_s']:.3g}/s" for v in variants)
        )
    for v in variants:
        net = built[v.name][0]
        run = {
            "micro_batch": sizes[v.name][0],
            "infer_micro_batch": sizes[v.name][1],
            "train_step_s": statistics.median(r["step_s"] for r in train[v.name]),
            "train_step_s_all": [round(r["step_s"], 4) for r in train[v.name]],
            "optimizer_s": statistics.median(r["optimizer_s"] for r in train[v.name]),
            "timed_samples": train[v.name][0]["timed_samples"],
            "infer_s_per_seq": statistics.median(infer[v.name]),
            "params": sum(p.numel() for p in net.parameters()),
            # parameters, gradients and Adam's two moments, float32
            "static_mib": 4 * 4 * sum(p.numel() for p in net.parameters()) / 2**20,
        }
        run["train_samples_per_s"] = args.batch_size / run["train_step_s"]
        run["infer_seq_per_s"] = 1.0 / run["infer_s_per_seq"]
        if v.name in memory:
            run["train_mib_per_sample"] = memory[v.name][0] / 2**20
            run["infer_mib_per_seq"] = memory[v.name][1] / 2**20
            run["memory_probe_batch"] = probe  # the micro-batch that sized the others
        v.runs[length] = run
    del built, batch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def exponent(a: float, b: float, la: int, lb: int) -> float:
    return math.log(b / a) / math.log(lb / la)


def summarize(variants: list[Variant], lengths: list[int]) -> dict:
    """Growth exponents of cost in L between the two longest windows, and ratios against SASRec."""
    lo, hi = sorted(lengths)[-2:] if len(lengths) > 1 else (None, None)
    out: dict = {"exponents": {}, "ratios": {}, "between": [lo, hi]}
    ref = next((v for v in variants if v.name == REFERENCE), None)
    for v in variants:
        if lo is not None:
            e = {
                "train": exponent(1 / v.runs[lo]["train_samples_per_s"], 1 / v.runs[hi]["train_samples_per_s"], lo, hi),
                "infer": exponent(v.runs[lo]["infer_s_per_seq"], v.runs[hi]["infer_s_per_seq"], lo, hi),
            }
            if v.runs[lo].get("train_mib_per_sample", 0) > 0 and v.runs[hi].get("train_mib_per_sample", 0) > 0:
                e["memory"] = exponent(v.runs[lo]["train_mib_per_sample"], v.runs[hi]["train_mib_per_sample"], lo, hi)
            out["exponents"][v.name] = e
        if ref is not None:
            out["ratios"][v.name] = {
                L: {
                    "train": v.runs[L]["train_samples_per_s"] / ref.runs[L]["train_samples_per_s"],
                    "infer": v.runs[L]["infer_seq_per_s"] / ref.runs[L]["infer_seq_per_s"],
                }
                for L in lengths
            }
    return out


def targets(variants: list[Variant], summary: dict) -> list[dict]:
    """The CPU speed targets (docs/performance.md; 2-core CPU, batch 256) that these results can speak to."""
    by = {v.name: v for v in variants}
    rows = []

    def ratio(name: str, ref: str, length: int, kind: str) -> float | None:
        if name not in by or ref not in by or length not in by[name].runs:
            return None
        key = "train_samples_per_s" if kind == "train" else "infer_seq_per_s"
        return by[name].runs[length][key] / by[ref].runs[length][key]

    for ref in ("sasrec", "sasrec-flash", "sasrec+slices"):
        for kind, length, goal in (("train", 200, 1.0), ("train", 3200, 3.0), ("infer", 200, 1.5)):
            if ref == "sasrec+slices" and kind == "train":  # the slices only change inference
                continue
            r = ratio("tim4rec", ref, length, kind)
            if r is not None:
                rows.append(
                    {
                        "target": f"TiM4Rec {kind} throughput at L={length} vs {ref}",
                        "goal": f">= {goal}x",
                        "measured": f"{r:.2f}x",
                        "met": r >= goal,
                    }
                )
    lo, hi = summary["between"]
    for name, goal in (("ssd4rec", 1.1), ("tim4rec", 1.25)):
        e = summary["exponents"].get(name, {}).get("train")
        if e is not None and (lo, hi) == (800, 3200):
            rows.append(
                {
                    "target": f"{name} training-cost exponent in L, 800 -> 3200",
                    "goal": f"<= {goal}",
                    "measured": f"{e:.2f}",
                    "met": e <= goal,
                }
            )
    for name in ("sasrec", "sasrec-flash"):
        e = summary["exponents"].get(name, {}).get("train")
        if e is not None and (lo, hi) == (800, 3200):
            rows.append(
                {
                    "target": f"{name} training-cost exponent in L, 800 -> 3200",
                    "goal": "~2 (reported)",
                    "measured": f"{e:.2f}",
                    "met": None,
                }
            )
    return rows


def machine_info(device, args: argparse.Namespace) -> dict:
    import torch

    from tim4rec_pl import cpu_runtime

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "device": str(device),
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "tuning": dict(cpu_runtime.applied) if not args.no_tuning else "off",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    lines = [
        f"# Speed: TiM4Rec vs SSD4Rec* vs SASRec ({m['device']})",
        "",
        f"{m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, torch {m['torch']}"
        + (f", {m['gpu']}" if "gpu" in m else "")
        + f"; load average {result['load'][0]:.1f} at the start, {result['load'][1]:.1f} at the end; {m['date']}.",
        f"Batch {s['batch_size']} as micro-batches sized to {s['memory_gib']:g} GiB of activations (column mb)"
        + (f", {s['timed_micro']} of them timed per step and scaled to the batch" if s["quick"] else "")
        + f", median of {s['repeats']} interleaved repeats; {NUM_ITEMS - 1:,} items (ML-1M); CPU settings: "
        + (", ".join(f"{k}={v}" for k, v in m["tuning"].items()) if isinstance(m["tuning"], dict) else "off")
        + ".",
        "",
        "| model | L | mb | train samples/s | vs SASRec | vs SASRec-flash | inference seq/s | vs SASRec "
        "| train MiB/sample | inference MiB/seq | weights+grads+Adam MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    runs = result["runs"]
    for length in s["lengths"]:
        ref = runs.get(REFERENCE, {}).get(str(length))
        flash = runs.get("sasrec-flash", {}).get(str(length))
        for name, by_len in runs.items():
            r = by_len[str(length)]

            def rel(base, key, r=r):
                return f"{r[key] / base[key]:.2f}x" if base else "-"

            mem = f"{r['train_mib_per_sample']:.2f}" if "train_mib_per_sample" in r else "-"
            imem = f"{r['infer_mib_per_seq']:.2f}" if "infer_mib_per_seq" in r else "-"
            train = f"{r['train_samples_per_s']:.1f} | {rel(ref, 'train_samples_per_s')} "
            train += f"| {rel(flash, 'train_samples_per_s')}"
            infer = f"{r['infer_seq_per_s']:.1f} | {rel(ref, 'infer_seq_per_s')}"
            lines.append(
                f"| {name} | {length} | {r['micro_batch']} | {train} | {infer} | {mem} | {imem} "
                f"| {r['static_mib']:.0f} |"
            )
    lo, hi = result["summary"]["between"]
    if lo is not None:
        lines += [
            "",
            f"Growth exponent of cost per sample in L, fitted between L={lo} and L={hi} (1 = linear, 2 = quadratic):",
            "",
            "| model | training time | inference time | training memory |",
            "|---|---|---|---|",
        ]
        for name, e in result["summary"]["exponents"].items():
            mem = f"{e['memory']:.2f}" if "memory" in e else "-"
            lines.append(f"| {name} | {e['train']:.2f} | {e['infer']:.2f} | {mem} |")
    if result["targets"]:
        lines += ["", "CPU speed targets:", "", "| target | goal | measured | met |", "|---|---|---|---|"]
        for t in result["targets"]:
            met = "-" if t["met"] is None else ("yes" if t["met"] else "NO")
            lines.append(f"| {t['target']} | {t['goal']} | {t['measured']} | {met} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (name, by_len) in enumerate(result["runs"].items()):
        lengths = sorted(int(k) for k in by_len)
        color = f"C{i}"
        ax_t.plot(
            lengths,
            [1e3 / by_len[str(L)]["train_samples_per_s"] for L in lengths],
            "o-",
            color=color,
            label=f"{name} train",
        )
        ax_t.plot(
            lengths,
            [1e3 * by_len[str(L)]["infer_s_per_seq"] for L in lengths],
            "s--",
            color=color,
            alpha=0.6,
            label=f"{name} inference",
        )
        if all("train_mib_per_sample" in by_len[str(L)] for L in lengths):
            ax_m.plot(
                lengths,
                [max(by_len[str(L)]["train_mib_per_sample"], 1e-3) for L in lengths],
                "o-",
                color=color,
                label=name,
            )
    for ax, title, unit in ((ax_t, "time per sample", "ms"), (ax_m, "training memory per sample", "MiB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("window length L")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=7)
    ax_m.legend(fontsize=7)
    device, batch = result["machine"]["device"], result["settings"]["batch_size"]
    fig.suptitle(f"TiM4Rec vs SSD4Rec* vs SASRec, {device}, batch {batch}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.no_tuning:
        os.environ["TIM4REC_CPU_TUNING"] = "0"
    import tim4rec_pl.cpu_runtime  # noqa: F401  (before torch: the CLI's OpenMP/malloc settings)

    # isort: split
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    variants = make_variants(args, device)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    t0 = time.perf_counter()
    log(f"speed: {[v.name for v in variants]} on {device}, L = {args.lengths}, batch {args.batch_size}")
    for length in args.lengths:
        bench_length(variants, length, args, device, log)
    summary = summarize(variants, args.lengths)
    result = {
        "machine": machine_info(device, args),
        "settings": {
            "batch_size": args.batch_size,
            "lengths": args.lengths,
            "memory_gib": args.memory_gib or (16.0 if device.type == "cuda" else 2.0),
            "timed_micro": args.timed_micro if args.quick else None,
            "repeats": args.repeats,
            "quick": args.quick,
            "num_items": NUM_ITEMS,
        },
        "load": [load0, os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")],
        "wall_s": time.perf_counter() - t0,
        "runs": {v.name: {str(L): r for L, r in v.runs.items()} for v in variants},
        "summary": summary,
        "targets": targets(variants, summary) if device.type == "cpu" else [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    md = markdown(result)
    out.with_suffix(".md").write_text(md)
    if not args.no_plot:
        plot(result, out.with_suffix(".png"))
    print(md)
    log(f"speed: {result['wall_s']:.0f}s; wrote {out}.json, .md" + ("" if args.no_plot else ", .png"))
    return result


if __name__ == "__main__":
    main()
