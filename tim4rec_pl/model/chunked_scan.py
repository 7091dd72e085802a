"""The chunked SSD scan of the torch backend, with a hand-written backward pass (the training hot path).

Computes what `tim4rec_pl.model.ssd_minimal.ssd_chunked` computes (tests/test_ssd.py holds it to it), in blocks
of Q positions (c = L / Q blocks, the last one zero-padded):

    1. cum_t = sum of delta A from the block start to t                  (b, c, H, Q), float64
    2. intra-block: y = (tril(C B^T) * exp(cum_t - cum_s)) (delta x)     (b, c, H, Q, Q) @ (b, c, H, Q, P)
    3. block states: S_c = sum_s exp(cum_end - cum_s) delta_s x_s B_s^T  (b, c, H, P, N)
    4. passed along blocks: S_in[c+1] = exp(cum_end[c]) S_in[c] + S_c    (a short loop over blocks)
    5. inter-block: y += exp(cum_t) C_t S_in[c]^T                         (b, c, H, Q, N) @ (b, c, H, N, P)

On CPU the batch runs in slices sized for the cache, and backward recomputes a slice's terms instead of keeping
them. The block length is chosen for speed (`torch_block`); it changes the cost, never the result.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

# Log-decays are floored here before exp: e^-50 ~ 2e-22 is far below float32 resolution, and the floor keeps
# subnormal floats (about 100x slower on x86 CPUs) out of the hot loops when decays get very small.
_MIN_LOG_DECAY = -50.0

# The torch backend's shortest block (see _torch_block); tests lower it to exercise small blocks.
_MIN_TORCH_BLOCK = 48

# Target bytes of one batch slice's working set on CPU, per intra-op thread (see _slice_rows).
_SLICE_BYTES = 8 << 20


def _torch_block(seqlen: int, chunk_size: int) -> int:
    """Block length for the torch backend: about max(chunk_size, _MIN_TORCH_BLOCK), balanced over the sequence.

    Measured on CPU (MKL): batched matmuls of (Q, Q) blocks with Q <= 32 or Q a power of two run 2-3x slower
    than Q in 33..63, and a single block beats two padded ones (L = 50 with chunk 32 is one block of 50).
    """
    n = max(1, round(seqlen / max(chunk_size, _MIN_TORCH_BLOCK)))
    q = -(-seqlen // n)
    return q + 1 if q > 32 and q & (q - 1) == 0 else q


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
