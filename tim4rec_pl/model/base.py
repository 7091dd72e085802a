"""The interface every network of this package offers, so that the CLI lists exactly these networks."""

from __future__ import annotations

from torch import Tensor, nn


class SequenceEncoder(nn.Module):
    """A sequential recommender network: item histories in, one representation per user (or per position) out.

    Subclasses (``tim4rec_pl.model.tim4rec.TiM4Rec``, ``tim4rec_pl.model.sasrec.SASRec``) provide

    * ``forward(item_seq, item_seq_len, timestamps) -> (B, d)``: the representation after the last real item;
    * ``encode(item_seq, item_seq_len, timestamps) -> (B, L, d)``: the representation at every position;
    * ``item_embedding``: an ``nn.Embedding(num_items, d)`` whose row 0 is the padding item, used as the tied
      output layer (scores are ``representation @ item_embedding.weight.T``).

    ``num_items`` and ``max_seq_len`` are constructor arguments that the CLI fills in from the data.
    """

    item_embedding: nn.Embedding

    def forward(self, item_seq: Tensor, item_seq_len: Tensor, timestamps: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def encode(self, item_seq: Tensor, item_seq_len: Tensor, timestamps: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError
