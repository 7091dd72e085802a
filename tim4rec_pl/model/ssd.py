"""The SSD scan (Mamba-2 "state space duality"), the sequence mixer at the heart of TiM4Rec.

Shapes: batch b, length L, heads H of width P, state size N, groups G (H % G == 0; head h reads group
h // (H // G)). Inputs x (b, L, H, P), dt (b, L, H), A (H,), B and C (b, L, G, N).

Per head, with a (P, N) state S:

    delta_t = softplus(dt_t + dt_bias)        (softplus only when dt_softplus; `ssd_minimal.step_sizes`)
    S_t     = exp(delta_t * A) * S_{t-1} + delta_t * x_t B_t^T
    y_t     = S_t C_t + D * x_t

The plain definition of this (a recurrence and a chunked einsum form) is `tim4rec_pl.model.ssd_minimal`; the
implementations here are tested against it. The "torch" backend is the chunked scan with a hand-written backward
(`tim4rec_pl.model.chunked_scan`): any device, any L. The "triton" backend calls mamba-ssm's fused kernels (CUDA
only, optional dependency, imported lazily). `ssd_step` advances the recurrence by one position (streaming). The
forward-only scan used for CPU inference lives in `tim4rec_pl.inference.scan`.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from tim4rec_pl.errors import UserError
from tim4rec_pl.model.chunked_scan import _ChunkedScan, _torch_block
from tim4rec_pl.model.ssd_minimal import step_sizes

BACKENDS = ("auto", "torch", "triton")

# How to get the fused kernel: mamba-ssm's build imports torch, hence no build isolation.
INSTALL_COMMAND = "pip install --no-build-isolation 'tim4rec-pl[gpu]'"
_GPU_HINT = f"install the `gpu` extra ({INSTALL_COMMAND}) or set `ssd_backend: torch`"


@functools.cache
def _mamba_available() -> bool:
    """Whether mamba-ssm's Triton SSD kernels import here (checked once per process)."""
    try:
        import mamba_ssm.ops.triton.ssd_combined  # noqa: F401
    except Exception:  # ImportError, or triton failing to find a GPU/compiler at import
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """Choose the SSD implementation for tensors on `device`.

    Args:
        backend: "auto" (Triton on CUDA when mamba-ssm imports, else torch), "torch" or "triton".
        device: device the inputs live on.

    Returns:
        "torch" or "triton".
    """
    if backend not in BACKENDS:
        raise UserError(f"unknown ssd_backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    device = torch.device(device)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and _mamba_available() else "torch"
    if device.type != "cuda":
        raise UserError(f"ssd_backend 'triton' needs a CUDA device but the inputs are on {device.type}: {_GPU_HINT}")
    if not _mamba_available():
        raise UserError(f"ssd_backend 'triton' needs mamba-ssm and triton, which do not import here: {_GPU_HINT}")
    return "triton"


def mamba_import_error() -> str | None:
    """Why mamba-ssm's Triton SSD kernels do not import here, as one line ("ModuleNotFoundError: ..."), or None."""
    try:
        import mamba_ssm.ops.triton.ssd_combined  # noqa: F401
    except Exception as err:  # the same failures `_mamba_available` treats as "not available"
        lines = str(err).strip().splitlines()
        return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    return None


def explain_backend(backend: str, device: torch.device | str) -> tuple[str, str, str | None]:
    """Which SSD implementation `ssd_scan` runs for `backend` on `device`, why, and a warning when "auto" has to
    fall back to the PyTorch scan on CUDA (the fused kernel is missing or broken there).

    Returns:
        (resolved backend, a short reason for the log, the warning or None).

    Raises:
        UserError: as `resolve_backend`, e.g. "triton" where it cannot run.
    """
    resolved = resolve_backend(backend, device)
    device = torch.device(device)
    if backend != "auto":
        return resolved, f"ssd_backend: {backend}", None
    if resolved == "triton":
        return resolved, "auto: CUDA with mamba-ssm's fused kernel", None
    if device.type != "cuda":
        return resolved, f"auto: the fused kernel runs on CUDA only, this run is on {device.type}", None
    error = mamba_import_error() or "its kernels did not import earlier in this process"
    warning = (
        f"ssd_backend auto falls back to the slower PyTorch scan on CUDA: mamba-ssm does not import ({error}); "
        f"install the fused kernel with `{INSTALL_COMMAND}`, or set ssd_backend: torch to silence this"
    )
    return resolved, "auto: mamba-ssm does not import", warning


def _compute_dtype(x: Tensor) -> torch.dtype:
    # Half-precision inputs are upcast; float64 stays float64 (used by the reference tests).
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _step_sizes(dt: Tensor, dt_bias: Tensor | None, dt_softplus: bool, dtype: torch.dtype) -> Tensor:
    """`ssd_minimal.step_sizes` in the compute dtype (or dt itself, cast, without bias and softplus)."""
    return step_sizes(dt.to(dtype), dt_bias, softplus=dt_softplus)


def _check_shapes(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, initial_state: Tensor | None) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be (B, L, H, P), got {tuple(x.shape)}")
    b, seqlen, h, p = x.shape
    if dt.shape != (b, seqlen, h) or A.shape != (h,):
        raise ValueError(f"dt {tuple(dt.shape)} / A {tuple(A.shape)} do not match x {tuple(x.shape)}")
    if B.dim() != 4 or B.shape[:2] != (b, seqlen) or C.shape != B.shape:
        raise ValueError(f"B {tuple(B.shape)} and C {tuple(C.shape)} must both be (B, L, G, N) with x {tuple(x.shape)}")
    if h % B.shape[2]:
        raise ValueError(f"{h} heads are not divisible into {B.shape[2]} groups")
    if initial_state is not None and initial_state.shape != (b, h, p, B.shape[3]):
        raise ValueError(f"initial_state {tuple(initial_state.shape)} must be (B, H, P, N) = {(b, h, p, B.shape[3])}")


def ssd_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    initial_state: Tensor | None = None,
    chunk_size: int = 32,
    return_final_state: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Run the SSD recurrence over whole sequences.

    Args:
        x: inputs, (B, L, H, P).
        dt: raw step sizes, before dt_bias and softplus, (B, L, H).
        A: negative decay rates, (H,) (A = -exp(A_log)).
        B: input projections, (B, L, G, N).
        C: output projections, (B, L, G, N).
        D: skip connection, (H,) or (H, P); None for no skip.
        dt_bias: added to dt before the softplus, (H,).
        dt_softplus: apply softplus to dt + dt_bias.
        initial_state: state before the first position, (B, H, P, N); zeros when None.
        chunk_size: positions per chunk, as the Triton kernels use it; the torch backend blocks by at least
            48 positions on any device, see `chunked_scan._torch_block`. Changes the cost, never the result.
        return_final_state: also return the state after the last position.
        backend: "auto", "torch" or "triton" (see `resolve_backend`).

    Returns:
        y (B, L, H, P) in x's dtype, and with return_final_state the final state (B, H, P, N) in float32
        (float64 for float64 inputs).
    """
    _check_shapes(x, dt, A, B, C, initial_state)
    if chunk_size < 1:
        raise UserError(f"chunk_size must be a positive integer, got {chunk_size}: set `chunk_size` to e.g. 32")
    use_triton = resolve_backend(backend, x.device) == "triton"
    if x.shape[1] == 0:  # nothing to scan: the state passes through unchanged
        b, _, h, p = x.shape
        s = initial_state if initial_state is not None else x.new_zeros(b, h, p, B.shape[3])
        return (x.new_zeros(x.shape), s.to(_compute_dtype(x))) if return_final_state else x.new_zeros(x.shape)
    if use_triton:
        return _scan_triton(x, dt, A, B, C, D, dt_bias, dt_softplus, initial_state, chunk_size, return_final_state)
    with torch.autocast(device_type=x.device.type, enabled=False):  # decays and sums must stay in float32
        y, final = _scan_torch(x, dt, A, B, C, D, dt_bias, dt_softplus, initial_state, chunk_size, return_final_state)
    return (y, final) if return_final_state else y


def _scan_torch(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    dt_bias: Tensor | None,
    dt_softplus: bool,
    initial_state: Tensor | None,
    chunk_size: int,
    need_final: bool,
) -> tuple[Tensor, Tensor | None]:
    dtype = _compute_dtype(x)
    delta = _step_sizes(dt, dt_bias, dt_softplus, dtype)  # (b, L, H); small, left to autograd
    q = _torch_block(x.shape[1], chunk_size)
    xf, Af, Bf, Cf, Df, s0 = (None if t is None else t.to(dtype) for t in (x, A, B, C, D, initial_state))
    y, final = _ChunkedScan.apply(xf, delta, Af, Bf, Cf, Df, s0, q, need_final)
    return y.to(x.dtype), (final if need_final else None)


def _scan_triton(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    dt_bias: Tensor | None,
    dt_softplus: bool,
    initial_state: Tensor | None,
    chunk_size: int,
    need_final: bool,
) -> Tensor | tuple[Tensor, Tensor]:
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    out = mamba_chunk_scan_combined(
        x.contiguous(),
        dt.contiguous(),
        A.float(),
        B.contiguous(),
        C.contiguous(),
        chunk_size,
        D=None if D is None else D.float(),
        dt_bias=None if dt_bias is None else dt_bias.float(),
        initial_states=None if initial_state is None else initial_state.float().contiguous(),
        dt_softplus=dt_softplus,
        return_final_states=need_final,
    )
    if need_final:
        y, final = out
        return y, final.float()
    return out


def ssd_step(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
) -> tuple[Tensor, Tensor]:
    """Advance the recurrence by one position (streaming inference).

    Args:
        state: state before this position, (B, H, P, N).
        x: input at this position, (B, H, P).
        dt: raw step size, (B, H).
        A: negative decay rates, (H,).
        B: input projection, (B, G, N).
        C: output projection, (B, G, N).
        D: skip connection, (H,) or (H, P).
        dt_bias: added to dt before the softplus, (H,).
        dt_softplus: apply softplus to dt + dt_bias.

    Returns:
        y (B, H, P) in x's dtype, and the new state (B, H, P, N) in float32 (float64 for float64 inputs).
    """
    h, g = x.shape[1], B.shape[1]
    dtype = _compute_dtype(x)
    delta = _step_sizes(dt, dt_bias, dt_softplus, dtype)  # (b, H)
    xf = x.to(dtype)
    Bh = B.to(dtype).repeat_interleave(h // g, dim=1)  # (b, H, N)
    Ch = C.to(dtype).repeat_interleave(h // g, dim=1)  # (b, H, N)
    decay = (delta * A.to(dtype)).exp()[..., None, None]  # (b, H, 1, 1)
    new_state = decay * state.to(dtype) + (xf * delta[..., None])[..., None] * Bh[:, :, None, :]  # (b, H, P, N)
    y = (new_state @ Ch[..., None]).squeeze(-1)  # (b, H, P)
    if D is not None:
        y = y + xf * (D.to(dtype)[:, None] if D.dim() == 1 else D.to(dtype))
    return y.to(x.dtype), new_state
