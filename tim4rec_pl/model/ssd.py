"""The SSD scan (Mamba-2 "state space duality"), the sequence mixer at the heart of TiM4Rec.

Shapes: batch b, length L, heads H of width P, state size N, groups G (H % G == 0; head h reads group
h // (H // G)). Inputs x (b, L, H, P), dt (b, L, H), A (H,), B and C (b, L, G, N).

Per head, with a (P, N) state S:

    delta_t = softplus(dt_t + dt_bias)        (softplus only when dt_softplus)
    S_t     = exp(delta_t * A) * S_{t-1} + delta_t * x_t B_t^T
    y_t     = S_t C_t + D * x_t

Unrolled, y = M (delta * x) + D * x with the 1-semiseparable mask
M[t, s] = C_t . B_s * exp(A * sum(delta_{s+1..t})) for s <= t, else 0.

The "torch" backend computes this in chunks of Q positions (c = L / Q chunks, the last one zero-padded):

    1. cum_t = sum of delta A from the chunk start to t                  (b, c, H, Q), float64
    2. intra-chunk: y = (tril(C B^T) * exp(cum_t - cum_s)) (delta x)     (b, c, H, Q, Q) @ (b, c, H, Q, P)
    3. chunk states: S_c = sum_s exp(cum_end - cum_s) delta_s x_s B_s^T  (b, c, H, P, N)
    4. passed along chunks: S_in[c+1] = exp(cum_end[c]) S_in[c] + S_c    (a short loop over chunks)
    5. inter-chunk: y += exp(cum_t) C_t S_in[c]^T                         (b, c, H, Q, N) @ (b, c, H, N, P)

any device, any L, differentiable through a hand-written backward (CPU: batch slices sized for the cache, with
the slice's terms recomputed in backward). The chunk size changes only the cost, never the result; on CPU the
block length is chosen for speed (see _torch_block). The "triton" backend calls mamba-ssm's fused kernels
(CUDA only, optional dependency, imported lazily).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from tim4rec_pl.errors import UserError

BACKENDS = ("auto", "torch", "triton")

# Log-decays are floored here before exp: e^-50 ~ 2e-22 is far below float32 resolution, and the floor keeps
# subnormal floats (about 100x slower on x86 CPUs) out of the hot loops when decays get very small.
_MIN_LOG_DECAY = -50.0

# The torch backend's shortest block (see _torch_block); tests lower it to exercise small blocks.
_MIN_TORCH_BLOCK = 48

# Target bytes of one batch slice's working set on CPU, per intra-op thread (see _slice_rows).
_SLICE_BYTES = 8 << 20

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
    delta = dt.to(dtype)
    if dt_bias is not None:
        delta = delta + dt_bias.to(dtype)
    if dt_softplus:
        delta = F.softplus(delta)
    return delta


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
            _MIN_TORCH_BLOCK (48) positions on any device, see `_torch_block`. Changes the cost, never the result.
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
    cast = [None if t is None else t.to(dtype) for t in (x, A, B, C, D, initial_state)]
    xf, Af, Bf, Cf, Df, s0 = cast
    out = None
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (*cast, delta))):
        qi = _inference_block(x.shape[1], chunk_size)
        while True:  # shorter blocks when a block's log-decays spread too far (rare), then the exact path
            out = _scan_inference(xf, delta, Af, Bf, Cf, Df, s0, qi, need_final)
            if out is not None or qi < 16:
                break
            qi //= 2
    y, final = out if out is not None else _ChunkedScan.apply(xf, delta, Af, Bf, Cf, Df, s0, q, need_final)
    return y.to(x.dtype), (final if need_final else None)


def _torch_block(seqlen: int, chunk_size: int) -> int:
    """Block length for the torch backend: about max(chunk_size, _MIN_TORCH_BLOCK), balanced over the sequence.

    Measured on CPU (MKL): batched matmuls of (Q, Q) blocks with Q <= 32 or Q a power of two run 2-3x slower
    than Q in 33..63, and a single block beats two padded ones (L = 50 with chunk 32 is one block of 50).
    """
    n = max(1, round(seqlen / max(chunk_size, _MIN_TORCH_BLOCK)))
    q = -(-seqlen // n)
    return q + 1 if q > 32 and q & (q - 1) == 0 else q


def _inference_block(seqlen: int, chunk_size: int) -> int:
    """Block length of the forward-only path: about max(chunk_size, _MIN_TORCH_BLOCK), preferring a divisor of the
    length (padding copies every input) within [0.8, 1.4] x that target; measured on CPU at L = 50, 200, 800."""
    target = max(chunk_size, _MIN_TORCH_BLOCK)
    divisors = [d for d in range(int(0.8 * target), int(1.4 * target) + 1) if d and seqlen % d == 0]
    if seqlen <= 1.4 * target:
        return seqlen
    if divisors:
        return min(divisors, key=lambda d: abs(d - target))
    return -(-seqlen // max(1, round(seqlen / target)))


def _scan_inference(
    x: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    s0: Tensor | None,
    q: int,
    need_final: bool,
) -> tuple[Tensor, Tensor | None] | None:
    """The chunked SSD without autograd, for inference: the same result as `_ChunkedScan` with less work.

    Within a chunk the decay factorises, exp(cum_t - cum_s) = exp(cum_t - m) exp(m - cum_s), with m the midpoint of
    the chunk's log-decays. So C B^T is formed once per group (not once per head), the heads of a group ride along
    as the columns of one (Q, Q) @ (Q, hg P) product, and the chunk states need no per-head copy of B:

        U_s = x_s delta_s exp(m - cum_s);   y_t = exp(cum_t - m) (tril(C B^T) U)_t + exp(cum_t) C_t S_in^T + D x_t
        S_chunk = exp(cum_end - m) U^T B

    The factors are computed in float64 and are at most exp(spread / 2) apart from 1; a chunk whose log-decays spread
    more than _MAX_FACTOR_SPREAD would push them towards float32's range, so then this returns None and the caller
    runs the exact path. Shapes and arguments as `_ChunkedScan.forward` (x's dtype is the compute dtype).
    """
    b, seqlen, h, p = x.shape
    n = B.shape[3]
    c = -(-seqlen // q)
    pad = c * q - seqlen
    delta = _pad_len(delta, pad)
    cum = (delta.double() * A.double()).view(b, c, q, h).cumsum(2)  # (b, c, Q, H): log-decay from the chunk start
    if b and float((cum[:, :, 0] - cum[:, :, -1]).max()) > _MAX_FACTOR_SPREAD:
        return None
    x, B, C = (_pad_len(t, pad) for t in (x, B, C))
    inter = c > 1 or s0 is not None or need_final
    out = torch.empty(b, c * q, h, p, dtype=x.dtype, device=x.device)
    final = x.new_empty(b, h, p, n) if need_final else None
    # Batch slices on one CPU thread (cache-sized, like the autograd path's); several threads share out the whole
    # batch op by op instead (measured at L = 200, batch 256: 46 ms in 4 MiB slices on one thread; 34 ms whole vs
    # 41 ms in 16 MiB slices on two).
    per_seq = c * q * (q + 4 * h * p + 2 * n) * x.element_size()  # a slice's main buffers
    one_thread = x.device.type == "cpu" and torch.get_num_threads() == 1
    rows = max(1, min(b, _INFERENCE_SLICE_BYTES // per_seq)) if one_thread else b
    for r in range(0, b, rows):
        sl = slice(r, r + rows)
        state = _inference_slice(
            x[sl], delta[sl], cum[sl], B[sl], C[sl], D, None if s0 is None else s0[sl], inter, out[sl]
        )
        if final is not None:
            final[sl] = state
    return (out[:, :seqlen] if pad else out), final


def _inference_slice(x, delta, cum, B, C, D, s0, inter: bool, out: Tensor) -> Tensor | None:
    """`_scan_inference` on one batch slice (padded to whole chunks); writes y + D x into out, returns the final
    state (inter only)."""
    b, lp, h, p = x.shape
    _, c, q, _ = cum.shape
    g, n = B.shape[2], B.shape[3]
    hg, dtype = h // g, x.dtype
    mid = 0.5 * (cum[:, :, :1] + cum[:, :, -1:])  # (b, c, 1, H)
    out_scale = (cum - mid).exp_().to(dtype)  # (b, c, Q, H): exp(cum_t - m)
    in_scale = (mid - cum).exp_().mul_(delta.view(b, c, q, h)).to(dtype)  # (b, c, Q, H): delta_s exp(m - cum_s)
    # Heads of a group side by side, (b, c, G, Q, hg P); with one group these are views of the (b, L, H, P) layout.
    u = (x.view(b, c, q, h, p) * in_scale[..., None]).view(b, c, q, g, hg * p).transpose(2, 3)
    bg = B.reshape(b, c, q, g, n).transpose(2, 3)  # (b, c, G, Q, N)
    cg = C.reshape(b, c, q, g, n).transpose(2, 3)  # (b, c, G, Q, N)
    y = (cg @ bg.transpose(-1, -2)).tril_() @ u  # (b, c, G, Q, hg P)
    heads = (b, c, g, q, hg, p)  # y's layout, per head

    def per_head(scale: Tensor) -> Tensor:  # (b, c, Q, H) -> broadcastable to `heads`
        return scale.view(b, c, q, g, hg).transpose(2, 3)[..., None]

    y.view(heads).mul_(per_head(out_scale))
    state = None
    if inter:
        end = cum[:, :, -1]  # (b, c, H)
        chunk_states = (u.transpose(-1, -2) @ bg).view(b, c, h, p, n)  # (b, c, H, P, N), before exp(cum_end - m)
        chunk_states.mul_((end - mid[:, :, 0]).exp_().to(dtype)[..., None, None])
        decay = end.clamp(min=_MIN_LOG_DECAY).exp_().to(dtype)  # (b, c, H): across the whole chunk
        s_in = torch.empty(b, c, h, p, n, dtype=dtype, device=x.device)  # state entering each chunk
        state = s0 if s0 is not None else x.new_zeros(b, h, p, n)
        for ci in range(c):
            s_in[:, ci] = state
            state = torch.addcmul(chunk_states[:, ci], state, decay[:, ci, :, None, None])
        y_in = cg @ s_in.view(b, c, g, hg * p, n).transpose(-1, -2)  # (b, c, G, Q, hg P): C_t S_in^T
        ein = cum.clamp(min=_MIN_LOG_DECAY).exp_().to(dtype)  # (b, c, Q, H): decay from the chunk start to t
        y.view(heads).addcmul_(y_in.view(heads), per_head(ein))
    y = y.transpose(2, 3).reshape(b, lp, h, p)  # a view when G = 1
    if D is None:
        out.copy_(y)
    else:
        torch.addcmul(y, x, D[:, None] if D.dim() == 1 else D, out=out)
    return state


# Target bytes of one batch slice of the inference path on one CPU thread (see _scan_inference).
_INFERENCE_SLICE_BYTES = 4 << 20

# Largest spread of a chunk's log-decays (first minus last) that `_scan_inference` accepts: its factors stay within
# exp(+-60), far inside float32's range (~e^88), and as accurate as the exact path's (tests/test_ssd.py).
_MAX_FACTOR_SPREAD = 120.0


def _pad_len(t: Tensor, pad: int) -> Tensor:
    """Zero-pad dim 1 (the sequence axis) at the end (a copy into zeros: F.pad is several times slower on CPU)."""
    if not pad:
        return t
    out = t.new_zeros(t.shape[0], t.shape[1] + pad, *t.shape[2:])
    out[:, : t.shape[1]] = t
    return out


def _per_head(t: Tensor, scale: Tensor, hg: int) -> Tensor:
    """(b, c, G, Q, K) * (b, c, H, Q) -> (b, c, H, Q, K), head h scaling group h // hg."""
    b, c, g, q, k = t.shape
    out = torch.empty(b, c, g, hg, q, k, dtype=t.dtype, device=t.device)
    torch.mul(t[:, :, :, None], scale.view(b, c, g, hg, q, 1), out=out)
    return out.view(b, c, g * hg, q, k)


def _sum_groups(t: Tensor, g: int) -> Tensor:
    """(b, c, H, Q, K) -> (b, c, G, Q, K): sum the heads that share a group."""
    b, c, h, q, k = t.shape
    return t if g == h else t.view(b, c, g, h // g, q, k).sum(3)


def _decays(cum: Tensor, dtype: torch.dtype) -> Tensor:
    """exp(cum_t - cum_s) in `dtype`, (b, c, H, Q, Q); 1 above the diagonal (there C.B is masked to 0 instead).

    cum is float64 and non-increasing. A float32 copy of it would lose the digits that small differences need
    once |cum| is large, so it is split into float32 hi + lo parts and the differences are formed as
    (hi_t - hi_s) + lo_t - lo_s: float32 work, float64-like accuracy. cum_t - cum_s <= 0 for s <= t, so the upper
    clamp only touches the upper triangle: no exponent is ever positive.
    """
    b, c, h, q = cum.shape
    hi = cum.to(dtype)
    out = torch.empty(b, c, h, q, q, dtype=dtype, device=cum.device)
    torch.sub(hi[..., :, None], hi[..., None, :], out=out)
    if dtype != cum.dtype:
        lo = (cum - hi).to(dtype)
        out.add_(lo[..., :, None]).sub_(lo[..., None, :])
    return out.clamp_(_MIN_LOG_DECAY, 0.0).exp_()


def _exp_decay(log_decay: Tensor, dtype: torch.dtype) -> Tensor:
    return log_decay.clamp(min=_MIN_LOG_DECAY).exp_().to(dtype)


def _slice_rows(x: Tensor, c: int, q: int) -> int:
    """Sequences per batch slice: on CPU, small enough that a slice's (Q, Q) and (Q, P) buffers stay in cache and
    come from the allocator's free lists rather than fresh (page-faulting) memory; one slice elsewhere."""
    b, _, h, p = x.shape
    if x.device.type != "cpu":
        return b
    per_seq = c * h * q * (q + 3 * p) * x.element_size()
    return max(1, min(b, _SLICE_BYTES * torch.get_num_threads() // per_seq))


def _chunk_terms(x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, s0: Tensor | None, q: int, inter: bool):
    """The chunked decomposition of one batch slice, shared by forward and backward (which recomputes it)."""
    b, seqlen, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    hg = h // g
    c = -(-seqlen // q)
    pad = c * q - seqlen
    # Padding with delta = 0 (decay 1, no input) leaves the state and the kept outputs unchanged.
    x, delta, B, C = (_pad_len(t, pad) for t in (x, delta, B, C))
    t = SimpleNamespace(b=b, c=c, h=h, q=q, p=p, g=g, n=n, hg=hg, inter=inter)
    t.xv = x.reshape(b, c, q, h, p)  # (b, c, Q, H, P)
    t.dl = delta.reshape(b, c, q, h).transpose(2, 3)  # (b, c, H, Q)
    t.cum = (t.dl.double() * A.double()[:, None]).cumsum(-1).contiguous()  # (b, c, H, Q): log-decay, float64
    t.xd = torch.empty(b, c, h, q, p, dtype=x.dtype, device=x.device)
    torch.mul(t.xv.transpose(2, 3), t.dl[..., None], out=t.xd)  # (b, c, H, Q, P): delta_s x_s
    t.Bg = B.reshape(b, c, q, g, n).transpose(2, 3)  # (b, c, G, Q, N)
    t.Cg = C.reshape(b, c, q, g, n).transpose(2, 3)  # (b, c, G, Q, N)
    # Intra-chunk: y_t = sum_{s<=t} (C_t . B_s) exp(cum_t - cum_s) xd_s, one (Q, Q) matrix per head.
    t.CB = (t.Cg @ t.Bg.transpose(-1, -2)).tril_()  # (b, c, G, Q, Q), causal mask
    t.M = _decays(t.cum, x.dtype)  # (b, c, H, Q, Q)
    t.M.view(b, c, g, hg, q, q).mul_(t.CB[:, :, :, None])
    if inter:  # chunk-end states, passed along chunks, read back through C
        t.w = _exp_decay(t.cum[..., -1:] - t.cum, x.dtype)  # (b, c, H, Q): decay from s to the chunk end
        t.Bw = _per_head(t.Bg, t.w, hg)  # (b, c, H, Q, N)
        states = t.xd.transpose(-1, -2) @ t.Bw  # (b, c, H, P, N)
        t.decay = _exp_decay(t.cum[..., -1], x.dtype)  # (b, c, H): decay across the whole chunk
        t.s_prev = torch.empty(b, c, h, p, n, dtype=x.dtype, device=x.device)  # state entering each chunk
        if s0 is None:
            t.s_prev[:, 0].zero_()
        else:
            t.s_prev[:, 0].copy_(s0)
        for ci in range(c - 1):
            torch.addcmul(states[:, ci], t.s_prev[:, ci], t.decay[:, ci, :, None, None], out=t.s_prev[:, ci + 1])
        t.final = torch.addcmul(states[:, -1], t.s_prev[:, -1], t.decay[:, -1, :, None, None])  # (b, H, P, N)
        t.ein = _exp_decay(t.cum, x.dtype)  # (b, c, H, Q): decay from the chunk start to t
        t.Cw = _per_head(t.Cg, t.ein, hg)  # (b, c, H, Q, N)
    return t


def _output(t: SimpleNamespace, D: Tensor | None, out: Tensor) -> None:
    """Write y + D x into out, (b, c, Q, H, P)."""
    y = t.M @ t.xd  # (b, c, H, Q, P)
    if t.inter:
        y.view(-1, t.q, t.p).baddbmm_(t.Cw.view(-1, t.q, t.n), t.s_prev.view(-1, t.p, t.n).transpose(1, 2))
    if D is None:
        out.copy_(y.transpose(2, 3))
    else:
        torch.addcmul(y.transpose(2, 3), t.xv, D[:, None] if D.dim() == 1 else D, out=out)


def _gradients(t: SimpleNamespace, A: Tensor, D: Tensor | None, dov: Tensor, dfinal: Tensor | None, grads: dict):
    """Backward of one slice: writes grads["x"], ["delta"], ["B"], ["C"], ["s0"] (padded, (b, c, Q, ...) views)
    and accumulates grads["A"], grads["D"]."""
    b, c, h, q, p, g, n = t.b, t.c, t.h, t.q, t.p, t.g, t.n
    dy = dov.transpose(2, 3).contiguous()  # (b, c, H, Q, P)
    # 1. Intra-chunk. With E the decays and M = CB * E: d(CB) = sum_h dM * E, d(log-decay) = dM * M.
    dxd = t.M.transpose(-1, -2) @ dy  # (b, c, H, Q, P)
    dM = dy @ t.xd.transpose(-1, -2)  # (b, c, H, Q, Q)
    dCB = _sum_groups(_decays(t.cum, dM.dtype).mul_(dM), g).tril_()  # (b, c, G, Q, Q)
    dseg = dM.mul_(t.M)
    dseg.diagonal(dim1=-2, dim2=-1).zero_()  # exp(cum_t - cum_t) is constant; dropping it avoids cancellation
    dcum = dseg.sum(-1) - dseg.sum(-2)  # (b, c, H, Q); d/dcum_t of exp(cum_t - cum_s)
    dCg = dCB @ t.Bg  # (b, c, G, Q, N)
    dBg = dCB.transpose(-1, -2) @ t.Cg  # (b, c, G, Q, N)
    if t.inter:
        # y += Cw @ s_prev^T
        dCw = dy @ t.s_prev  # (b, c, H, Q, N)
        dS = dy.transpose(-1, -2) @ t.Cw  # (b, c, H, P, N)
        dCg += _sum_groups(dCw * t.ein[..., None], g)
        dcum += dCw.mul_(t.Cw).sum(-1)
        # Chunk-to-chunk recurrence, backwards: s_next = decay * s + states.
        grad = dfinal.clone() if dfinal is not None else t.s_prev.new_zeros(b, h, p, n)
        dstates = torch.empty_like(t.s_prev)  # (b, c, H, P, N)
        ddecay = t.decay.new_empty(b, c, h)
        for ci in reversed(range(c)):
            dstates[:, ci] = grad
            ddecay[:, ci] = (grad * t.s_prev[:, ci]).sum((-1, -2))
            grad = torch.addcmul(dS[:, ci], grad, t.decay[:, ci, :, None, None])
        if "s0" in grads:
            grads["s0"].copy_(grad)
        # states = xd^T @ Bw
        dxd.view(-1, q, p).baddbmm_(t.Bw.view(-1, q, n), dstates.view(-1, p, n).transpose(1, 2))
        dBw = t.xd @ dstates  # (b, c, H, Q, N)
        dBg += _sum_groups(dBw * t.w[..., None], g)
        dw = dBw.mul_(t.Bw).sum(-1)[..., :-1]  # (b, c, H, Q - 1): d/dlog(w); w = 1 at the chunk end
        dcum[..., :-1] -= dw
        dcum[..., -1] += dw.sum(-1) + ddecay * t.decay
    # 2. cum is a within-chunk cumsum of dA = delta * A; xd = delta * x.
    ddA = dcum.flip(-1).cumsum(-1).flip(-1)  # (b, c, H, Q)
    grads["delta"].copy_(((dxd * t.xv.transpose(2, 3)).sum(-1).add_(ddA * A[:, None])).transpose(2, 3))
    grads["A"] += (ddA * t.dl).sum((0, 1, 3))
    torch.mul(dxd.transpose(2, 3), t.dl.transpose(2, 3)[..., None], out=grads["x"])
    if D is not None:
        grads["x"].addcmul_(dov, D[:, None] if D.dim() == 1 else D)
        dD = (dov * t.xv).sum((0, 1, 2))  # (H, P)
        grads["D"] += dD.sum(-1) if D.dim() == 1 else dD
    grads["B"].copy_(dBg.transpose(2, 3))
    grads["C"].copy_(dCg.transpose(2, 3))


class _ChunkedScan(torch.autograd.Function):
    """The chunked SSD with a hand-written backward pass, run over batch slices.

    Autograd over the same algebra spent most of its CPU time allocating fresh (Q, Q) and (Q, P) buffers and
    re-laying out strided gradients. Here each batch slice is computed while its buffers are in cache, large
    intermediates are updated in place, and backward recomputes a slice's terms instead of keeping them (so
    memory holds the inputs only, like activation checkpointing).
    """

    @staticmethod
    def forward(ctx, x, delta, A, B, C, D, s0, q, need_final):  # noqa: D102
        b, seqlen, h, p = x.shape
        n = B.shape[3]
        c = -(-seqlen // q)
        inter = c > 1 or s0 is not None or need_final
        out = torch.empty(b, c * q, h, p, dtype=x.dtype, device=x.device)
        final = x.new_empty(b, h, p, n) if inter else x.new_empty(0)
        rows = _slice_rows(x, c, q)
        for r in range(0, b, rows):
            sl = slice(r, r + rows)
            t = _chunk_terms(x[sl], delta[sl], A, B[sl], C[sl], None if s0 is None else s0[sl], q, inter)
            _output(t, D, out[sl].view(-1, c, q, h, p))
            if inter:
                final[sl] = t.final
        ctx.save_for_backward(x, delta, A, B, C, D, s0)
        ctx.q, ctx.inter, ctx.rows = q, inter, rows
        ctx.set_materialize_grads(False)
        if not need_final:
            ctx.mark_non_differentiable(final)
        return (out[:, :seqlen].contiguous() if c * q > seqlen else out), final

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dfinal):  # noqa: D102
        x, delta, A, B, C, D, s0 = ctx.saved_tensors
        b, seqlen, h, p = x.shape
        g, n = B.shape[2], B.shape[3]
        q, rows = ctx.q, ctx.rows
        c = -(-seqlen // q)
        lp = c * q
        if dout is None:
            dout = x.new_zeros(b, seqlen, h, p)
        full = dict(x=x.new_empty(b, lp, h, p), delta=x.new_empty(b, lp, h), B=x.new_empty(b, lp, g, n))
        full.update(C=x.new_empty(b, lp, g, n), A=torch.zeros_like(A))
        if D is not None:
            full["D"] = torch.zeros_like(D)
        if s0 is not None:
            full["s0"] = torch.empty_like(s0)
        for r in range(0, b, rows):
            sl = slice(r, r + rows)
            t = _chunk_terms(x[sl], delta[sl], A, B[sl], C[sl], None if s0 is None else s0[sl], q, ctx.inter)
            dov = _pad_len(dout[sl], lp - seqlen).reshape(-1, c, q, h, p)
            grads = dict(A=full["A"], x=full["x"][sl].view(-1, c, q, h, p), delta=full["delta"][sl].view(-1, c, q, h))
            grads.update(B=full["B"][sl].view(-1, c, q, g, n), C=full["C"][sl].view(-1, c, q, g, n))
            if D is not None:
                grads["D"] = full["D"]
            if s0 is not None:
                grads["s0"] = full["s0"][sl]
            _gradients(t, A, D, dov, None if dfinal is None else dfinal[sl], grads)
        dx, ddelta, dB, dC = (full[k][:, :seqlen] if lp > seqlen else full[k] for k in ("x", "delta", "B", "C"))
        return dx, ddelta, full["A"], dB, dC, full.get("D"), full.get("s0"), None, None


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
