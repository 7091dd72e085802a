"""Prepare interactions under the data protocol (docs/data.md) and cache the result.

The contract shared with ``data/datamodule.py``: :class:`SourceConfig`, :class:`ProtocolConfig`,
:class:`PreparedData` and :func:`load_or_prepare`.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from tim4rec_pl.atomic import fsync_dir, remove_stale_temporaries, temporary_name
from tim4rec_pl.data.sources import REGISTRY, Remote, dataset_remote, find_or_fetch, read_interactions, sha256_file
from tim4rec_pl.errors import UserError


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
        time_unit: s | ms | iso | auto, for the generic readers (auto: a column of numbers all above 1e11 is ms, all
            below is s, strings are ISO; a column mixing both is an error). Timestamps must lie in 1970-2100.
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
    """The preprocessing protocol (docs/data.md).

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

    The cache lives in ``<data_dir>/<name>/prepared-<hash of the parameters>/`` (NumPy arrays, Parquet vocabularies
    and ``manifest.json``). It is reused while the parameters and the source file are unchanged, rebuilt (with a
    warning) when a cached file is unreadable or does not match its checksum (the statistics in manifest.json have
    one too), and written atomically; temporary folders that a killed run left are removed first. Concurrent
    callers (DDP ranks) serialise on a file lock in ``<data_dir>/<name>/``: the first prepares, the others wait
    and then read the cache.

    Args:
        source: Where the interactions come from.
        protocol: The preprocessing protocol.
        data_dir: Root of downloads and caches.
        progress: Show progress bars (downloads, and preparing files over 50 MiB).

    Returns:
        The prepared data.
    """
    _check_protocol(protocol)
    data_dir = Path(data_dir).expanduser()
    file = remote = None
    if source.path is not None:
        file = Path(source.path).expanduser()
        if not file.is_file():
            raise UserError(f"{file}: file not found; check path: (or set dataset: to one of {', '.join(REGISTRY)})")
        file = file.resolve()
        name = _slug(file.stem)  # a path names its own cache folder, whatever `dataset` says
        # a local copy of a registry file (dataset: steam, path: .../steam.inter) reads with the registry's options
        remote = next((r for r in REGISTRY.get(source.dataset or "", ()) if r.filename == file.name), None)
    elif source.dataset is not None:
        dataset_remote(source.dataset)  # a UserError listing the known names if unknown
        name = source.dataset
    else:
        raise UserError(f"no data source given: set dataset: (one of {', '.join(REGISTRY)}) or path: (a file)")
    params = {
        "version": FORMAT_VERSION,
        "source": asdict(source) | {"path": str(file) if file else None},
        "protocol": asdict(protocol),
    }
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    folder = data_dir / name
    created = [d for d in (folder, *folder.parents) if not d.exists()]  # deepest first
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with _file_lock(folder / ".lock"):
            remove_stale_temporaries(folder)  # what a killed `data prepare` or download left behind
            if file is None:
                file, remote = find_or_fetch(name, data_dir, progress)
            final = folder / f"prepared-{key}"
            data = _load_cache(final, file, params)
            if data is None:
                data = _prepare(file, remote, source, protocol, params, final, progress)
            data.manifest["cache_dir"] = str(final)
            return data
    except UserError:
        if created:  # leave nothing behind (a fetched, verified source file stays)
            with contextlib.suppress(OSError):
                (folder / ".lock").unlink()
                for directory in created:
                    directory.rmdir()
        raise


# --------------------------------------------------------------------------------------------------
# The protocol (docs/data.md), one function per step so that benchmarks can time them.


def filter_interactions(
    frame: pl.DataFrame, protocol: ProtocolConfig, where: str = "data"
) -> tuple[pl.DataFrame, dict]:
    """Optionally drop exact duplicates, then apply the k-core filter until nothing changes.

    Args:
        frame: ``(user, item, timestamp)`` in file order.
        protocol: Thresholds and the duplicate rule.
        where: Names the data in error messages.

    Returns:
        The kept rows (with a ``row`` column: the position in the file) and counts of what was removed.
    """
    df = frame.with_row_index("row")
    counts = {"rows_in": df.height, "duplicates_dropped": 0}
    if protocol.drop_duplicates:
        df = df.unique(["user", "item", "timestamp"], keep="first", maintain_order=True)
        counts["duplicates_dropped"] = counts["rows_in"] - df.height
    rounds = 0
    while True:  # users and items alternately, until a full round removes nothing (the k-core is unique)
        rounds += 1
        before = df.height
        for column, k, option in (("user", protocol.min_user_inter, "min_user_inter"),
                                  ("item", protocol.min_item_inter, "min_item_inter")):  # fmt: skip
            if k > 1:
                df = df.filter(pl.len().over(column) >= k)
            if df.height == 0:
                raise UserError(
                    f"{where}: nothing left after the {column} filter {option}={k} (round {rounds} of the k-core "
                    "filter); lower min_user_inter / min_item_inter or use a larger file"
                )
        if df.height == before:
            break
    counts["kcore_removed"] = counts["rows_in"] - counts["duplicates_dropped"] - df.height
    counts["kcore_rounds"] = rounds
    return df, counts


def remap(frame: pl.DataFrame) -> pl.DataFrame:
    """Add dense ids in order of first appearance in the file: ``uid`` 0..U-1 and ``iid`` 1..I (0 is padding)."""
    first_user = pl.col("row").min().over("user")
    first_item = pl.col("row").min().over("item")
    return frame.with_columns(
        uid=(first_user.rank("dense") - 1).cast(pl.Int64),
        iid=first_item.rank("dense").cast(pl.Int64),
    )


def sort_interactions(frame: pl.DataFrame, time_sort: str = "float32") -> pl.DataFrame:
    """Sort by user, then by timestamp (rounded to float32 when ``time_sort == "float32"``), ties in file order."""
    key = pl.col("timestamp").cast(pl.Float32) if time_sort == "float32" else pl.col("timestamp")
    return frame.sort([pl.col("uid"), key, pl.col("row")])


def to_prepared(frame: pl.DataFrame) -> PreparedData:
    """Turn the sorted, remapped frame into :class:`PreparedData` (manifest holds the stats only)."""
    uid = frame["uid"].to_numpy()
    num_users = int(uid[-1]) + 1
    offsets = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(uid, minlength=num_users), out=offsets[1:])
    items = frame["iid"].to_numpy().astype(np.int64, copy=False)
    timestamps = frame["timestamp"].to_numpy().astype(np.float64, copy=False)
    user_tokens = frame["user"].gather(offsets[:-1]).to_list()
    vocab = frame.select("iid", "item").unique("iid").sort("iid")
    item_tokens = [PAD_TOKEN, *vocab["item"].to_list()]
    stats = compute_stats(offsets, items, timestamps, len(item_tokens))
    return PreparedData(offsets, items, timestamps, user_tokens, item_tokens, {"stats": stats})


def compute_stats(offsets: np.ndarray, items: np.ndarray, timestamps: np.ndarray, num_items: int) -> dict:
    """Summary statistics. ``items`` excludes the padding id; ``train_samples`` counts the training targets.

    ``zero_gap_share``: share of a user's consecutive interactions (in exact time order) in the same second.
    ``zero_gap_share_float32``: share of zero gaps the model sees (float32 seconds, protocol order).
    """
    lengths = np.diff(offsets)
    users, n = len(lengths), int(offsets[-1])
    same_user = np.ones(max(n - 1, 0), dtype=bool)
    same_user[offsets[1:-1] - 1] = False  # the gap across a user boundary is not a gap
    in_time_order = timestamps[np.lexsort((timestamps, np.repeat(np.arange(users), lengths)))]
    exact_gaps = np.diff(in_time_order)[same_user]
    model_gaps = np.diff(timestamps.astype(np.float32))[same_user]
    return {
        "users": users,
        "items": num_items - 1,
        "interactions": n,
        "avg_seq_len": n / users,
        "min_seq_len": int(lengths.min()),
        "median_seq_len": float(np.median(lengths)),
        "max_seq_len": int(lengths.max()),
        "density": n / (users * (num_items - 1)),
        "time_span_days": float(timestamps.max() - timestamps.min()) / 86400.0,
        "zero_gap_share": float((exact_gaps == 0).mean()) if len(exact_gaps) else 0.0,
        "zero_gap_share_float32": float((model_gaps == 0).mean()) if len(model_gaps) else 0.0,
        "train_samples": int(np.maximum(lengths - 3, 0).sum()),
    }


# --------------------------------------------------------------------------------------------------
# Cache

FORMAT_VERSION = 2  # bump whenever the prepared files or the manifest stats change
PAD_TOKEN = "[PAD]"
TIME_SORTS = ("float32", "exact")
LARGE_FILE = 50 * 2**20  # show a progress bar when preparing a source file larger than this
_ARRAYS = ("offsets", "items", "timestamps")
_VOCABS = ("users", "items")


def _check_protocol(protocol: ProtocolConfig) -> None:
    if protocol.time_sort not in TIME_SORTS:
        raise UserError(f"time_sort={protocol.time_sort!r} is not valid; use one of {', '.join(TIME_SORTS)}")
    for name in ("min_user_inter", "min_item_inter"):
        value = getattr(protocol, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UserError(f"{name}={value!r} is not valid; use a whole number >= 0 (5 is the paper's setting)")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text) or "data"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock across processes (POSIX flock); a no-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # Windows: single-process use only
        yield
        return
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as e:  # some network file systems refuse locks
            warnings.warn(f"{path}: cannot lock ({e.strerror}); prepare the data before starting DDP", stacklevel=3)
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _prepare(
    file: Path,
    remote: Remote | None,
    source: SourceConfig,
    protocol: ProtocolConfig,
    params: dict,
    final: Path,
    progress: bool,
) -> PreparedData:
    from tqdm.auto import tqdm

    stat = file.stat()
    large = progress and stat.st_size > LARGE_FILE
    with tqdm(total=4, desc=f"preparing {file.name}", disable=not large) as bar:
        frame, info = read_interactions(
            file,
            format=remote.format if remote and source.format == "auto" else source.format,
            user_field=source.user_field,
            item_field=source.item_field or (remote.item_field if remote else None),
            time_field=source.time_field,
            time_unit=source.time_unit,
            separator=source.separator,
            drop_null_ids=source.drop_null_ids,
        )
        if info["null_ids_dropped"]:
            warnings.warn(
                f"{file}: dropped {info['null_ids_dropped']} rows with a missing user or item id", stacklevel=3
            )
        bar.update()
        frame, counts = filter_interactions(frame, protocol, where=str(file))
        bar.update()
        frame = sort_interactions(remap(frame), protocol.time_sort)
        bar.update()
        data = to_prepared(frame)
        digest = sha256_file(file)
        if remote and remote.sha256 and digest != remote.sha256:
            warnings.warn(
                f"{file}: sha256 differs from the registry's ({remote.sha256[:12]}...); using it anyway", stacklevel=3
            )
        data.manifest = {
            "version": FORMAT_VERSION,
            "params": params,
            "source": {"file": str(file), "format": info["format"], "sha256": digest, "size": stat.st_size,
                       "mtime_ns": stat.st_mtime_ns, "registry_sha256": remote.sha256 if remote else None},
            "stats": data.manifest["stats"],
            "pipeline": {"rows_read": info["rows_read"], "null_ids_dropped": info["null_ids_dropped"]} | counts,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }  # fmt: skip
        _write_cache(data, final)
        bar.update()
    return data


def stats_checksum(stats: dict) -> str:
    """sha256 of the statistics as written to manifest.json (an edit to them is noticed on load)."""
    return hashlib.sha256(json.dumps(stats, sort_keys=True).encode()).hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_cache(data: PreparedData, final: Path) -> None:
    """Write the cache into a temporary folder beside ``final`` (every file fsynced), then swap it in.

    The swap renames an old cache aside, renames the new one into place and only then removes the old one, so a
    failure at any point leaves a complete cache (old or new) under ``final``. Temporary names record the host and
    process: ``remove_stale_temporaries`` clears those of killed runs (see ``load_or_prepare``).
    """
    tmp = final.with_name(temporary_name(final.name))
    old = final.with_name(temporary_name(final.name + ".old"))
    try:
        tmp.mkdir()
        for name in _ARRAYS:
            np.save(tmp / f"{name}.npy", getattr(data, name))
        for name, tokens in zip(_VOCABS, (data.user_tokens, data.item_tokens)):
            pl.DataFrame({"token": tokens}, schema={"token": pl.String}).write_parquet(tmp / f"{name}.parquet")
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        data.manifest["files"] = files
        data.manifest["checksum"] = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
        data.manifest["stats_checksum"] = stats_checksum(data.manifest["stats"])
        (tmp / "manifest.json").write_text(json.dumps(data.manifest, indent=2))
        for path in tmp.iterdir():
            _fsync(path)
        fsync_dir(tmp)
        if final.exists():
            os.rename(final, old)
        try:
            os.rename(tmp, final)
        except OSError:
            if old.exists() and not final.exists():
                os.rename(old, final)  # put the previous cache back
            raise
        fsync_dir(final.parent)
    except (OSError, pl.exceptions.PolarsError) as err:
        reason = (err.strerror or str(err)) if isinstance(err, OSError) else str(err).splitlines()[0]
        raise UserError(
            f"cannot write the prepared data to {final} ({reason}); any previous cache is unchanged; free some space "
            "there or set data_dir to another folder"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _load_cache(final: Path, file: Path, params: dict) -> PreparedData | None:
    """The cached data, or None when there is none or it is stale (unreadable: a warning too)."""
    if not final.exists():
        return None
    try:
        manifest = json.loads((final / "manifest.json").read_text())
        if manifest.get("version") != FORMAT_VERSION or manifest.get("params") != params:
            return None
        source, stat = manifest["source"], file.stat()
        moved = (source["file"], source["size"], source["mtime_ns"]) != (str(file), stat.st_size, stat.st_mtime_ns)
        if moved and sha256_file(file) != source["sha256"]:
            return None  # the source changed: prepare again
        for name, digest in manifest["files"].items():
            if sha256_file(final / name) != digest:
                raise ValueError(f"{name} does not match its checksum")
        if "stats_checksum" not in manifest:
            raise ValueError("written by an earlier version, without a checksum of its statistics")
        if manifest["stats_checksum"] != stats_checksum(manifest["stats"]):
            raise ValueError("the statistics in manifest.json do not match their checksum (edited?)")
        arrays = {name: np.load(final / f"{name}.npy", allow_pickle=False) for name in _ARRAYS}
        users, items = (pl.read_parquet(final / f"{name}.parquet")["token"].to_list() for name in _VOCABS)
    except (OSError, ValueError, KeyError, TypeError, EOFError, pl.exceptions.PolarsError) as e:
        warnings.warn(f"{final}: the cached data is unreadable ({e}); preparing it again", stacklevel=3)
        return None
    return PreparedData(arrays["offsets"], arrays["items"], arrays["timestamps"], users, items, manifest)
