"""The SSD scan for inference only: forward, no autograd, with less work than the training scan.

`ssd_scan_inference` returns what `tim4rec_pl.model.ssd.ssd_scan` returns (tests/test_inference.py holds both to
`tim4rec_pl.model.ssd_minimal`), using that without autograd the in-block decay factorises (see `_scan_inference`).
When a block's log-decays spread too far for the factorisation in float32 it retries with shorter blocks, then
falls back to the exact training scan.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tim4rec_pl.model import chunked_scan
from tim4rec_pl.model.chunked_scan import _MIN_LOG_DECAY, _ChunkedScan, _pad_len, _torch_block
from tim4rec_pl.model.ssd import _compute_dtype


def ssd_scan_inference(
    x: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    chunk_size: int = 32,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """`ssd_scan(x, delta, A, B, C, D, ...)` with ready step sizes (no dt_bias, no softplus), without autograd.

    Shapes as `ssd_scan`; y in x's dtype, the final state in float32 (float64 for float64 inputs).
    """
    dtype = _compute_dtype(x)
    with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
        xf, df, Af, Bf, Cf, Df, s0 = (None if t is None else t.to(dtype) for t in (x, delta, A, B, C, D, initial_state))
        qi = _inference_block(x.shape[1], chunk_size)
        while True:  # shorter blocks when a block's log-decays spread too far (rare), then the exact path
            out = _scan_inference(xf, df, Af, Bf, Cf, Df, s0, qi, return_final_state)
            if out is not None or qi < 16:
                break
            qi //= 2
        if out is None:
            q = _torch_block(x.shape[1], chunk_size)
            out = _ChunkedScan.apply(xf, df, Af, Bf, Cf, Df, s0, q, return_final_state)
    y, final = out
    return (y.to(x.dtype), final) if return_final_state else y.to(x.dtype)


def _inference_block(seqlen: int, chunk_size: int) -> int:
    """Block length of the forward-only path: about max(chunk_size, _MIN_TORCH_BLOCK), preferring a divisor of the
    length (padding copies every input) within [0.8, 1.4] x that target; measured on CPU at L = 50, 200, 800."""
    target = max(chunk_size, chunked_scan._MIN_TORCH_BLOCK)
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
# exp(+-60), far inside float32's range (~e^88), and as accurate as the exact path's (tests/test_inference.py).
_MAX_FACTOR_SPREAD = 120.0
