"""mamba-ssm's fused SSD kernel, exactly as the CUDA path calls it, run on the CPU under Triton's interpreter.

Opt-in (marker ``triton_interpret``, deselected by default): ``bash scripts/triton_check.sh`` builds an environment
with torch's CPU build, triton and mamba-ssm (without its CUDA extension) and runs this module. Every test goes
through ``ssd_scan(..., backend="triton")`` -> ``_scan_triton`` -> ``mamba_chunk_scan_combined`` (a counter checks the
kernel really ran) and compares the output, the final state and every gradient with the plain SSD reference
(``tim4rec_pl.model.ssd_minimal``, float64) and with our torch backend; then whole networks (TiM4Rec's reference and
causal time paths, SSD4Rec*): forward, one training step, and the weights after the optimiser step.

The interpreter needs a few stand-ins that exist only here, in the `triton_on_cpu` fixture, never in the package:
Triton must be told to interpret before mamba-ssm's kernels are defined; mamba-ssm's package ``__init__`` imports its
compiled CUDA extension, which a CPU build lacks; the kernel launchers enter ``torch.cuda.device(...)`` and read the
GPU's multiprocessor count; the autotuner would time candidate configurations on a GPU; and our backend resolution
refuses ``triton`` for CPU tensors.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from tim4rec_pl.model import ssd
from tim4rec_pl.model.ssd_minimal import ssd_recurrence, step_sizes

pytestmark = [
    pytest.mark.triton_interpret,
    pytest.mark.filterwarnings("ignore:Deterministic mode:UserWarning"),  # mamba-ssm's note on MAMBA_DETERMINISTIC
]

_SETUP_HINT = "run `bash scripts/triton_check.sh` from the repository root, which installs it"


@pytest.fixture(scope="module", autouse=True)
def triton_on_cpu():
    """Make `ssd_scan(..., backend="triton")` run mamba-ssm's Triton kernels on CPU tensors; yields a call counter."""
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None or importlib.util.find_spec("triton") is None:
        pytest.fail(f"mamba-ssm and triton are not installed in this environment: {_SETUP_HINT}")
    # 1. Triton chooses between compiling and interpreting when a function is decorated, and Lightning imports
    #    triton.language (whose helpers, e.g. the combine function of tl.cumsum, are decorated then) long before this
    #    runs: the variable must be in the environment from the start.
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail(
            "set TRITON_INTERPRET=1 in the environment before pytest starts (Lightning imports triton at "
            f"startup): {_SETUP_HINT}"
        )
    mp = pytest.MonkeyPatch()
    # 2. One configuration per kernel: no autotuning, whose benchmarking needs a GPU driver.
    mp.setenv("MAMBA_DETERMINISTIC", "1")
    # 3. The package without its __init__ (which imports the compiled selective-scan extension): submodules only.
    if "mamba_ssm" not in sys.modules:
        package = types.ModuleType("mamba_ssm")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        mp.setitem(sys.modules, "mamba_ssm", package)
    # 4. Kernel launchers run under torch.cuda.device(tensor.device.index) (None for CPU tensors) and size some
    #    backward grids by the multiprocessor count.
    cuda_device = torch.cuda.device
    mp.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext() if d is None else cuda_device(d))
    mp.setattr(torch.cuda, "get_device_properties", lambda d=None: types.SimpleNamespace(multi_processor_count=2))
    # 5. The package's availability check is cached per process: evaluate it again, now that the kernels import.
    ssd._mamba_available.cache_clear()
    if not ssd._mamba_available():
        pytest.fail(f"mamba_ssm.ops.triton.ssd_combined does not import under the interpreter: {_SETUP_HINT}")
    # 6. resolve_backend refuses "triton" for CPU tensors (right for users): let it through here.
    resolve = ssd.resolve_backend
    mp.setattr(
        ssd, "resolve_backend", lambda backend, device: "triton" if backend == "triton" else resolve(backend, device)
    )
    # Count the kernel's calls, so that a test fails if dispatch quietly ran something else.
    from mamba_ssm.ops.triton import ssd_combined

    calls = {"n": 0}
    kernel = ssd_combined.mamba_chunk_scan_combined

    def counted(*args, **kwargs):
        calls["n"] += 1
        return kernel(*args, **kwargs)

    mp.setattr(ssd_combined, "mamba_chunk_scan_combined", counted)
    yield calls
    mp.undo()
    ssd._mamba_available.cache_clear()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of b."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


# -- the SSD alone ------------------------------------------------------------------------------------------------

CASES = {
    # every optional input: D per head, dt_bias + softplus, initial state, final state; a partial last chunk
    "all-inputs": dict(b=2, length=50, h=2, p=16, n=16, g=1, chunk=16, d_shape="h", init=True, final=True),
    # two groups, D per channel, no initial state, output only, a partial second chunk
    "groups": dict(b=3, length=37, h=4, p=8, n=16, g=2, chunk=32, d_shape="hp", init=False, final=False),
}


def _ssd_inputs(b, length, h, p, n, g, d_shape, init, seed=0) -> dict[str, torch.Tensor]:
    """float32 inputs shaped like the model's: dt ~ N(0, 1), the model's dt_bias and A ranges."""
    gen = torch.Generator().manual_seed(seed)
    inputs = dict(
        x=torch.randn(b, length, h, p, generator=gen),
        dt=torch.randn(b, length, h, generator=gen),
        A=-(1 + 15 * torch.rand(h, generator=gen)),
        B=torch.randn(b, length, g, n, generator=gen) / n**0.25,
        C=torch.randn(b, length, g, n, generator=gen) / n**0.25,
        D=torch.randn(h, generator=gen) if d_shape == "h" else torch.randn(h, p, generator=gen),
        dt_bias=torch.log(torch.expm1(torch.empty(h).uniform_(1e-3, 0.1, generator=gen))),
    )
    if init:
        inputs["initial_state"] = torch.randn(b, h, p, n, generator=gen)
    return inputs


def _scan_and_grads(inputs: dict, weights: list[torch.Tensor], run) -> dict[str, torch.Tensor]:
    """y, the final state (if any) and the gradient of sum(w * outputs) for every input."""
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    outputs = run(leaves)
    loss = sum((o * w.to(o.dtype)).sum() for o, w in zip(outputs, weights))
    loss.backward()
    result = {"y": outputs[0]} | ({"final": outputs[1]} if len(outputs) > 1 else {})
    return result | {f"d{k}": v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_ssd_scan_triton_matches_reference_and_torch(case: str, triton_on_cpu) -> None:
    c = CASES[case]
    inputs = _ssd_inputs(c["b"], c["length"], c["h"], c["p"], c["n"], c["g"], c["d_shape"], c["init"])
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(c["b"], c["length"], c["h"], c["p"], generator=gen)]
    if c["final"]:
        weights.append(torch.randn(c["b"], c["h"], c["p"], c["n"], generator=gen))

    def scan(backend: str):
        def run(t: dict) -> tuple[torch.Tensor, ...]:
            out = ssd.ssd_scan(**t, dt_softplus=True, chunk_size=c["chunk"], return_final_state=c["final"],
                               backend=backend)  # fmt: skip
            return out if c["final"] else (out,)

        return run

    def plain(t: dict) -> tuple[torch.Tensor, ...]:  # float64, one position at a time
        t = {k: v.double() for k, v in t.items()}
        delta = step_sizes(t["dt"], t["dt_bias"], softplus=True)
        y, final = ssd_recurrence(t["x"], delta, t["A"], t["B"], t["C"], t["D"], t.get("initial_state"))
        return (y, final) if c["final"] else (y,)

    before = triton_on_cpu["n"]
    got = _scan_and_grads(inputs, weights, scan("triton"))
    assert triton_on_cpu["n"] == before + 1, "ssd_scan(backend='triton') did not call mamba_chunk_scan_combined"
    torch_backend = _scan_and_grads(inputs, weights, scan("torch"))
    reference = _scan_and_grads(inputs, weights, plain)

    expected = {"y", "dx", "ddt", "dA", "dB", "dC", "dD", "ddt_bias"} | ({"final"} if c["final"] else set())
    expected |= {"dinitial_state"} if c["init"] else set()
    assert set(got) == expected
    for key in sorted(expected):
        assert got[key].shape == reference[key].shape, key
        assert torch.isfinite(got[key]).all(), key
        assert _rel(got[key], reference[key]) < 1e-4, (key, _rel(got[key], reference[key]))
        assert _rel(got[key], torch_backend[key]) < 1e-4, (key, _rel(got[key], torch_backend[key]))


def test_ssd_scan_triton_differs_when_inputs_differ(triton_on_cpu) -> None:
    """The comparison above can fail: a changed decay gives a different kernel output."""
    inputs = _ssd_inputs(2, 20, 2, 8, 16, 1, "h", init=False)
    y = ssd.ssd_scan(**inputs, dt_softplus=True, chunk_size=16, backend="triton")
    y2 = ssd.ssd_scan(**(inputs | {"A": inputs["A"] * 0.5}), dt_softplus=True, chunk_size=16, backend="triton")
    assert _rel(y2, y) > 1e-3


# -- whole networks -------------------------------------------------------------------------------------------------

NUM_ITEMS = 40
NETWORKS = {  # (network arguments, batch size); L = max_seq_len
    "tim4rec-reference": (dict(time_path="reference", max_seq_len=50, d_model=32, head_dim=16, chunk_size=32), 2),
    "tim4rec-causal": (dict(time_path="causal", max_seq_len=20, d_model=16, head_dim=8, chunk_size=16), 3),
    "ssd4rec": (dict(is_time=False, max_seq_len=20, d_model=16, head_dim=8, chunk_size=16), 3),
}


def _network(backend: str, **kwargs):
    from tim4rec_pl.model.tim4rec import TiM4Rec

    torch.manual_seed(0)
    return TiM4Rec(NUM_ITEMS, d_state=16, num_layers=2, dropout=0.0, time_dropout=0.0, ssd_backend=backend, **kwargs)


def _batch(b: int, length: int) -> tuple[torch.Tensor, ...]:
    """Left-aligned histories right-padded with 0, increasing Unix-second timestamps, next-item targets."""
    gen = torch.Generator().manual_seed(2)
    lengths = torch.tensor([length, 13, 4][:b])
    items = torch.randint(1, NUM_ITEMS, (b, length + 1), generator=gen)
    pad = torch.arange(length)[None] >= lengths[:, None]  # (B, L)
    seq, targets = items[:, :-1].masked_fill(pad, 0), items[:, 1:].masked_fill(pad, 0)
    ts = (1.6e9 + torch.randint(60, 86400, (b, length), generator=gen).double().cumsum(1)).float()
    ts = ts.masked_fill(pad, 0.0)
    last = targets[torch.arange(b), lengths - 1]
    return seq, lengths, ts, targets, last


@pytest.mark.parametrize("name", list(NETWORKS))
def test_network_forward_and_training_step(name: str, triton_on_cpu) -> None:
    kwargs, b = NETWORKS[name]
    seq, lengths, ts, targets, last = _batch(b, kwargs["max_seq_len"])
    nets = {backend: _network(backend, **kwargs) for backend in ("triton", "torch")}
    ref = copy.deepcopy(nets["torch"].state_dict())
    assert all(torch.equal(v, ref[k]) for k, v in nets["triton"].state_dict().items())

    # Forward in eval mode: the representation at the last position, and every position's hidden state.
    outputs = {}
    for backend, net in nets.items():
        net.eval()
        with torch.no_grad():
            outputs[backend] = (net.score_all(seq, lengths, ts), net.encode(seq, lengths, ts))
    for got, want in zip(outputs["triton"], outputs["torch"]):
        assert _rel(got, want) < 1e-4

    # One training step: next-item loss at the last position (forward) and at every position (encode).
    before = triton_on_cpu["n"]
    results = {}
    for backend, net in nets.items():
        net.train()
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        weight = net.item_embedding.weight
        hidden = net.encode(seq, lengths, ts)  # (B, L, d)
        mask = targets > 0
        loss = F.cross_entropy(net.score_all(seq, lengths, ts), last)
        loss = loss + F.cross_entropy(hidden[mask] @ weight.T, targets[mask])
        opt.zero_grad()
        loss.backward()
        grads = {k: None if p.grad is None else p.grad.clone() for k, p in net.named_parameters()}
        opt.step()
        results[backend] = (loss.detach(), grads, copy.deepcopy(net.state_dict()))
    # forward: all layers but the last (which reads only the last position); encode: both layers
    assert triton_on_cpu["n"] - before >= 3, "the network did not run mamba-ssm's kernel in every scanning layer"

    (loss_k, grads_k, after_k), (loss_t, grads_t, after_t) = results["triton"], results["torch"]
    assert torch.isfinite(loss_k) and _rel(loss_k, loss_t) < 1e-5
    reached = 0
    for key, g in grads_t.items():
        assert (grads_k[key] is None) == (g is None), key
        if g is None:
            continue
        # relative to the gradient's size, with a floor for parameters that get only rounding noise (~1e-17)
        err = float((grads_k[key] - g).abs().max())
        assert err <= 1e-3 * float(g.abs().max()) + 1e-9, (key, err, float(g.abs().max()))
        reached += bool(g.abs().max() > 1e-6)
    assert reached >= len(grads_t) // 2  # the loss reaches most parameters: the comparison is not vacuous
    moved = 0
    for key, w in after_t.items():
        assert (after_k[key] - w).abs().max() < 1e-5, (key, float((after_k[key] - w).abs().max()))
        moved += not torch.equal(w, ref[key])
    assert moved >= len(after_t) // 2
