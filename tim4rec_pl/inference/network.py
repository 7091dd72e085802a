"""TiM4Rec's forward pass for inference: what `TiM4Rec.forward` computes in eval mode, with less work on CPU.

It reads the network's own modules and parameters and changes only how the arithmetic runs:

1. the first layer's input, LayerNorm(item embedding), and its input projection depend on the item alone, so they
   are looked up from a per-item table (cached per weight version) instead of a (B * L, d) x (d, 2 D_in + 2N + H)
   matmul (5-6x cheaper at ML-1M's catalogue, L = 200);
2. the convolution runs as one oneDNN kernel, activations and residuals in place on fresh buffers;
3. the reference time path's first layer sees one tau row for all heads, so its Linear(L -> L) MLP runs once;
4. the SSD runs the factorised forward-only scan (`tim4rec_pl.inference.scan`);
5. gate + RMSNorm + out_proj move the norm's scales past the projection (`kernels.gated_norm_linear`);
6. on a multi-core CPU, slices of the batch run side by side (`tim4rec_pl.inference.parallel`).

tests/test_inference.py holds the result equal to the plain network for every network shape and both time paths.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tim4rec_pl.inference import parallel
from tim4rec_pl.inference.kernels import autocast_on, causal_conv, gated_norm_linear, inplace_activation
from tim4rec_pl.inference.scan import ssd_scan_inference
from tim4rec_pl.model.layers import FeedForward, ssd_output_at
from tim4rec_pl.model.ssd import resolve_backend, ssd_scan
from tim4rec_pl.model.ssd_minimal import step_sizes
from tim4rec_pl.model.tim4rec import TiM4Rec, TiM4RecLayer
from tim4rec_pl.model.time_path import ReferenceTimeScale, TimeState
from tim4rec_pl.model.tissd import TiSSD

# Largest per-item table (`FastTiM4Rec.item_table`): about 170,000 items at the 64-d defaults.
ITEM_TABLE_BYTES = 256 << 20

Encoder = Callable[[Tensor, Tensor, Tensor], Tensor]


def for_network(network: nn.Module) -> Encoder:
    """The inference encoder of a network: ``encoder(item_seq, item_seq_len, timestamps) -> (B, d)``.

    TiM4Rec (either time path, or SSD4Rec*) gets `FastTiM4Rec`; other networks (SASRec) their plain forward, run
    without autograd. Build it once and keep it: it caches the per-item table between calls.
    """
    network = getattr(network, "_orig_mod", network)  # a torch.compile'd network shares its modules
    if isinstance(network, TiM4Rec):
        return FastTiM4Rec(network)
    return PlainEncoder(network)


class PlainEncoder:
    """A network's own forward without autograd (networks without a faster inference path)."""

    def __init__(self, network: nn.Module) -> None:
        self.network = network

    @torch.no_grad()
    def __call__(self, item_seq: Tensor, item_seq_len: Tensor, timestamps: Tensor) -> Tensor:
        return self.network(item_seq, item_seq_len, timestamps)


class FastTiM4Rec:
    """`TiM4Rec.forward` for inference (eval-mode semantics: no dropout), without autograd. Not an nn.Module: it
    owns no parameters, only a cache of the per-item table (never saved, rebuilt when a weight it reads changes)."""

    def __init__(self, network: TiM4Rec) -> None:
        self.network = network
        self._table: tuple[tuple, tuple[Tensor, ...]] | None = None  # (weight versions, table)

    @torch.no_grad()
    def __call__(self, item_seq: Tensor, item_seq_len: Tensor, timestamps: Tensor) -> Tensor:
        """Sequence representations at item_seq_len - 1, (B, d)."""
        self.network._check_inputs(item_seq, timestamps)
        table = self.item_table()  # built once here, before any batch slices read it
        ranges = parallel.slices(item_seq.shape[0], item_seq.shape[1], item_seq.device)

        def run(item_seq: Tensor, item_seq_len: Tensor, timestamps: Tensor) -> Tensor:
            return self._forward(item_seq, item_seq_len, timestamps, table)

        return parallel.run_sliced(run, ranges, item_seq, item_seq_len, timestamps)

    def _forward(self, item_seq: Tensor, item_seq_len: Tensor, timestamps: Tensor, table: tuple | None) -> Tensor:
        net = self.network
        # 1. Item embeddings (B, L, d), and the first layer's input projection per item (z, xBC, dt) when cached.
        if table is None:
            h, projected = net.in_layer_norm(net.item_embedding(item_seq)), None
        else:
            h, *parts = (F.embedding(item_seq, t) for t in table)
            projected = tuple(parts)
        # 2. The time path's state.
        time = net.time(item_seq, timestamps)
        # 3. The layers; the last one at item_seq_len - 1 only.
        last = len(net.ssd_layers) - 1
        for i, layer in enumerate(net.ssd_layers):
            index = item_seq_len - 1 if i == last else None
            h, time = _layer(layer, h, time, index, projected if i == 0 else None)
        return h

    def item_table(self) -> tuple[Tensor, ...] | None:
        """Per-item rows of the first layer's input and of its in_proj parts (z, xBC, dt), or None (autocast on,
        or a catalogue too large for ITEM_TABLE_BYTES)."""
        net = self.network
        ssd = net.ssd_layers[0].ssd
        if autocast_on(net.item_embedding.weight.device):
            return None
        weights = [net.item_embedding.weight, net.in_layer_norm.weight, net.in_layer_norm.bias]
        weights += [t for pair in ssd.in_proj_parts() for t in pair if t is not None]
        width = net.d_model + ssd.in_proj.out_features
        if net.num_items * width * weights[0].element_size() > ITEM_TABLE_BYTES:
            return None
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in weights)
        if self._table is not None and self._table[0] == key:
            return self._table[1]
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable outside inference mode too
            h = net.in_layer_norm(net.item_embedding.weight)  # (num_items, d)
            table = (h, *(F.linear(h, *part) for part in ssd.in_proj_parts()))
        self._table = (key, table)
        return table


def _layer(
    layer: TiM4RecLayer, h: Tensor, time: TimeState, index: Tensor | None, projected: tuple | None
) -> tuple[Tensor, TimeState]:
    """`TiM4RecLayer.forward` in eval mode, in place on fresh buffers."""
    out, time = _tissd(layer.ssd, h, time, index, projected)  # (B, L, d) or (B, d), a fresh buffer
    if layer.residual:
        out.add_(h if index is None else h[torch.arange(h.shape[0], device=h.device), index])
    out = layer.layer_norm(out)
    ffn = layer.ffn
    if isinstance(ffn, FeedForward):
        out = ffn.layer_norm(ffn.fc2(inplace_activation(ffn.activation, ffn.fc1(out))).add_(out))
    return out, time


def _tissd(
    ssd: TiSSD, u: Tensor, time: TimeState, index: Tensor | None, projected: tuple | None
) -> tuple[Tensor, TimeState]:
    """`TiSSD.forward` in eval mode, same steps (see there)."""
    b, length = u.shape[:2]
    n, d_in = ssd.d_state, ssd.d_inner
    rows = torch.arange(b, device=u.device)
    (w_z, b_z), (w_xbc, b_xbc), (w_dt, b_dt) = ssd.in_proj_parts()
    # 1. Input projection (looked up for the first layer).
    if projected is not None:
        z, xbc, dt = projected
        z = z if index is None else z[rows, index]
    else:
        z = F.linear(u if index is None else u[rows, index], w_z, b_z)  # (B, L, D_in) or (B, D_in)
        dt = F.linear(u, w_dt, b_dt)  # (B, L, H)
        c_too = index is None
        xbc = F.linear(u, w_xbc if c_too else w_xbc[: d_in + n], b_xbc if c_too or b_xbc is None else b_xbc[: d_in + n])
    # 2. Convolution + activation (in place on the convolution's fresh output).
    xbc = time.mask(xbc)
    if xbc.shape[-1] == d_in + 2 * n:  # C at every position
        conv = inplace_activation(ssd.act, causal_conv(xbc, ssd.conv1d))
        x, bmat, cmat = torch.split(conv, [d_in, n, n], dim=-1)
    else:
        conv = inplace_activation(ssd.act, causal_conv(xbc, ssd.conv1d, channels=d_in + n))
        x, bmat = torch.split(conv, [d_in, n], dim=-1)
        cmat = ssd._c_at(u, index, time)  # (B, N)
    # 3. Time.
    dt, time_next = _time_scale(ssd.time_scale, dt, time, advance=index is None)
    # 4. Step sizes.
    delta = time.mask(step_sizes(dt.to(torch.promote_types(dt.dtype, torch.float32)), ssd.dt_bias))
    # 5. SSD.
    args = (x.reshape(b, length, ssd.nheads, ssd.head_dim), delta, -torch.exp(ssd.A_log), bmat.unsqueeze(2))
    if index is not None:
        c = cmat[rows, index] if cmat.dim() == 3 else cmat  # (B, N)
        y = ssd_output_at(*args, c.unsqueeze(1), index, D=ssd.D)  # (B, H, P)
    elif resolve_backend(ssd.ssd_backend, u.device) == "triton":
        y = ssd_scan(*args, cmat.unsqueeze(2), D=ssd.D, chunk_size=ssd.chunk_size, backend="triton")
    else:
        y = ssd_scan_inference(*args, cmat.unsqueeze(2), D=ssd.D, chunk_size=ssd.chunk_size)
    # 6. Gate, RMSNorm, out_proj with the norm's scales moved past the projection (z is overwritten).
    return gated_norm_linear(ssd.norm, y.reshape(*z.shape), z, ssd.out_proj), time_next


def _time_scale(module: nn.Module, dt: Tensor, time: TimeState, advance: bool) -> tuple[Tensor, TimeState]:
    """The layer's time path; on the reference path with one tau row expanded over the heads (the first layer),
    the per-head work of the Linear(L -> L) layers runs once."""
    tau = time.tau
    if not (isinstance(module, ReferenceTimeScale) and tau.shape[1] > 1 and tau.stride(1) == 0):
        return module(dt, time, advance)
    one = tau[:, :1]  # (B, 1, L)
    q = module.scale((one * module.mlp4time_scale(one)).expand_as(tau))  # (B, H, L)
    dt = dt * q.transpose(1, 2)  # (B, L, H)
    if not advance:
        return dt, time
    gate = module.time_gate_residual(one)  # (B, 1, 1 or L)
    return dt, TimeState(tau=module.time_layer_norm(gate * tau + (1 - gate) * q))
