"""The SSD: the plain definition's two forms agree, and the scan backends (values and gradients) equal it.

The definition is `tim4rec_pl.model.ssd_minimal` (recurrence and chunked einsum form), in float64. The forward-only
inference scan is tested in test_inference.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

import tim4rec_pl.model.chunked_scan as chunked
import tim4rec_pl.model.ssd as ssd
from tim4rec_pl.errors import UserError
from tim4rec_pl.model.ssd import resolve_backend, ssd_scan, ssd_step
from tim4rec_pl.model.ssd_minimal import segsum, ssd_chunked, ssd_recurrence, step_sizes

F64 = torch.float64


def recurrence(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = True,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The definition on raw step sizes (`ssd_minimal`): returns y (b, L, H, P), final (b, H, P, N)."""
    return ssd_recurrence(x, step_sizes(dt, dt_bias, dt_softplus), A, B, C, D, initial_state)


def make_inputs(
    b: int = 2,
    length: int = 50,
    h: int = 4,
    p: int = 8,
    n: int = 16,
    g: int = 1,
    D: str | None = "h",
    initial_state: bool = False,
    dtype: torch.dtype = F64,
    dt_scale: float = 1.0,
    seed: int = 0,
) -> dict:
    """Realistic values: dt ~ N(0, 1) before softplus, dt_bias and A from the model's init, C.B ~ N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=F64)

    def uniform(lo: float, hi: float, *shape: int) -> Tensor:
        return torch.rand(*shape, generator=gen, dtype=F64) * (hi - lo) + lo

    dt0 = torch.exp(uniform(math.log(1e-3), math.log(0.1), h)).clamp(min=1e-4)
    out = dict(
        x=randn(b, length, h, p),
        dt=randn(b, length, h) * dt_scale,
        A=-torch.exp(torch.log(uniform(1.0, 16.0, h))),  # A = -exp(A_log), A_log = log U[1, 16]
        B=randn(b, length, g, n) / n**0.25,
        C=randn(b, length, g, n) / n**0.25,
        D={None: None, "h": randn(h), "hp": randn(h, p)}[D],
        dt_bias=dt0 + torch.log(-torch.expm1(-dt0)),  # softplus^-1(dt0)
        initial_state=randn(b, h, p, n) if initial_state else None,
    )
    return {k: (v.to(dtype) if v is not None else None) for k, v in out.items()}


def as64(inputs: dict) -> dict:
    return {k: (v.to(F64) if v is not None else None) for k, v in inputs.items()}


# ------------------------------------------------------------------------------------------ the plain definition
def test_segsum_by_hand() -> None:
    a = torch.tensor([1.0, 2.0, 4.0], dtype=F64)
    want = torch.tensor([[0, -math.inf, -math.inf], [2, 0, -math.inf], [6, 4, 0]], dtype=F64)
    assert torch.equal(segsum(a), want)


@pytest.mark.parametrize("chunk", [1, 3, 8, 16, 64])
@pytest.mark.parametrize(
    "g, D, initial_state", [(1, "h", False), (2, "hp", True), (4, None, True)], ids=["D", "groups+init", "G=H"]
)
def test_recurrence_equals_chunked_form(chunk: int, g: int, D: str | None, initial_state: bool) -> None:
    """The two forms of the definition agree in float64 for any chunk size (padded last chunk included)."""
    inputs = make_inputs(length=37, g=g, D=D, initial_state=initial_state)
    delta = step_sizes(inputs["dt"], inputs["dt_bias"])
    args = (inputs["x"], delta, inputs["A"], inputs["B"], inputs["C"], inputs["D"], inputs["initial_state"])
    y_rec, final_rec = ssd_recurrence(*args)
    y_chunk, final_chunk = ssd_chunked(*args, chunk_size=chunk)
    assert 0.3 < y_rec.abs().max() < 30
    torch.testing.assert_close(y_chunk, y_rec, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final_chunk, final_rec, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("q", [1, 5, 16, 40])
def test_training_scan_equals_the_definition_values_and_gradients(q: int) -> None:
    """`_ChunkedScan` (the torch backend's autograd Function, hand-written backward) against `ssd_chunked` under
    autograd, float64: outputs, final state and the gradients of every input."""
    inputs = make_inputs(b=3, length=29, h=4, p=3, n=5, g=2, D="hp", initial_state=True)
    delta = step_sizes(inputs["dt"], inputs["dt_bias"])
    leaves = [t.clone().requires_grad_() for t in (inputs["x"], delta, inputs["A"], inputs["B"], inputs["C"])]
    leaves += [inputs["D"].clone().requires_grad_(), inputs["initial_state"].clone().requires_grad_()]
    gen = torch.Generator().manual_seed(5)
    wy = torch.randn(inputs["x"].shape, generator=gen, dtype=F64)
    wf = torch.randn(inputs["initial_state"].shape, generator=gen, dtype=F64)
    y_ref, final_ref = ssd_chunked(*leaves, chunk_size=8)
    want = torch.autograd.grad((y_ref * wy).sum() + (final_ref * wf).sum(), leaves)
    y, final = chunked._ChunkedScan.apply(*leaves, q, True)
    got = torch.autograd.grad((y * wy).sum() + (final * wf).sum(), leaves)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-12)
    for name, w, g in zip(["x", "delta", "A", "B", "C", "D", "initial_state"], want, got):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10, msg=name)


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let chunk_size set the torch backend's block length directly (by default it never goes below 48)."""
    monkeypatch.setattr(chunked, "_MIN_TORCH_BLOCK", 1)


@pytest.mark.parametrize("length", [1, 7, 32, 33, 100, 1024])
@pytest.mark.parametrize(
    "g, D, initial_state", [(1, "h", False), (1, None, True), (2, "hp", True)], ids=["D", "init", "groups"]
)
def test_float32_matches_float64_recurrence(length: int, g: int, D: str | None, initial_state: bool) -> None:
    inputs = make_inputs(length=length, g=g, D=D, initial_state=initial_state, dtype=torch.float32)
    y, final = ssd_scan(**inputs, dt_softplus=True, return_final_state=True)
    y_ref, final_ref = recurrence(**as64(inputs))
    assert y.dtype == torch.float32 and y.shape == inputs["x"].shape and final.shape == final_ref.shape
    assert 0.3 < y_ref.abs().max() < 30  # outputs are O(1), so an absolute tolerance means something
    assert (y.double() - y_ref).abs().max() < 1e-5
    assert (final.double() - final_ref).abs().max() < 1e-5


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("length", [33, 100])
def test_small_blocks_match_recurrence(length: int) -> None:
    inputs = make_inputs(length=length, g=2, D="hp", initial_state=True)
    y_ref, final_ref = recurrence(**inputs)
    for chunk in (1, 8, 16, 32, 64, 256):
        y, final = ssd_scan(**inputs, dt_softplus=True, chunk_size=chunk, return_final_state=True)
        assert (y - y_ref).abs().max() < 1e-12, chunk
        assert (final - final_ref).abs().max() < 1e-12, chunk


@pytest.mark.parametrize("autograd", [True, False], ids=["autograd", "no-grad"])
def test_batch_slices_change_nothing(autograd: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = make_inputs(b=5, length=70, g=2, initial_state=True, dtype=torch.float32)
    if autograd:
        inputs["x"].requires_grad_()
    whole = ssd_scan(**inputs, dt_softplus=True, return_final_state=True)
    monkeypatch.setattr(chunked, "_SLICE_BYTES", 1)
    assert chunked._slice_rows(inputs["x"], 2, 35) == 1
    sliced = ssd_scan(**inputs, dt_softplus=True, return_final_state=True)
    assert whole[0].requires_grad == autograd
    for a, b in zip(whole, sliced):
        assert (a - b).abs().max() < 1e-6


@pytest.mark.usefixtures("small_blocks")
def test_chunk_size_changes_nothing_float32() -> None:
    inputs = make_inputs(length=200, dtype=torch.float32, initial_state=True)
    outs = [ssd_scan(**inputs, dt_softplus=True, chunk_size=c, return_final_state=True) for c in (8, 16, 32, 64, 256)]
    for y, final in outs[1:]:
        assert (y - outs[0][0]).abs().max() < 1e-5
        assert (final - outs[0][1]).abs().max() < 1e-5


def test_block_length_rule() -> None:
    assert chunked._torch_block(50, 32) == 50  # the model's L = 50: one block, no state passing
    assert chunked._torch_block(200, 32) == 50
    assert chunked._torch_block(64, 32) == 65  # powers of two above 32 are slow in batched matmul
    assert chunked._torch_block(1, 32) == 1
    assert chunked._torch_block(1000, 256) == 250


GRAD_CASES = {
    "one-block": dict(length=20, g=1, D="h", initial_state=False, chunk=32),
    "blocks+pad+init": dict(length=23, g=2, D="hp", initial_state=True, chunk=5),
    "groups=heads": dict(length=12, g=4, D=None, initial_state=True, chunk=4),
    "one-step": dict(length=1, g=1, D="h", initial_state=True, chunk=8),
}


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("case", GRAD_CASES.values(), ids=GRAD_CASES.keys())
@pytest.mark.parametrize("use_final", [True, False], ids=["y+final", "y"])
@pytest.mark.parametrize("sliced", [False, True], ids=["whole-batch", "row-slices"])
def test_gradients_match_recurrence(case: dict, use_final: bool, sliced: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if sliced:  # the CPU path runs the batch in slices; one sequence per slice here
        monkeypatch.setattr(chunked, "_SLICE_BYTES", 1)
    case = dict(case)
    chunk = case.pop("chunk")
    inputs = make_inputs(b=2, h=4, p=3, n=5, **case)
    leaves = {k: v.requires_grad_() for k, v in inputs.items() if v is not None}
    gen = torch.Generator().manual_seed(1)
    wy = torch.randn(inputs["x"].shape, generator=gen, dtype=F64)
    wf = torch.randn(2, 4, 3, 5, generator=gen, dtype=F64)

    def loss(y: Tensor, final: Tensor) -> Tensor:
        return (y * wy).sum() + ((final * wf).sum() if use_final else 0)

    y_ref, final_ref = recurrence(**inputs)
    expected = torch.autograd.grad(loss(y_ref, final_ref), list(leaves.values()))
    if use_final:
        y, final = ssd_scan(**inputs, dt_softplus=True, chunk_size=chunk, return_final_state=True)
        got = torch.autograd.grad(loss(y, final), list(leaves.values()))
    else:
        y = ssd_scan(**inputs, dt_softplus=True, chunk_size=chunk)
        got = torch.autograd.grad((y * wy).sum(), list(leaves.values()), allow_unused=True)
    for name, e, g in zip(leaves, expected, got):
        assert g is not None, name
        assert (g - e).abs().max() < 1e-10 * max(1.0, e.abs().max().item()), name


def test_backward_twice_with_retained_graph() -> None:
    inputs = make_inputs(length=60, initial_state=True, dtype=torch.float32)
    x = inputs["x"].requires_grad_()
    y, final = ssd_scan(**inputs, dt_softplus=True, return_final_state=True)
    loss = y.square().sum() + final.sum()
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x)
    assert torch.equal(g1, g2)


def test_chaining_two_scans_through_the_state_equals_one_scan() -> None:
    inputs = make_inputs(length=90, g=2, D="h", initial_state=True, dtype=torch.float32)
    whole, final = ssd_scan(**inputs, dt_softplus=True, return_final_state=True)
    split = 37
    first = {k: (v[:, :split] if k in ("x", "dt", "B", "C") else v) for k, v in inputs.items()}
    second = {k: (v[:, split:] if k in ("x", "dt", "B", "C") else v) for k, v in inputs.items()}
    y1, mid = ssd_scan(**first, dt_softplus=True, return_final_state=True)
    second["initial_state"] = mid
    y2, final2 = ssd_scan(**second, dt_softplus=True, return_final_state=True)
    assert (torch.cat([y1, y2], 1) - whole).abs().max() < 1e-5
    assert (final2 - final).abs().max() < 1e-5


def test_step_repeated_equals_scan() -> None:
    inputs = make_inputs(length=40, g=2, D="hp", initial_state=True, dtype=torch.float32)
    y_scan, final_scan = ssd_scan(**inputs, dt_softplus=True, return_final_state=True)
    state = inputs["initial_state"]
    for t in range(40):
        y_t, state = ssd_step(
            state,
            inputs["x"][:, t],
            inputs["dt"][:, t],
            inputs["A"],
            inputs["B"][:, t],
            inputs["C"][:, t],
            D=inputs["D"],
            dt_bias=inputs["dt_bias"],
            dt_softplus=True,
        )
        assert y_t.shape == (2, 4, 8) and state.shape == (2, 4, 8, 16)
        assert (y_t - y_scan[:, t]).abs().max() < 1e-5, t
    assert (state - final_scan).abs().max() < 1e-5


def test_bfloat16_inputs() -> None:
    inputs = make_inputs(length=70, g=2, initial_state=True, dtype=torch.float32)
    y32 = ssd_scan(**inputs, dt_softplus=True)
    bf = {k: (v.bfloat16() if v is not None else None) for k, v in inputs.items()}
    bf["x"].requires_grad_()
    y16, final16 = ssd_scan(**bf, dt_softplus=True, return_final_state=True)
    assert y16.dtype == torch.bfloat16 and final16.dtype == torch.float32
    # Only the inputs are rounded to bf16 (8 bits of mantissa); the scan itself runs in float32.
    assert (y16.float() - y32).abs().max() < 0.05 * y32.abs().max()
    y16.float().sum().backward()
    assert bf["x"].grad.dtype == torch.bfloat16 and torch.isfinite(bf["x"].grad.float()).all()


def test_autocast_keeps_the_scan_in_float32() -> None:
    inputs = make_inputs(length=60, dtype=torch.float32)
    expected = ssd_scan(**inputs, dt_softplus=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ssd_scan(**inputs, dt_softplus=True)
    assert got.dtype == torch.float32 and (got - expected).abs().max() < 1e-6


def test_large_steps_stay_finite_and_exact() -> None:
    """Decays far below float32's range (exp(-1000)) neither overflow nor poison gradients."""
    inputs = make_inputs(length=80, dt_scale=30.0, initial_state=True)
    leaves = [v.requires_grad_() for v in inputs.values() if v is not None]
    y_ref, final_ref = recurrence(**inputs)
    f32 = {k: (v.detach().float().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    y, final = ssd_scan(**f32, dt_softplus=True, return_final_state=True)
    assert (y.double() - y_ref).abs().max() < 1e-4 * y_ref.abs().max()
    assert (final.double() - final_ref).abs().max() < 1e-4 * final_ref.abs().max()
    (y.sum() + final.sum()).backward()
    expected = torch.autograd.grad(y_ref.sum() + final_ref.sum(), leaves)
    # Steps of ~30 next to steps of ~0 make the decay-rate gradient a sum of large cancelling float32 terms: it
    # lands within ~1e-3 of the float64 value (the others within ~1e-6); a wrong formula would be O(1) off.
    for e, v in zip(expected, [v for v in f32.values() if v is not None]):
        assert torch.isfinite(v.grad).all()
        assert (v.grad.double() - e).abs().max() < 5e-3 * max(1.0, e.abs().max().item())


def test_strided_inputs_as_the_model_passes_them() -> None:
    """x, B, C and dt are slices of one projection in the model: non-contiguous views."""
    inputs = make_inputs(length=45, dtype=torch.float32)
    b, length, h, p = inputs["x"].shape
    n = inputs["B"].shape[-1]
    packed = torch.cat([inputs["x"].reshape(b, length, h * p), inputs["B"][:, :, 0], inputs["C"][:, :, 0]], -1)
    packed = torch.cat([packed, inputs["dt"]], -1)
    x, bm, cm, dt = torch.split(packed, [h * p, n, n, h], dim=-1)
    strided = dict(inputs, x=x.reshape(b, length, h, p), B=bm.unsqueeze(2), C=cm.unsqueeze(2), dt=dt)
    assert not strided["x"].is_contiguous() and not strided["dt"].is_contiguous()
    expected = ssd_scan(**inputs, dt_softplus=True)
    assert torch.equal(ssd_scan(**strided, dt_softplus=True), expected)


def test_empty_sequence() -> None:
    inputs = make_inputs(length=0, initial_state=True, dtype=torch.float32)
    y, final = ssd_scan(**inputs, return_final_state=True)
    assert y.shape == (2, 0, 4, 8) and torch.equal(final, inputs["initial_state"])


def test_bad_shapes_and_chunk_size() -> None:
    inputs = make_inputs(length=5, dtype=torch.float32)
    with pytest.raises(ValueError, match="not divisible"):
        ssd_scan(**dict(inputs, B=inputs["B"].expand(-1, -1, 3, -1), C=inputs["C"].expand(-1, -1, 3, -1)))
    with pytest.raises(ValueError, match="dt"):
        ssd_scan(**dict(inputs, dt=inputs["dt"][:, :4]))
    with pytest.raises(UserError, match="chunk_size"):
        ssd_scan(**inputs, chunk_size=0)


def _mamba_importable() -> bool:
    return ssd._mamba_available()


def test_backend_resolution() -> None:
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("torch", cpu) == "torch"
    assert resolve_backend("torch", torch.device("cuda")) == "torch"
    with pytest.raises(UserError, match=r"CUDA.*tim4rec-pl\[gpu\].*ssd_backend: torch"):
        resolve_backend("triton", cpu)
    with pytest.raises(UserError, match="unknown ssd_backend 'cuda'.*auto, torch, triton"):
        resolve_backend("cuda", cpu)
    inputs = make_inputs(length=3, dtype=torch.float32)
    with pytest.raises(UserError, match="ssd_backend 'triton'"):
        ssd_scan(**inputs, backend="triton")


@pytest.mark.skipif(_mamba_importable(), reason="mamba-ssm is installed here")
def test_triton_without_mamba_says_how_to_install() -> None:
    assert resolve_backend("auto", torch.device("cuda")) == "torch"
    with pytest.raises(UserError, match=r"mamba-ssm.*pip install .*'tim4rec-pl\[gpu\]'"):
        resolve_backend("triton", torch.device("cuda"))


@pytest.mark.skipif(not (torch.cuda.is_available() and _mamba_importable()), reason="needs CUDA and mamba-ssm")
class TestTritonBackend:
    """The fused kernels against the torch backend on the same GPU inputs."""

    @pytest.mark.parametrize("length", [50, 200, 777])
    def test_outputs_and_gradients_agree(self, length: int) -> None:
        inputs = make_inputs(b=4, length=length, h=4, p=32, n=32, g=1, D="h", initial_state=True)
        results = {}
        for backend in ("torch", "triton"):
            leaves = {k: v.float().cuda().requires_grad_() for k, v in inputs.items() if v is not None}
            y, final = ssd_scan(**leaves, dt_softplus=True, return_final_state=True, backend=backend)
            (y.square().sum() + final.sum()).backward()
            results[backend] = [y, final] + [leaves[k].grad for k in leaves]
        for t, r in zip(results["torch"], results["triton"]):
            torch.testing.assert_close(r, t, rtol=1e-3, atol=1e-3 * t.abs().max().item())

    def test_auto_picks_triton_on_cuda(self) -> None:
        assert resolve_backend("auto", torch.device("cuda")) == "triton"
