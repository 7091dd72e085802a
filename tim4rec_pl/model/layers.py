"""Small building blocks shared by the networks: causal depthwise convolutions, gated RMSNorm, the FFN, init, a fast
CPU dropout, and the SSD output at one position (the last layer of a network that reads one position per sequence).
The forward-only variants used for CPU inference live in `tim4rec_pl.inference.kernels`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tim4rec_pl.model.ssd_minimal import step_sizes


def causal_conv_channels_last(x: Tensor, conv: nn.Conv1d, channels: int | None = None) -> Tensor:
    """Causal depthwise convolution of a channels-last sequence with the weights of a depthwise `conv`.

    out[:, t, c] = bias[c] + sum_k weight[c, 0, k] * x[:, t - (K - 1) + k, c], with zeros before position 0.
    This equals `conv` applied with K - 1 zeros of left padding (first L outputs kept), but works on the
    (B, L, C) layout the projections produce, so no transposes or padded copies are needed; with its hand-written
    backward it is about twice as fast as the depthwise Conv1d kernel on CPU (training hot path). Inference on CPU
    uses a oneDNN kernel instead (`tim4rec_pl.inference.kernels`).

    Args:
        x: input, (B, L, C); may be a strided slice of a wider tensor.
        conv: a depthwise `nn.Conv1d(C, C, K, groups=C)`; only its weight (C, 1, K) and bias (C,) are used.
        channels: use only the conv's first `channels` channels (x then has that many).

    Returns:
        (B, L, C), contiguous.
    """
    weight = conv.weight[:channels, 0, :].t().contiguous()  # (K, C)
    bias = conv.bias[:channels] if conv.bias is not None else weight.new_zeros(weight.shape[1])
    return _CausalDepthwiseConv.apply(x, weight, bias)


class _CausalDepthwiseConv(torch.autograd.Function):
    """out[t] = bias + sum_s weight[K - 1 - s] * x[t - s] over shifts s = 0..K-1 with t - s >= 0; x (B, L, C).

    Shifted in-place accumulation on sub-ranges: no padded copy of x, nothing materialised but the output.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        k, length = weight.shape[0], x.shape[1]
        out = torch.addcmul(bias, x, weight[k - 1])  # (B, L, C): shift 0
        for s in range(1, min(k, length)):
            out[:, s:].addcmul_(x[:, : length - s], weight[k - 1 - s])
        ctx.save_for_backward(x, weight)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        k, length = weight.shape[0], grad.shape[1]
        shifts = range(min(k, length))
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # x[t] reaches out[t + s] through weight[K - 1 - s]
            grad_x = grad * weight[k - 1]  # (B, L, C)
            for s in shifts[1:]:
                grad_x[:, : length - s].addcmul_(grad[:, s:], weight[k - 1 - s])
            grad_x = grad_x.to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = torch.zeros_like(weight)  # (K, C)
            for s in shifts:
                grad_w[k - 1 - s] = (grad[:, s:] * x[:, : length - s]).sum((0, 1))
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 1))
        return grad_x, grad_w, grad_b


def causal_conv_channels_first(x: Tensor, conv: nn.Conv1d) -> Tensor:
    """Causal depthwise convolution of a channels-first sequence (B, C, L): K - 1 zeros of left padding."""
    k = conv.weight.shape[-1]
    return F.conv1d(F.pad(x, (k - 1, 0)), conv.weight, conv.bias, groups=conv.groups)  # (B, C, L)


class GatedRMSNorm(nn.Module):
    """RMSNorm of `y * SiLU(z)` over the last dimension (gate first, then normalise), times a learned weight."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        y = y * F.silu(z)
        return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Dropout(nn.Dropout):
    """`nn.Dropout` with a faster CPU training path (the same module otherwise: no parameters, same eval behaviour).

    On CPU, torch draws dropout masks with a serial Bernoulli sampler, a large share of a small model's training step
    (measured: about 3x slower than this path, and ~10% of a TiM4Rec step at L=50). Here each element gets 16 random
    bits from NumPy's PCG64 generator, seeded from torch's global generator so that `seed_everything` (and a resumed
    run's restored RNG state) reproduce the masks. An element is dropped with probability p' = round(p * 2^16) / 2^16
    (within 2^-16 of p) and kept ones are scaled by exactly 1 / (1 - p'), so the expectation is unchanged. Other
    devices, `inplace`, and torch.compile use `nn.Dropout` itself.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0 or self.inplace or x.device.type != "cpu" or _compiling():
            return super().forward(x)
        if self.p == 1.0:
            return x * 0.0
        return _BitsDropout.apply(x, self.p)


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


class _BitsDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:
        import numpy as np

        threshold = round(p * 65536)  # drop when the 16 bits (as an unsigned number) are below it
        seed = int(torch.randint(0, 2**62, ()))  # from torch's global generator: seeded runs stay reproducible
        bits = np.random.Generator(np.random.PCG64(seed)).integers(-32768, 32768, x.numel(), dtype=np.int16)
        keep = torch.from_numpy(bits).view(x.shape) >= threshold - 32768
        noise = keep.to(x.dtype).mul_(65536 / (65536 - threshold))  # 0 or 1 / (1 - p'), like torch's own mask
        ctx.save_for_backward(noise)
        return x * noise

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (noise,) = ctx.saved_tensors
        return grad * noise, None


class FeedForward(nn.Module):
    """Position-wise FFN with a post-norm residual: LayerNorm(Dropout(fc2(Dropout(act(fc1(h))))) + h)."""

    def __init__(self, d_model: int, inner: int, dropout: float, eps: float, activation: nn.Module) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, inner)
        self.fc2 = nn.Linear(inner, d_model)
        self.activation = activation
        self.dropout = Dropout(dropout)
        self.layer_norm = nn.LayerNorm(d_model, eps=eps)

    def forward(self, h: Tensor) -> Tensor:
        out = self.fc2(self.dropout(self.activation(self.fc1(h))))
        return self.layer_norm(self.dropout(out) + h)


def init_recsys_weights(module: nn.Module, std: float = 0.02, kaiming_conv: bool = False) -> None:
    """The RecBole-style blanket initialisation, applied with `model.apply(...)`.

    Linear and Embedding weights ~ Normal(0, std) (the embedding's padding row included, so it is not zero),
    Linear biases 0, LayerNorm weight 1 and bias 0; Conv1d kaiming-normal (fan_out, relu) with bias 0 when
    `kaiming_conv`, else left at PyTorch's default.
    """
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv1d) and kaiming_conv:
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def inverse_softplus_dt(num: int, dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4) -> Tensor:
    """Biases b with softplus(b) = dt0, dt0 log-uniform in [dt_min, dt_max] and clamped below at `floor`."""
    log_dt = torch.rand(num) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    dt = log_dt.exp().clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))  # inverse of softplus, stable for small dt


def ssd_output_at(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    index: Tensor,
    D: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
) -> Tensor:
    """The SSD scan's output at one position per sequence, ``ssd_scan(...)[arange(b), index]``, in O(L) per sequence.

    The last layer of a network that reads one position needs one row of the structured mask, not the whole scan:
    ``y_t = sum_{s <= t} (C_t . B_s) exp(A * sum(delta_(s+1..t))) delta_s x_s + D x_t`` (zero initial state). The
    log-decays are suffix sums of non-positive terms, so they carry no cancellation; they are floored at -50 like
    the scan's (e^-50 is far below float32 resolution) to keep subnormal floats out. Shapes as in
    `tim4rec_pl.model.ssd.ssd_scan`.

    Args:
        x: inputs, (b, L, H, P).
        dt: raw step sizes, (b, L, H).
        A: negative decay rates, (H,).
        B: input projections, (b, L, G, N).
        C: output projections, (b, L, G, N), or (b, G, N) already taken at `index`.
        index: the position to read in each sequence, (b,) long.
        D: skip connection, (H,) or (H, P); None for no skip.
        dt_bias: added to dt before the softplus, (H,).
        dt_softplus: apply softplus to dt + dt_bias.

    Returns:
        y at the given positions, (b, H, P), in x's dtype.
    """
    b, length, h, _ = x.shape
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # half precision is upcast
    with torch.autocast(device_type=x.device.type, enabled=False):
        delta = step_sizes(dt.to(dtype), dt_bias, softplus=dt_softplus)  # (b, L, H)
        rows = torch.arange(b, device=x.device)
        after = (torch.arange(length, device=x.device) > index[:, None])[..., None]  # (b, L, 1): past the output
        dA = (delta * A.to(dtype)).masked_fill(after, 0.0)  # (b, L, H), <= 0
        suffix = dA.flip(1).cumsum(1).flip(1)  # (b, L, H): sum of dA over [s, t]
        log_decay = F.pad(suffix[:, 1:], (0, 0, 0, 1))  # (b, L, H): over (s, t], from s to the output position
        decay = log_decay.clamp(min=-50.0).exp().masked_fill(after, 0.0)  # (b, L, H)
        c_at = C[rows, index] if C.dim() == 4 else C  # (b, G, N)
        cb = (B.to(dtype) * c_at.to(dtype)[:, None]).sum(-1)  # (b, L, G): C_t . B_s
        weight = decay * delta * cb.repeat_interleave(h // B.shape[2], dim=2)  # (b, L, H)
        y = _weighted_sum(weight, x.to(dtype))  # (b, H, P)
        if D is not None:
            skip = D.to(dtype)
            y = y + x[rows, index].to(dtype) * (skip[:, None] if skip.dim() == 1 else skip)
    return y.to(x.dtype)


def _weighted_sum(weight: Tensor, x: Tensor) -> Tensor:
    """sum_l weight[b, l, h] x[b, l, h, :], (b, L, H) and (b, L, H, P) -> (b, H, P).

    For a few heads one batched matmul over all head pairs, (H, L) @ (L, H P), keeping the diagonal blocks, is
    about 2x faster on CPU than the direct contraction (which reshuffles x first), the wasted pairs included.
    """
    b, length, h, p = x.shape
    if h > 8 or x.stride(-1) != 1 or x.stride(-2) != p:
        return torch.einsum("blh,blhp->bhp", weight, x)
    pairs = torch.matmul(weight.transpose(1, 2), x.reshape(b, length, h * p))  # (b, H, H P), x read in place
    return pairs.view(b, h, h, p).diagonal(dim1=1, dim2=2).transpose(1, 2)  # (b, H, P)
