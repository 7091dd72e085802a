"""GPU checklist: everything about the CUDA path that cannot be checked on a CPU, in one command and one summary.

Runs on one CUDA device with mamba-ssm installed (the `gpu` extra or the Docker image):

1. tests    the test suite's GPU tests (tests/test_ssd.py: the Triton kernels against the torch backend on CUDA,
            `auto` picking Triton), run by pytest in a subprocess: all must pass and none may be skipped.
2. parity   ssd_scan with backend "torch" and "triton" on the same inputs (D, dt_bias, initial and final state):
            outputs and the gradients of every input agree (float32: max error <= 1e-3 of the largest value;
            bfloat16 inputs: <= 2e-2, since both round their outputs to bf16).
3. ml-1m    the whole TiM4Rec model (ML-1M's configuration: L = 200, reference time path) on a real ML-1M training
            batch, once per backend from the same weights: scores, loss and every parameter's gradient agree (<= 1e-3
            of the largest value). ML-1M is fetched and prepared under --data-dir on first use.
4. train    the whole model trained a few Adam steps on synthetic data, once per backend from the same initial
            weights: losses finite and falling, the two backends' first losses equal (rel. 1e-3); one bf16-autocast
            step per backend stays finite.
5. speed    forward + backward of ssd_scan for both backends at the model's sizes (B 2048, L 50) and at B 256 with
            L 200 / 800 / 3200, one training step of the whole model at B 2048, L 50; and the speed table's Triton
            rows: benchmarks/speed.py --device cuda (tim4rec, ssd4rec and their -triton variants; --no-speed-table
            skips it, the longest part).

Prints a JSON summary (also written to --out) and one PASS/FAIL line; exits 1 if a check fails, 2 if this machine has
no CUDA device or no mamba-ssm (install with `pip install --no-build-isolation 'tim4rec-pl[gpu]'`).

Usage: python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check.json] [--data-dir data] [--steps 30]
       [--repeats 10] [--no-speed-table]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
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


def run_gpu_tests() -> dict:
    """The suite's tests that need CUDA and mamba-ssm, in a fresh interpreter (as a user runs pytest)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_ssd.py"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    summary = lines[-1] if lines else proc.stderr.strip()[-500:]
    skipped = [line for line in lines if line.startswith("SKIPPED")]
    return dict(command=" ".join(cmd[1:]), returncode=proc.returncode, summary=summary, skipped=skipped,
                ok=proc.returncode == 0 and not skipped and " passed" in summary)  # fmt: skip


def check_ml1m(data_dir: str, batch_size: int = 256, length: int = 200) -> dict:
    """Triton against torch on a real ML-1M training batch: the whole model, scores, loss and every gradient."""
    from tim4rec_pl.data.datamodule import SeqRecDataModule

    dm = SeqRecDataModule(dataset="ml-1m", data_dir=data_dir, max_seq_len=length, batch_size=batch_size, seed=0)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    inputs = [batch[k].cuda() for k in ("item_seq", "item_seq_len", "timestamps")]
    target = batch["target"].cuda()
    out = {}
    for backend in BACKENDS:
        model = _model(backend, dm.num_items, length)
        scores = model.score_all(*inputs)  # (B, num_items)
        loss = F.cross_entropy(scores, target)
        loss.backward()
        grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
        out[backend] = dict(scores=scores.detach(), loss=loss.detach(), grads=grads)
    t, k = out["torch"], out["triton"]
    grad_errs = {n: _rel_err(k["grads"][n], g) for n, g in t["grads"].items() if g.abs().max() > 0}
    errors = dict(scores=_rel_err(k["scores"], t["scores"]), loss=_rel_err(k["loss"], t["loss"]))
    errors["worst_grad"] = max(grad_errs.values())
    worst = max(errors.values())
    return dict(batch=[int(target.shape[0]), length], num_items=dm.num_items, loss=t["loss"].item(), errors=errors,
                worst_grad_param=max(grad_errs, key=grad_errs.get), max_rel_err=worst, ok=worst <= 1e-3)  # fmt: skip


def speed_table_triton_rows(out: Path) -> dict:
    """benchmarks/speed.py on CUDA for the SSD models: the torch and Triton rows of the speed table, side by side."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--device", "cuda", "--models", "tim4rec", "ssd4rec",
           "--no-plot", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    result = dict(command=" ".join(cmd[1:]), returncode=proc.returncode)
    if proc.returncode != 0:
        return result | dict(ok=False, error=proc.stderr.strip()[-2000:])
    runs = json.loads(out.with_suffix(".json").read_text())["runs"]
    triton_rows = sorted(name for name in runs if name.endswith("-triton"))
    return result | dict(rows=triton_rows, table=str(out.with_suffix(".md")), ok=len(triton_rows) == 2)


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
    parser.add_argument("--data-dir", default=str(ROOT / "data"), help="where ML-1M is (or is fetched and prepared)")
    parser.add_argument("--no-speed-table", action="store_true", help="skip benchmarks/speed.py's Triton rows")
    args = parser.parse_args(argv)

    from tim4rec_pl.model.ssd import _mamba_available

    has_cuda, has_mamba = torch.cuda.is_available(), _mamba_available()
    if not (has_cuda and has_mamba):
        print(
            f"gpu_check needs a CUDA device and mamba-ssm (found: cuda={has_cuda}, mamba_ssm={has_mamba}); "
            "install the gpu extra with `pip install --no-build-isolation 'tim4rec-pl[gpu]'` on a CUDA machine",
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
    summary["tests"] = run_gpu_tests()
    summary["parity"] = check_parity({torch.float32: 1e-3, torch.bfloat16: 2e-2})
    summary["ml1m"] = check_ml1m(args.data_dir)
    summary["training"] = check_training(args.steps)
    summary["speed"] = measure_speed(args.repeats)
    if not args.no_speed_table:
        summary["speed_table"] = speed_table_triton_rows(args.out.with_name("gpu_check_speed"))
    checks = [summary["tests"], *summary["parity"], summary["ml1m"], summary["training"]]
    checks += [summary["speed_table"]] if "speed_table" in summary else []
    summary["ok"] = all(c["ok"] for c in checks)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(summary, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(("PASS" if summary["ok"] else "FAIL") + f": gpu_check in {summary['seconds']} s, written to {args.out}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
