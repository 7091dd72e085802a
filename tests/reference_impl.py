"""A slow, loop-based float64 reference of TiM4Rec, written from the paper's description of the network.

It works on a raw state dict with the reference checkpoints' parameter names (docs/model.md, "Reference
checkpoints"), one sequence at a time, with the convolutions as explicit sums over the kernel. Apart from the SSD
itself, which is the package's plain definition (`tim4rec_pl.model.ssd_minimal`, tested on its own in
test_ssd.py), it shares no code with `tim4rec_pl`, so the tests can hold the model against it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tim4rec_pl.model.ssd_minimal import ssd_recurrence, step_sizes

F64 = torch.float64


def random_reference_state_dict(
    *,
    n_items: int,
    d_model: int,
    max_seq_len: int,
    num_layers: int,
    d_state: int,
    head_dim: int,
    expand: int = 2,
    d_conv: int = 4,
    is_time: bool = True,
    is_ffn: bool = True,
    p2p_residual: bool = False,
    seed: int = 0,
) -> dict[str, Tensor]:
    """A state dict laid out like a reference checkpoint (its parameter names), with random float32 values.

    Scales are chosen so every path carries signal: O(1) activations, decays between ~0.05 and ~1 per step.
    """
    gen = torch.Generator().manual_seed(seed)
    d, L, n, k = d_model, max_seq_len, d_state, d_conv
    d_inner = expand * d
    h = d_inner // head_dim

    def rnd(*shape: int, std: float = 1.0, mean: float = 0.0) -> Tensor:
        return torch.randn(*shape, generator=gen) * std + mean

    def lin(out_f: int, in_f: int) -> tuple[Tensor, Tensor]:
        return rnd(out_f, in_f, std=1.0 / math.sqrt(in_f)), rnd(out_f, std=0.1)

    def norm(size: int) -> tuple[Tensor, Tensor]:
        return rnd(size, std=0.1, mean=1.0), rnd(size, std=0.1)

    sd: dict[str, Tensor] = {"item_embedding.weight": rnd(n_items, d, std=0.5)}
    sd["in_layer_norm.weight"], sd["in_layer_norm.bias"] = norm(d)
    if is_time:
        sd["layer_norm_time.weight"], sd["layer_norm_time.bias"] = norm(L)
    for i in range(num_layers):
        p = f"ssd_layers.{i}."
        s = p + "ssd."
        sd[s + "in_proj.weight"], sd[s + "in_proj.bias"] = lin(2 * d_inner + 2 * n + h, d)
        sd[s + "conv1d.weight"], sd[s + "conv1d.bias"] = (
            rnd(d_inner + 2 * n, 1, k, std=0.5),
            rnd(d_inner + 2 * n, std=0.1),
        )
        if is_time:
            for j in (1, 2):
                sd[s + f"conv1d4time_{j}.weight"], sd[s + f"conv1d4time_{j}.bias"] = (
                    rnd(h, 1, k, std=0.6),
                    rnd(h, std=0.2),
                )
            for j in (1, 3):
                sd[s + f"mlp4time_scale.{j}.weight"], sd[s + f"mlp4time_scale.{j}.bias"] = lin(L, L)
            gate_w, gate_b = lin(L if p2p_residual else 1, L)
            sd[s + "time_gate_residual.1.weight"], sd[s + "time_gate_residual.1.bias"] = gate_w, gate_b
            sd[s + "time_layer_norm.weight"], sd[s + "time_layer_norm.bias"] = norm(L)
        sd[s + "dt_bias"] = torch.rand(h, generator=gen) * 3.0 - 3.0  # softplus in ~[0.05, 0.7]
        sd[s + "A_log"] = (torch.rand(h, generator=gen) * 2.0 + 0.1).log()  # A in [-2.1, -0.1]
        sd[s + "D"] = rnd(h)
        sd[s + "norm.weight"] = rnd(d_inner, std=0.1, mean=1.0)
        sd[s + "out_proj.weight"], sd[s + "out_proj.bias"] = lin(d, d_inner)
        sd[p + "layer_norm.weight"], sd[p + "layer_norm.bias"] = norm(d)
        if is_ffn:
            sd[p + "ffn.fc1.weight"], sd[p + "ffn.fc1.bias"] = lin(4 * d, d)
            sd[p + "ffn.fc2.weight"], sd[p + "ffn.fc2.bias"] = lin(d, 4 * d)
            sd[p + "ffn.layer_norm.weight"], sd[p + "ffn.layer_norm.bias"] = norm(d)
    return sd


# ---------------------------------------------------------------------------------------------- elementary ops
def _layer_norm(v: Tensor, w: Tensor, b: Tensor, eps: float) -> Tensor:
    mean = v.mean(-1, keepdim=True)
    var = ((v - mean) ** 2).mean(-1, keepdim=True)  # biased variance
    return (v - mean) / torch.sqrt(var + eps) * w + b


def _hardswish(v: Tensor) -> Tensor:
    return v * torch.clamp(v + 3.0, 0.0, 6.0) / 6.0


def _sigmoid(v: Tensor) -> Tensor:
    return 1.0 / (1.0 + torch.exp(-v))


def _silu(v: Tensor) -> Tensor:
    return v * _sigmoid(v)


def _softplus(v: float) -> float:
    return v if v > 30.0 else math.log1p(math.exp(v))


def _linear(v: Tensor, w: Tensor, b: Tensor | float) -> Tensor:
    """v (..., in) -> (..., out): out[o] = b[o] + sum_i w[o, i] v[i], as a plain broadcast sum (no BLAS)."""
    return (v[..., None, :] * w).sum(-1) + b


def _causal_conv(seq: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """seq (T, C) -> (T, C): out[t] = b + sum_j w[:, 0, j] * seq[t - (K-1) + j], zero before position 0."""
    length, k = seq.shape[0], w.shape[-1]
    out = torch.empty_like(seq)
    for t in range(length):
        acc = b.clone()
        for j in range(k):
            src = t - (k - 1) + j
            if src >= 0:
                acc = acc + w[:, 0, j] * seq[src]
        out[t] = acc
    return out


# ---------------------------------------------------------------------------------------------- the model
def _tissd(sd: dict, s: str, u: Tensor, tau: Tensor | None, norm_eps: float, act) -> tuple[Tensor, Tensor | None]:
    """One TiSSD mixer on one sequence: u (L, d), tau (H, L) -> (L, d), next tau (H, L)."""
    d_inner = sd[s + "norm.weight"].shape[0]
    h = sd[s + "A_log"].shape[0]
    p = d_inner // h
    n = (sd[s + "conv1d.weight"].shape[0] - d_inner) // 2
    length = u.shape[0]

    proj = _linear(u, sd[s + "in_proj.weight"], sd[s + "in_proj.bias"])
    z = proj[:, :d_inner]
    xbc = proj[:, d_inner : 2 * d_inner + 2 * n]
    dt = proj[:, 2 * d_inner + 2 * n :].clone()  # (L, H)
    xbc = act(_causal_conv(xbc, sd[s + "conv1d.weight"], sd[s + "conv1d.bias"]))
    x, bm, cm = xbc[:, :d_inner], xbc[:, d_inner : d_inner + n], xbc[:, d_inner + n :]

    q = None
    if tau is not None:
        hidden = _silu(_linear(tau, sd[s + "mlp4time_scale.1.weight"], sd[s + "mlp4time_scale.1.bias"]))
        scale = _linear(hidden, sd[s + "mlp4time_scale.3.weight"], sd[s + "mlp4time_scale.3.bias"])  # (H, L)
        q = tau * scale
        q = _hardswish(_causal_conv(q.T, sd[s + "conv1d4time_1.weight"], sd[s + "conv1d4time_1.bias"]))  # (L, H)
        q = _hardswish(_causal_conv(q, sd[s + "conv1d4time_2.weight"], sd[s + "conv1d4time_2.bias"]))  # (L, H)
        dt = dt * q
        q = q.T  # (H, L)

    delta = step_sizes(dt, sd[s + "dt_bias"])  # (L, H)
    a = -torch.exp(sd[s + "A_log"])  # (H,)
    bm, cm = bm.view(1, length, 1, n), cm.view(1, length, 1, n)  # one sequence, one group
    y, _ = ssd_recurrence(x.view(1, length, h, p), delta[None], a, bm, cm, sd[s + "D"])
    y = y.view(length, d_inner)

    gated = y * _silu(z)
    gated = gated / torch.sqrt((gated**2).mean(-1, keepdim=True) + norm_eps) * sd[s + "norm.weight"]
    out = _linear(gated, sd[s + "out_proj.weight"], sd[s + "out_proj.bias"])

    tau_next = None
    if tau is not None:
        gate = _sigmoid(_linear(tau, sd[s + "time_gate_residual.1.weight"], sd[s + "time_gate_residual.1.bias"]))
        mixed = gate * tau + (1.0 - gate) * q
        tau_next = _layer_norm(mixed, sd[s + "time_layer_norm.weight"], sd[s + "time_layer_norm.bias"], norm_eps)
    return out, tau_next


def reference_encode(
    state_dict: dict[str, Tensor],
    item_seq: Tensor,
    timestamps: Tensor,
    *,
    norm_eps: float,
    conv_activation: str = "hardswish",
) -> Tensor:
    """Hidden states at every position, (B, L, d), float64, eval mode (no dropout)."""
    # This package keeps the time path's parameters in submodules; read its state dicts with the reference names.
    names = {"time.layer_norm_time.": "layer_norm_time.", ".ssd.time_scale.": ".ssd."}
    sd = {}
    for k, v in state_dict.items():
        for ours, ref in names.items():
            k = ref + k[len(ours) :] if ours.startswith("time.") and k.startswith(ours) else k.replace(ours, ref)
        sd[k] = v.detach().to(F64)
    act = {"hardswish": _hardswish, "silu": _silu}[conv_activation]
    num_layers = len({k.split(".")[1] for k in sd if k.startswith("ssd_layers.")})
    is_time = "layer_norm_time.weight" in sd
    h_heads = sd["ssd_layers.0.ssd.A_log"].shape[0]
    outs = []
    for b in range(item_seq.shape[0]):
        seq = item_seq[b]
        e = sd["item_embedding.weight"][seq]  # (L, d)
        e = _layer_norm(e, sd["in_layer_norm.weight"], sd["in_layer_norm.bias"], norm_eps)
        tau = None
        if is_time:
            ts = timestamps[b].to(F64)
            gaps = torch.zeros_like(ts)
            for t in range(1, ts.shape[0]):
                gaps[t] = ts[t] - ts[t - 1]
            tau1 = _layer_norm(gaps, sd["layer_norm_time.weight"], sd["layer_norm_time.bias"], norm_eps)
            tau = torch.stack([tau1] * h_heads)  # (H, L)
        for i in range(num_layers):
            p = f"ssd_layers.{i}."
            out, tau = _tissd(sd, p + "ssd.", e, tau, norm_eps, act)
            if num_layers > 1:
                out = out + e
            hid = _layer_norm(out, sd[p + "layer_norm.weight"], sd[p + "layer_norm.bias"], norm_eps)
            if p + "ffn.fc1.weight" in sd:
                ff = _hardswish(_linear(hid, sd[p + "ffn.fc1.weight"], sd[p + "ffn.fc1.bias"]))
                ff = _linear(ff, sd[p + "ffn.fc2.weight"], sd[p + "ffn.fc2.bias"])
                hid = _layer_norm(ff + hid, sd[p + "ffn.layer_norm.weight"], sd[p + "ffn.layer_norm.bias"], 1e-12)
            e = hid
        outs.append(e)
    return torch.stack(outs)


def full_sort_predict(
    state_dict: dict[str, Tensor],
    item_seq: Tensor,
    item_seq_len: Tensor,
    timestamps: Tensor,
    *,
    norm_eps: float,
    conv_activation: str = "hardswish",
) -> Tensor:
    """Scores of every item (padding included) from the output at item_seq_len - 1, (B, n_items), float64."""
    hidden = reference_encode(state_dict, item_seq, timestamps, norm_eps=norm_eps, conv_activation=conv_activation)
    rows = [hidden[b, int(item_seq_len[b]) - 1] for b in range(hidden.shape[0])]
    return _linear(torch.stack(rows), state_dict["item_embedding.weight"].to(F64), 0.0)
