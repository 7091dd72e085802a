"""GPU acceptance check for the SSD backends: the Triton kernels (mamba-ssm) against the pure-PyTorch scan.

Runs on one CUDA device in a few minutes:

1. parity   ssd_scan with backend "torch" and "triton" on the same inputs (D, dt_bias, initial and final state):
            outputs and the gradients of every input agree (float32: max error <= 1e-3 of the largest value;
            bfloat16 inputs: <= 2e-2, since both round their outputs to bf16).
2. train    the whole TiM4Rec model, trained a few Adam steps on synthetic data with cross-entropy over the
            catalogue, once per backend from the same initial weights: losses finite and falling, and the two
            backends' first losses equal (rel. 1e-3); one bf16-autocast step per backend stays finite.
3. speed    forward + backward of ssd_scan for both backends at the model's sizes (B 2048, L 50) and at
            B 256 with L 200 / 800 / 3200, and one training step of the whole model at B 2048, L 50.

Prints a JSON summary (also written to --out) and exits 1 if a check fails, 2 if this machine has no CUDA
device or no mamba-ssm (install with `pip install 'tim4rec-pl[gpu]'`).

Usage: python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check.json] [--steps 30] [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("torch", "triton")


def _inputs(b: int, length: int, h: int, p: int, n: int, g: int, dtype: torch.dtype, seed: int = 0) -> dict:
    """Realistic SSD inputs on the GPU (dt ~ N(0, 1), dt_bias and A from the paper's initialisation)."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = math.log(1e-3), math.log(0.1)
    dt0 = torch.exp(lo + torch.rand(h, generator=gen) * (hi - lo)).clamp(min=1e-4)
    cpu = dict(
        x=torch.randn(b, length, h, p, generator=gen),
        dt=torch.randn(b, length, h, generator=gen),
        A=-(torch.rand(h, generator=gen) * 15 + 1),
        B=torch.randn(b, length, g, n, generator=gen) / n**0.25,
        C=torch.randn(b, length, g, n, generator=gen) / n**0.25,
        D=torch.randn(h, generator=gen),
        dt_bias=dt0 + torch.log(-torch.expm1(-dt0)),
        initial_state=torch.randn(b, h, p, n, generator=gen),
    )
    low = ("x", "dt", "B", "C")  # activations come in the model's dtype; parameters and the state stay float32
    return {k: v.to("cuda", dtype if k in low else torch.float32) for k, v in cpu.items()}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12)).item()


def check_parity(tol: dict[torch.dtype, float]) -> list[dict]:
    from tim4rec_pl.model.ssd import ssd_scan

    rows = []
    sizes = [(8, 50, 4, 32, 32, 1), (16, 33, 4, 32, 32, 1), (4, 200, 4, 32, 32, 1), (2, 1000, 8, 64, 64, 2)]
    for dtype in (torch.float32, torch.bfloat16):
        for b, length, h, p, n, g in sizes:
            base = _inputs(b, length, h, p, n, g, dtype)
            out = {}
            for backend in BACKENDS:
                leaves = {k: v.clone().requires_grad_() for k, v in base.items()}
                y, final = ssd_scan(**leaves, dt_softplus=True, chunk_size=32, return_final_state=True, backend=backend)
                gen = torch.Generator(device="cuda").manual_seed(1)
                w = torch.randn(y.shape, generator=gen, device="cuda")
                ((y.float() * w).sum() + final.float().sum()).backward()
                out[backend] = {"y": y, "final": final, **{f"d{k}": v.grad for k, v in leaves.items()}}
            errs = {k: _rel_err(out["triton"][k], out["torch"][k]) for k in out["torch"]}
            worst = max(errs.values())
            rows.append(
                dict(dtype=str(dtype).removeprefix("torch."), size=[b, length, h, p, n, g], max_rel_err=worst,
                     errors=errs, ok=worst <= tol[dtype], y_dtype=str(out["triton"]["y"].dtype))
            )  # fmt: skip
    return rows


def _batch(num_items: int, b: int, length: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Right-padded histories whose next item is a fixed function of the last one, so there is something to learn."""
    lens = torch.randint(1, length + 1, (b,), generator=gen)
    items = torch.randint(1, num_items, (b, length), generator=gen)
    pos = torch.arange(length)[None]
    items = items.masked_fill(pos >= lens[:, None], 0)
    ts = 1.6e9 + torch.randint(0, 86400, (b, length), generator=gen).double().cumsum(1)
    ts = ts.float().masked_fill(pos >= lens[:, None], 0.0)
    last = items[torch.arange(b), lens - 1]
    target = (last * 7) % (num_items - 1) + 1
    return tuple(t.cuda() for t in (items, lens, ts, target))


def _model(backend: str, num_items: int, length: int):
    from tim4rec_pl.model.tim4rec import TiM4Rec

    torch.manual_seed(0)
    return TiM4Rec(num_items=num_items, max_seq_len=length, dropout=0.0, time_dropout=0.0, ssd_backend=backend).cuda()


def check_training(steps: int, num_items: int = 2000, b: int = 512, length: int = 50) -> dict:
    result = {}
    for backend in BACKENDS:
        model = _model(backend, num_items, length)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(0)
        batch = _batch(num_items, b, length, gen)
        losses = []
        for _ in range(steps):  # one fixed batch: the loss must fall
            loss = F.cross_entropy(model.score_all(*batch[:3]), batch[3])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            amp_loss = F.cross_entropy(model.score_all(*batch[:3]).float(), batch[3])
        amp_loss.backward()
        result[backend] = dict(losses=[round(v, 5) for v in losses], amp_loss=amp_loss.item())
    t, k = result["torch"], result["triton"]
    finite = all(map(torch.isfinite, map(torch.tensor, t["losses"] + k["losses"] + [t["amp_loss"], k["amp_loss"]])))
    first_rel = abs(t["losses"][0] - k["losses"][0]) / abs(t["losses"][0])
    falling = all(r["losses"][-1] < 0.9 * r["losses"][0] for r in (t, k))
    result.update(first_loss_rel_diff=first_rel, ok=bool(finite and falling and first_rel <= 1e-3))
    return result


def _time_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure_speed(repeats: int) -> list[dict]:
    from tim4rec_pl.model.ssd import ssd_scan

    rows = []
    for b, length in [(2048, 50), (256, 200), (256, 800), (256, 3200)]:
        base = _inputs(b, length, 4, 32, 32, 1, torch.float32)
        leaves = {k: v.requires_grad_() for k, v in base.items() if k != "initial_state"}
        row = dict(what="ssd_scan fwd+bwd", B=b, L=length)
        for backend in BACKENDS:

            def run(backend: str = backend, leaves: dict = leaves) -> None:
                y = ssd_scan(**leaves, dt_softplus=True, chunk_size=32, backend=backend)
                y.backward(torch.ones_like(y))

            row[f"{backend}_ms"] = round(_time_ms(run, repeats), 3)
        row["speedup_triton"] = round(row["torch_ms"] / row["triton_ms"], 2)
        rows.append(row)
    num_items, b, length = 12000, 2048, 50
    row = dict(what="TiM4Rec train step", B=b, L=length, num_items=num_items)
    for backend in BACKENDS:
        model = _model(backend, num_items, length)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        batch = _batch(num_items, b, length, torch.Generator().manual_seed(0))

        def step(model=model, opt=opt, batch=batch) -> None:
            loss = F.cross_entropy(model.score_all(*batch[:3]), batch[3])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        row[f"{backend}_ms"] = round(_time_ms(step, repeats), 3)
    row["speedup_triton"] = round(row["torch_ms"] / row["triton_ms"], 2)
    rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="Exit codes: 0 all checks pass, 1 a check failed, 2 no GPU."
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check.json", help="JSON file"
    )
    parser.add_argument("--steps", type=int, default=30, help="training steps per backend")
    parser.add_argument("--repeats", type=int, default=10, help="timed repetitions (median reported)")
    args = parser.parse_args(argv)

    from tim4rec_pl.model.ssd import _mamba_available

    has_cuda, has_mamba = torch.cuda.is_available(), _mamba_available()
    if not (has_cuda and has_mamba):
        print(
            f"gpu_check needs a CUDA device and mamba-ssm (found: cuda={has_cuda}, mamba_ssm={has_mamba}); "
            "install the gpu extra with `pip install 'tim4rec-pl[gpu]'` on a CUDA machine",
            file=sys.stderr,
        )
        return 2
    started = time.perf_counter()
    summary: dict = dict(device=torch.cuda.get_device_name(), torch=torch.__version__)
    try:
        import mamba_ssm

        summary["mamba_ssm"] = getattr(mamba_ssm, "__version__", "?")
    except Exception:  # version is informational only
        pass
    summary["parity"] = check_parity({torch.float32: 1e-3, torch.bfloat16: 2e-2})
    summary["training"] = check_training(args.steps)
    summary["speed"] = measure_speed(args.repeats)
    summary["ok"] = all(r["ok"] for r in summary["parity"]) and summary["training"]["ok"]
    summary["seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(summary, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(("PASS" if summary["ok"] else "FAIL") + f": gpu_check in {summary['seconds']} s, written to {args.out}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
