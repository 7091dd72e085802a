"""Everything that exists only for inference speed, in one place beside the plain model.

The networks in `tim4rec_pl.model` are the definition; this package computes the same results faster on CPU, for
validation, test and predict (which choose it explicitly) and for the benchmarks:

    encoder = inference.for_network(network)                   # once; caches a per-item table
    network.eval()
    user_repr = encoder(item_seq, item_seq_len, timestamps)     # (B, d), no autograd

- `network`: TiM4Rec's forward pass with the first layer read from a per-item table, head sharing in the reference
  time path's first layer, in-place activations and residuals (`FastTiM4Rec`);
- `scan`: the factorised forward-only SSD scan and its block rules;
- `kernels`: the oneDNN channels-last convolution, in-place activations, gate + RMSNorm + out_proj in one pass;
- `parallel`: slices of the batch side by side on a multi-core CPU.

tests/test_inference.py holds every piece equal to the plain model.
"""

from tim4rec_pl.inference.network import FastTiM4Rec, PlainEncoder, for_network

__all__ = ["FastTiM4Rec", "PlainEncoder", "for_network"]
