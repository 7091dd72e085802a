"""The data protocol (docs/data.md) on a fixture with a known result, and the cache (reuse, rebuild, locking)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from tim4rec_pl.data import prepare
from tim4rec_pl.data.prepare import (
    ProtocolConfig,
    SourceConfig,
    filter_interactions,
    load_or_prepare,
    remap,
    sort_interactions,
    to_prepared,
)
from tim4rec_pl.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures"
KCORE = FIXTURES / "kcore.inter"
T = 1_600_000_000  # a multiple of 128: float32 rounds T + x to T + 128 * round(x / 128) (ties to even)
K3 = ProtocolConfig(min_user_inter=3, min_item_inter=3)

# kcore.inter, worked by hand with k = 3 for users and items:
#   round 1: U5 (2 rows) goes; then D (U1, U2 left: 2) and X (U4 only) go;
#   round 2: U4 keeps A, B, B (its exact duplicate counts): 3 rows, stays; nothing else changes.
# Users by first appearance in the filtered file: U2, U1, U3, U4; items: C, B, A (ids 1, 2, 3).
# float32 keys (offset from T): U2: C 300->256, A 100->128, B 200->256 => A, C, B (C before B: file order)
#                               U1: B 50->0, A 10->0, C 200->256      => B, A, C (tie kept in file order)
#                               U3: A 1024, B 1152, C 1152           => A, B, C
#                               U4: A 2048, B 2176, B 2176           => A, B, B
EXPECTED_USERS = ["U2", "U1", "U3", "U4"]
EXPECTED_ITEMS = ["[PAD]", "C", "B", "A"]
EXPECTED_ITEMS_F32 = [3, 1, 2, 2, 3, 1, 3, 2, 1, 3, 2, 2]
EXPECTED_TIMES_F32 = [100, 300, 200, 50, 10, 200, 1000, 1100, 1200, 2000, 2200, 2200]
EXPECTED_ITEMS_EXACT = [3, 2, 1, 3, 2, 1, 3, 2, 1, 3, 2, 2]  # exact seconds: U2 A, B, C and U1 A, B, C
EXPECTED_TIMES_EXACT = [100, 200, 300, 10, 50, 200, 1000, 1100, 1200, 2000, 2200, 2200]


def source(path: Path = KCORE, **kwargs) -> SourceConfig:
    return SourceConfig(path=str(path), **kwargs)


def test_protocol_on_the_hand_made_fixture(tmp_path):
    data = load_or_prepare(source(), K3, tmp_path, progress=False)
    assert data.user_tokens == EXPECTED_USERS
    assert data.item_tokens == EXPECTED_ITEMS
    assert data.offsets.dtype == np.int64 and data.offsets.tolist() == [0, 3, 6, 9, 12]
    assert data.items.dtype == np.int64 and data.items.tolist() == EXPECTED_ITEMS_F32
    assert data.timestamps.dtype == np.float64 and (data.timestamps - T).tolist() == EXPECTED_TIMES_F32
    assert (data.num_users, data.num_items, data.num_interactions) == (4, 4, 12)
    s = data.stats
    assert (s["users"], s["items"], s["interactions"]) == (4, 3, 12)
    assert (s["min_seq_len"], s["median_seq_len"], s["max_seq_len"], s["avg_seq_len"]) == (3, 3.0, 3, 3.0)
    assert s["density"] == 1.0 and s["time_span_days"] == pytest.approx(2190 / 86400)
    assert s["zero_gap_share"] == 1 / 8  # exact seconds in time order: 100,100 | 40,150 | 100,100 | 200,0
    assert s["zero_gap_share_float32"] == 4 / 8  # float32 in protocol order: 128,0 | 0,256 | 128,0 | 128,0
    assert s["train_samples"] == 0  # n - 3 per user
    pipe = data.manifest["pipeline"]
    assert pipe["rows_read"] == 17 and pipe["kcore_removed"] == 5 and pipe["duplicates_dropped"] == 0


def test_exact_time_sort_differs_only_inside_float32_buckets(tmp_path):
    data = load_or_prepare(source(), ProtocolConfig(3, 3, time_sort="exact"), tmp_path, progress=False)
    assert data.items.tolist() == EXPECTED_ITEMS_EXACT
    assert (data.timestamps - T).tolist() == EXPECTED_TIMES_EXACT
    assert data.offsets.tolist() == [0, 3, 6, 9, 12]


def test_drop_duplicates_changes_the_k_core(tmp_path):
    data = load_or_prepare(source(), ProtocolConfig(3, 3, drop_duplicates=True), tmp_path, progress=False)
    assert data.user_tokens == ["U2", "U1", "U3"]  # U4 keeps only A, B once its duplicate B is gone
    assert data.items.tolist() == EXPECTED_ITEMS_F32[:9]
    assert data.manifest["pipeline"]["duplicates_dropped"] == 1


def slow_reference(rows: list[tuple[str, str, float]], k_user: int, k_item: int, f32: bool) -> list[list[int]]:
    """Plain-Python k-core + sort: each user's rows (by file position) in protocol order."""
    keep = list(range(len(rows)))
    while True:
        users: dict[str, int] = {}
        for i in keep:
            users[rows[i][0]] = users.get(rows[i][0], 0) + 1
        kept_users = [i for i in keep if users[rows[i][0]] >= k_user]
        items: dict[str, int] = {}
        for i in kept_users:
            items[rows[i][1]] = items.get(rows[i][1], 0) + 1
        kept = [i for i in kept_users if items[rows[i][1]] >= k_item]
        if kept == keep:
            break
        keep = kept
    by_user: dict[str, list[int]] = {}
    for i in keep:
        by_user.setdefault(rows[i][0], []).append(i)
    key = (lambda i: (float(np.float32(rows[i][2])), i)) if f32 else (lambda i: (rows[i][2], i))
    return [sorted(positions, key=key) for positions in by_user.values()]  # users in order of first appearance


@pytest.mark.parametrize("time_sort", ["float32", "exact"])
def test_protocol_matches_a_slow_reference_on_random_data(time_sort):
    rng = np.random.default_rng(0)
    n = 600
    users = rng.integers(0, 60, n)
    items = rng.zipf(1.6, n) % 80
    times = T + rng.integers(0, 3000, n)  # many float32 ties, a few exact ties
    rows = [(f"u{u}", f"i{i}", float(t)) for u, i, t in zip(users, items, times)]
    frame = pl.DataFrame(rows, schema=["user", "item", "timestamp"], orient="row")
    protocol = ProtocolConfig(4, 3, time_sort=time_sort)
    kept, _ = filter_interactions(frame, protocol)
    data = to_prepared(sort_interactions(remap(kept), time_sort))
    expected = slow_reference(rows, 4, 3, time_sort == "float32")
    assert data.num_users == len(expected) and data.num_users > 10
    item_ids = {tok: i for i, tok in enumerate(data.item_tokens)}
    for u, positions in enumerate(expected):
        got = slice(data.offsets[u], data.offsets[u + 1])
        assert data.user_tokens[u] == rows[positions[0]][0]
        assert data.items[got].tolist() == [item_ids[rows[p][1]] for p in positions]
        assert data.timestamps[got].tolist() == [rows[p][2] for p in positions]
    assert data.stats["train_samples"] == sum(len(p) - 3 for p in expected)


# --- errors leave nothing behind ----------------------------------------------------------------------------------


def test_nothing_left_names_the_filter_that_emptied_it(tmp_path):
    data_dir = tmp_path / "data"
    with pytest.raises(UserError) as e:
        load_or_prepare(source(), ProtocolConfig(), data_dir, progress=False)  # 5-core: no user has 5 rows
    msg = str(e.value)
    assert "kcore.inter" in msg and "user filter min_user_inter=5" in msg and "lower min_user_inter" in msg
    with pytest.raises(UserError, match="item filter min_item_inter=9"):
        load_or_prepare(source(), ProtocolConfig(1, 9), data_dir, progress=False)
    assert not data_dir.exists()


def test_missing_file_and_unknown_dataset_leave_nothing(tmp_path):
    data_dir = tmp_path / "data"
    with pytest.raises(UserError, match=r"missing\.inter: file not found"):
        load_or_prepare(source(tmp_path / "missing.inter"), K3, data_dir)
    with pytest.raises(UserError, match="unknown dataset 'movielens'; known datasets: ml-100k, ml-1m"):
        load_or_prepare(SourceConfig(dataset="movielens"), K3, data_dir)
    with pytest.raises(UserError, match="no data source"):
        load_or_prepare(SourceConfig(), K3, data_dir)
    assert not data_dir.exists()


def test_bad_file_leaves_nothing(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("user_id,item_id,timestamp\na,x,1\nb,y,soon\n")
    with pytest.raises(UserError, match="1 non-numeric"):
        load_or_prepare(source(bad), K3, tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_bad_protocol_values():
    with pytest.raises(UserError, match="time_sort='float64' is not valid; use one of float32, exact"):
        load_or_prepare(source(), ProtocolConfig(time_sort="float64"))
    with pytest.raises(UserError, match="min_user_inter=-1"):
        load_or_prepare(source(), ProtocolConfig(min_user_inter=-1))


def test_dropped_null_ids_are_counted_in_the_manifest(tmp_path):
    path = tmp_path / "gaps.inter"
    path.write_text(KCORE.read_text() + "\tA\t1\t1600000000\nU1\t\t1\t1600000000\n")
    with pytest.raises(UserError, match="1 rows with no 'user_id' and 1 rows with no 'item_id'"):
        load_or_prepare(source(path), K3, tmp_path / "data", progress=False)
    with pytest.warns(UserWarning, match="dropped 2 rows with a missing user or item id"):
        data = load_or_prepare(source(path, drop_null_ids=True), K3, tmp_path / "data", progress=False)
    assert data.items.tolist() == EXPECTED_ITEMS_F32 and data.manifest["pipeline"]["null_ids_dropped"] == 2


# --- cache ---------------------------------------------------------------------------------------------------------


def test_cache_is_reused_and_records_its_manifest(tmp_path, monkeypatch):
    first = load_or_prepare(source(), K3, tmp_path, progress=False)
    cache = Path(first.manifest["cache_dir"])
    assert cache.parent == tmp_path / "kcore" and cache.name.startswith("prepared-")
    on_disk = json.loads((cache / "manifest.json").read_text())
    assert on_disk["checksum"] == first.manifest["checksum"] and len(on_disk["checksum"]) == 64
    assert set(on_disk["files"]) == {"offsets.npy", "items.npy", "timestamps.npy", "users.parquet", "items.parquet"}
    assert on_disk["source"]["sha256"] == prepare.sha256_file(KCORE)
    assert on_disk["params"]["protocol"] == {"min_user_inter": 3, "min_item_inter": 3, "drop_duplicates": False,
                                             "time_sort": "float32"}  # fmt: skip
    assert on_disk["stats"] == first.stats

    def no_reading(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(prepare, "read_interactions", no_reading)
    again = load_or_prepare(source(), K3, tmp_path, progress=False)
    assert again.manifest["checksum"] == first.manifest["checksum"]
    assert again.items.tolist() == first.items.tolist() and again.item_tokens == first.item_tokens
    assert again.timestamps.tolist() == first.timestamps.tolist() and again.user_tokens == first.user_tokens
    with pytest.raises(AssertionError, match="cache should have been used"):  # other parameters: another cache
        load_or_prepare(source(), ProtocolConfig(3, 3, time_sort="exact"), tmp_path, progress=False)
    assert not [p for p in (tmp_path / "kcore").iterdir() if p.name.startswith(".tmp")]


def test_changed_source_is_prepared_again(tmp_path):
    path = tmp_path / "kcore.inter"
    path.write_text(KCORE.read_text())
    before = load_or_prepare(source(path), K3, tmp_path / "data", progress=False)
    path.write_text(KCORE.read_text() + "U3\tA\t1\t1600009999\n")
    after = load_or_prepare(source(path), K3, tmp_path / "data", progress=False)
    assert after.num_interactions == before.num_interactions + 1
    assert after.manifest["checksum"] != before.manifest["checksum"]
    assert after.manifest["cache_dir"] == before.manifest["cache_dir"]  # same parameters: replaced in place


def test_unreadable_cache_is_rebuilt_with_a_warning(tmp_path):
    first = load_or_prepare(source(), K3, tmp_path, progress=False)
    cache = Path(first.manifest["cache_dir"])
    (cache / "items.npy").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="cached data is unreadable .*items.npy.*preparing it again"):
        again = load_or_prepare(source(), K3, tmp_path, progress=False)
    assert again.items.tolist() == EXPECTED_ITEMS_F32 and again.manifest["checksum"] == first.manifest["checksum"]
    (cache / "manifest.json").write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        load_or_prepare(source(), K3, tmp_path, progress=False)
    assert json.loads((cache / "manifest.json").read_text())["checksum"] == first.manifest["checksum"]


WORKER = textwrap.dedent(
    """
    import sys
    from tim4rec_pl.data import prepare
    real = prepare._prepare
    def counted(*args, **kwargs):
        with open(sys.argv[2], "a") as f:
            f.write("prepared\\n")
        return real(*args, **kwargs)
    prepare._prepare = counted
    data = prepare.load_or_prepare(prepare.SourceConfig(path=sys.argv[1]), prepare.ProtocolConfig(3, 3), sys.argv[3],
                                   progress=False)
    print(data.manifest["checksum"], data.items.tolist() == {items})
    """
).format(items=EXPECTED_ITEMS_F32)


def test_concurrent_processes_prepare_once(tmp_path):
    counter, data_dir = tmp_path / "count.txt", tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": str(Path(prepare.__file__).parents[2])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(KCORE), str(counter), str(data_dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )  # fmt: skip
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    lines = {out.strip() for out, _ in outputs}
    assert len(lines) == 1 and lines.pop().endswith(" True")
    assert counter.read_text() == "prepared\n"
    assert sorted(p.name for p in (data_dir / "kcore").iterdir() if not p.name.startswith("prepared-")) == [".lock"]


def test_a_path_names_its_cache_and_a_registry_file_keeps_its_options(tmp_path):
    # the DataModule always passes its `dataset` (default ml-100k): with a path, the file's stem names the cache
    data = load_or_prepare(SourceConfig(dataset="ml-100k", path=str(KCORE)), K3, tmp_path, progress=False)
    assert Path(data.manifest["cache_dir"]).parent == tmp_path / "kcore"
    # a local copy of the registry's Steam file reads its item column (product_id) without being told
    steam = tmp_path / "copy" / "steam.inter"
    steam.parent.mkdir()
    steam.write_text(KCORE.read_text().replace("item_id:token", "product_id:token", 1))
    data = load_or_prepare(SourceConfig(dataset="steam", path=str(steam)), K3, tmp_path, progress=False)
    assert data.items.tolist() == EXPECTED_ITEMS_F32 and Path(data.manifest["cache_dir"]).parent.name == "steam"
