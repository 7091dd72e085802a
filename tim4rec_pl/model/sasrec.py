"""SASRec baseline: causal self-attention over the item history.

Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018, configured as RecBole runs it (the paper's
baseline setting): learned position embeddings, LayerNorm then dropout on the input, post-LN transformer blocks
with GELU feed-forward layers, Normal(0, 0.02) initialisation, output at item_seq_len - 1, tied output embedding.

Inputs are the RecBole layout (see `tim4rec_pl.model.tim4rec`). Histories are left-aligned and right-padded, so
plain causal attention never lets a real position attend to padding: no per-batch mask is needed.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tim4rec_pl.errors import UserError
from tim4rec_pl.model.base import SequenceEncoder
from tim4rec_pl.model.layers import Dropout, init_recsys_weights


class SASRecBlock(nn.Module):
    """Post-LN transformer block: h = LN(h + Drop(Attn(h))); h = LN(h + Drop(FFN(h)))."""

    def __init__(
        self, d_model: int, num_heads: int, inner_size: int, dropout: float, attn_dropout: float, eps: float
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.attn_out = nn.Linear(d_model, d_model)
        self.attn_norm = nn.LayerNorm(d_model, eps=eps)
        self.fc1 = nn.Linear(d_model, inner_size)
        self.fc2 = nn.Linear(inner_size, d_model)
        self.ffn_norm = nn.LayerNorm(d_model, eps=eps)
        self.dropout = Dropout(dropout)

    def forward(self, h: Tensor) -> Tensor:
        b, length, d = h.shape
        qkv = self.qkv(h).view(b, length, 3, self.num_heads, d // self.num_heads)  # (B, L, 3, heads, d_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, L, d_head)
        p = self.attn_dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # (B, heads, L, d_head)
        a = a.transpose(1, 2).reshape(b, length, d)  # (B, L, d)
        h = self.attn_norm(self.dropout(self.attn_out(a)) + h)
        f = self.fc2(F.gelu(self.fc1(h)))  # (B, L, d)
        return self.ffn_norm(self.dropout(f) + h)


class SASRec(SequenceEncoder):
    """SASRec sequence encoder with a tied item-embedding output layer. Timestamps are accepted and ignored."""

    def __init__(
        self,
        num_items: int,
        max_seq_len: int = 50,
        d_model: int = 64,
        num_layers: int = 2,
        num_heads: int = 2,
        inner_size: int = 256,
        dropout: float = 0.5,
        attn_dropout: float = 0.5,
        norm_eps: float = 1e-12,
    ) -> None:
        """Build SASRec (defaults: RecBole's SASRec settings).

        Args:
            num_items: Catalogue size including the padding item 0 (filled in from the data).
            max_seq_len: History length L: the number of learned position embeddings.
            d_model: Hidden size d.
            num_layers: Number of transformer blocks.
            num_heads: Attention heads; must divide d_model.
            inner_size: Width of the GELU feed-forward layer.
            dropout: Dropout on the input embeddings and on each sub-layer's output (RecBole hidden_dropout_prob).
            attn_dropout: Dropout on the attention weights (RecBole attn_dropout_prob).
            norm_eps: LayerNorm epsilon.
        """
        super().__init__()
        sizes = dict(
            num_items=num_items,
            max_seq_len=max_seq_len,
            d_model=d_model,
            num_layers=num_layers,
            num_heads=num_heads,
            inner_size=inner_size,
        )
        for name, value in sizes.items():
            if not isinstance(value, int) or value < 1:
                raise UserError(f"SASRec: {name} must be a positive integer, got {value!r}")
        if d_model % num_heads:
            raise UserError(f"SASRec: d_model={d_model} is not divisible by num_heads={num_heads}: change either")
        for name, value in (("dropout", dropout), ("attn_dropout", attn_dropout)):
            if not 0.0 <= value < 1.0:
                raise UserError(f"SASRec: {name} must be in [0, 1), got {value!r}")
        self.num_items, self.max_seq_len, self.d_model = num_items, max_seq_len, d_model

        self.item_embedding = nn.Embedding(num_items, d_model, padding_idx=0)
        self.position_embedding = nn.Embedding(max_seq_len, d_model)
        self.emb_norm = nn.LayerNorm(d_model, eps=norm_eps)
        self.dropout = Dropout(dropout)
        self.blocks = nn.ModuleList(
            SASRecBlock(d_model, num_heads, inner_size, dropout, attn_dropout, norm_eps) for _ in range(num_layers)
        )
        self.apply(partial(init_recsys_weights, std=0.02))

    def encode(self, item_seq: Tensor, item_seq_len: Tensor, timestamps: Tensor | None = None) -> Tensor:
        """Hidden states at every position, (B, L, d)."""
        length = item_seq.shape[1]
        if length > self.max_seq_len:
            raise UserError(
                f"SASRec was built with max_seq_len={self.max_seq_len} but got sequences of length {length}: "
                "set the data's and the model's max_seq_len equal"
            )
        positions = torch.arange(length, device=item_seq.device)  # left-aligned: position i is the i-th item
        h = self.item_embedding(item_seq) + self.position_embedding(positions)  # (B, L, d)
        h = self.dropout(self.emb_norm(h))
        for block in self.blocks:
            h = block(h)  # (B, L, d)
        return h

    def forward(self, item_seq: Tensor, item_seq_len: Tensor, timestamps: Tensor | None = None) -> Tensor:
        """Sequence representation: the hidden state at position item_seq_len - 1, (B, d)."""
        h = self.encode(item_seq, item_seq_len, timestamps)
        return h[torch.arange(h.shape[0], device=h.device), item_seq_len - 1]

    def score_all(self, item_seq: Tensor, item_seq_len: Tensor, timestamps: Tensor | None = None) -> Tensor:
        """Scores of every item, padding item 0 included, (B, num_items)."""
        return self.forward(item_seq, item_seq_len, timestamps) @ self.item_embedding.weight.T
