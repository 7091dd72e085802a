"""Prepare interactions under the SPEC §2 protocol and cache the result.

The contract shared with ``data/module.py``: :class:`SourceConfig`, :class:`ProtocolConfig`,
:class:`PreparedData` and :func:`load_or_prepare`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class SourceConfig:
    """Where the interactions come from and how to read them.

    Args:
        dataset: Registry name (ml-100k, ml-1m, amazon-beauty, kuairand, steam); fetched when missing.
        path: A file to read instead of a registry name; always works.
        format: auto | atomic | ml-1m | ml-100k | amazon | kuairand | csv | tsv | parquet.
        user_field: User column name (default per format; atomic: user_id).
        item_field: Item column name (default per format; atomic: item_id).
        time_field: Timestamp column name (default per format; atomic: timestamp).
        time_unit: s | ms | iso | auto, for the generic readers (auto: numbers > 1e11 are ms, strings are ISO).
        separator: Column separator for generic csv/tsv files.
        drop_null_ids: Drop rows with a null user or item id (and report how many) instead of failing.
    """

    dataset: str | None = None
    path: str | None = None
    format: str = "auto"
    user_field: str | None = None
    item_field: str | None = None
    time_field: str | None = None
    time_unit: str = "auto"
    separator: str | None = None
    drop_null_ids: bool = False


@dataclass(frozen=True)
class ProtocolConfig:
    """The preprocessing protocol (SPEC §2).

    Args:
        min_user_inter: k-core: keep users with at least this many interactions (repeated with items).
        min_item_inter: k-core: keep items with at least this many interactions (repeated with users).
        drop_duplicates: Drop exact (user, item, timestamp) duplicates (RecBole keeps them).
        time_sort: float32 (faithful: sort on timestamps rounded to float32, ties keep file order) | exact.
    """

    min_user_inter: int = 5
    min_item_inter: int = 5
    drop_duplicates: bool = False
    time_sort: str = "float32"


@dataclass
class PreparedData:
    """Interactions after the protocol, grouped by user in protocol order.

    Conventions owned here: dense user ids are 0-based; item id 0 is padding and never occurs in ``items``;
    timestamps are exact float64 seconds (the model gets ``float32(timestamps)``).
    """

    offsets: np.ndarray  # int64 (num_users + 1,): user u's interactions are [offsets[u], offsets[u+1])
    items: np.ndarray  # int64 (num_interactions,): dense item ids 1..num_items-1
    timestamps: np.ndarray  # float64 (num_interactions,): seconds, exact
    user_tokens: list[str]  # dense user id -> original token
    item_tokens: list[str]  # dense item id -> original token; item_tokens[0] == "[PAD]"
    manifest: dict = field(default_factory=dict)  # stats, parameters, source sha256, files, checksum, version

    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_items(self) -> int:
        """Number of item ids including the padding id 0 (the size of the embedding table)."""
        return len(self.item_tokens)

    @property
    def num_interactions(self) -> int:
        return int(self.offsets[-1])

    @property
    def stats(self) -> dict:
        return dict(self.manifest.get("stats", {}))


def load_or_prepare(
    source: SourceConfig,
    protocol: ProtocolConfig,
    data_dir: str | Path = "data",
    progress: bool = True,
) -> PreparedData:
    """Fetch (if needed), prepare and cache a dataset; reuse a valid cache.

    Args:
        source: Where the interactions come from.
        protocol: The preprocessing protocol.
        data_dir: Root of downloads and caches: ``<data_dir>/<name>/prepared-<hash>/``.
        progress: Show progress bars.

    Returns:
        The prepared data.
    """
    raise NotImplementedError("load_or_prepare is being written")
