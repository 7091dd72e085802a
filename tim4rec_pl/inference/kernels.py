"""Forward-only kernels for CPU inference: the same arithmetic as the model's layers with fewer passes over memory.

Each is used only by `tim4rec_pl.inference` (never under autograd) and tested equal to the plain layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tim4rec_pl.model.layers import GatedRMSNorm, causal_conv_channels_last


def causal_conv(x: Tensor, conv: nn.Conv1d, channels: int | None = None) -> Tensor:
    """`layers.causal_conv_channels_last` for inference: one oneDNN kernel on CPU, the shifted sums elsewhere."""
    if x.device.type == "cpu" and torch.backends.mkldnn.is_available():
        return _causal_conv_onednn(x, conv.weight[:channels], None if conv.bias is None else conv.bias[:channels])
    return causal_conv_channels_last(x, conv, channels)


def _causal_conv_onednn(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Inference: the same convolution as one oneDNN depthwise kernel, read as a channels-last 2-D convolution.

    A (B, L, C) tensor viewed as (B, C, 1, L) is a channels-last image, which oneDNN convolves in one pass (about
    2x faster than the shifted sums on CPU). Zero padding of K - 1 on both sides; the first L outputs are the
    causal ones. Returns a (B, L, C) view (rows L + K - 1 apart).
    """
    k, length = weight.shape[-1], x.shape[1]
    image = x.permute(0, 2, 1).unsqueeze(2)  # (B, C, 1, L), channels-last strides when x is (B, L, C) contiguous
    out = F.conv2d(image, weight.unsqueeze(2), bias, padding=(0, k - 1), groups=weight.shape[0])  # (B, C, 1, L+K-1)
    return out[..., :length].squeeze(2).permute(0, 2, 1)  # (B, L, C)


def gated_norm_linear(norm: GatedRMSNorm, y: Tensor, z: Tensor, linear: nn.Linear) -> Tensor:
    """`linear(norm(y, z))` with fewer passes over the wide (D_in) tensors, for inference (no autograd).

    RMSNorm scales each row by one number and each column by `norm.weight`, so both move to the narrow side:
    linear(g * r * w) = r * (g @ (W * w)^T) + b, with g = y * SiLU(z) and r = 1 / sqrt(mean(g^2) + eps). z is
    overwritten (it must be a fresh buffer).
    """
    g = F.silu(z, inplace=True).mul_(y)  # (..., D_in)
    inv = torch.linalg.vector_norm(g, dim=-1, keepdim=True).square_().div_(g.shape[-1]).add_(norm.eps).rsqrt_()
    out = F.linear(g, linear.weight * norm.weight).mul_(inv)  # (..., d)
    return out if linear.bias is None else out.add_(linear.bias)


def autocast_on(device: torch.device) -> bool:
    """Whether autocast is on for `device`'s type in this thread (any torch >= 2.3)."""
    try:
        return torch.is_autocast_enabled(device.type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_cpu_enabled() if device.type == "cpu" else torch.is_autocast_enabled()


def inplace_activation(act: nn.Module, x: Tensor) -> Tensor:
    """`act(x)`, written into x for the activations that have an in-place form (x must be a fresh buffer)."""
    fn = _INPLACE.get(type(act))
    return fn(x, inplace=True) if fn is not None else act(x)


_INPLACE = {nn.Hardswish: F.hardswish, nn.SiLU: F.silu, nn.ReLU: F.relu}
