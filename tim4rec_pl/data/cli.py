"""``tim4rec-pl data prepare|stats``: prepare a dataset into the cache, or describe it.

The options mirror the ``data:`` section of a training config (SeqRecDataModule's arguments), so
``tim4rec-pl data stats --config configs/ml-1m.yaml`` describes exactly the data that ``fit`` will train on.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from tim4rec_pl.data.prepare import TIME_SORTS, ProtocolConfig, SourceConfig, load_or_prepare
from tim4rec_pl.data.sources import FORMATS, REGISTRY, TIME_UNITS
from tim4rec_pl.errors import UserError

SOURCE_KEYS = tuple(f.name for f in fields(SourceConfig))
PROTOCOL_KEYS = tuple(f.name for f in fields(ProtocolConfig))
DEFAULT_DATA_DIR = "data"

EPILOG = """examples:
  tim4rec-pl data prepare --dataset ml-1m
  tim4rec-pl data stats --config configs/ml-100k.yaml --json
  tim4rec-pl data stats --path logs.csv --user_field uid --item_field sku --time_field ts --time_unit iso
errors print one line on stderr and exit with code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other user error
        raise UserError(f"data: {message}; see tim4rec-pl data --help")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tim4rec-pl data",
        description="Prepare interactions (docs/data.md: k-core, remap, sort) into the cache, or print its statistics.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="{prepare,stats}", parser_class=_Parser)
    for name, text in (("prepare", "fetch (if needed), prepare and cache a dataset; print where it went"),
                       ("stats", "prepare if needed, then print users, items, lengths, gaps ...")):  # fmt: skip
        sub = commands.add_parser(name, help=text, description=text, epilog=EPILOG,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        _add_options(sub)
        if name == "stats":
            sub.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser


def _add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="YAML", help="a training config: its data: section gives the options below")
    src = p.add_argument_group("source (command-line values override the config)")
    src.add_argument("--dataset", help=f"registered dataset: {', '.join(REGISTRY)}")
    src.add_argument("--path", help="an interaction file to read instead of a registered dataset")
    src.add_argument("--format", choices=FORMATS, help="file format (default: auto, guessed from name and content)")
    src.add_argument("--user_field", help="user column (default per format; atomic/csv: user_id)")
    src.add_argument("--item_field", help="item column (default per format; atomic/csv: item_id)")
    src.add_argument("--time_field", help="timestamp column (default per format; atomic/csv: timestamp)")
    src.add_argument("--time_unit", choices=TIME_UNITS, help="s | ms | iso | auto (all > 1e11: ms; all below: s)")
    src.add_argument("--separator", help="column separator of a csv/tsv file, e.g. ';' or '\\t'")
    src.add_argument("--drop_null_ids", action=argparse.BooleanOptionalAction, default=None,
                     help="drop rows with a missing user or item id (default: fail and count them)")  # fmt: skip
    src.add_argument("--data_dir", "--data-dir", help=f"root of downloads and caches (default: {DEFAULT_DATA_DIR})")
    proto = p.add_argument_group("protocol (docs/data.md)")
    proto.add_argument("--min_user_inter", type=int, help="k-core: keep users with at least N interactions (5)")
    proto.add_argument("--min_item_inter", type=int, help="k-core: keep items with at least N interactions (5)")
    proto.add_argument("--drop_duplicates", action=argparse.BooleanOptionalAction, default=None,
                       help="drop exact (user, item, timestamp) duplicates (default: keep, as RecBole)")  # fmt: skip
    proto.add_argument("--time_sort", choices=TIME_SORTS,
                       help="float32: on float32-rounded seconds, ties in file order (faithful); exact")  # fmt: skip
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def config_data_section(path: str | Path) -> dict[str, Any]:
    """The data options of a LightningCLI config: ``data:`` directly or under ``init_args:``; others ignored."""
    import yaml

    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text())
    except OSError as e:
        raise UserError(f"--config {path}: cannot read it ({e.strerror or e}); check the path") from None
    except yaml.YAMLError as e:
        raise UserError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]}); fix the file") from None
    if not isinstance(config, dict):
        return {}
    values: dict[str, Any] = {}
    if isinstance(config.get("config"), str):  # a config that includes another (configs/*-ssd4rec.yaml ...)
        values.update(config_data_section(path.parent / config["config"]))
    data = config.get("data")
    if data is not None and not isinstance(data, dict):
        raise UserError(f"--config {path}: data: must be a mapping of SeqRecDataModule arguments; fix the file")
    if isinstance(data, dict) and isinstance(data.get("init_args"), dict):
        data = data["init_args"]
    values.update(data or {})
    values.update({k.split(".", 1)[1]: v for k, v in config.items() if k.startswith("data.")})  # data.batch_size: ...
    return {k: v for k, v in values.items() if k in (*SOURCE_KEYS, *PROTOCOL_KEYS, "data_dir")}


def resolve_options(args: argparse.Namespace) -> tuple[SourceConfig, ProtocolConfig, str]:
    """Defaults < config file < command line."""
    values = config_data_section(args.config) if args.config else {}
    for key in (*SOURCE_KEYS, *PROTOCOL_KEYS, "data_dir"):
        if getattr(args, key, None) is not None:
            values[key] = getattr(args, key)
    if args.dataset is not None and args.path is None:
        values.pop("path", None)  # --dataset on the command line replaces a config's path
    if args.path is not None and args.dataset is None:
        values.pop("dataset", None)
    if values.get("dataset") is None and values.get("path") is None:
        raise UserError("data: no data source; pass --dataset NAME, --path FILE or --config with data:")
    for key in ("min_user_inter", "min_item_inter"):
        if key in values and (isinstance(values[key], bool) or not isinstance(values[key], int)):
            raise UserError(f"{key}={values[key]!r} is not valid; use a whole number >= 0")
    source = SourceConfig(**{k: values[k] for k in SOURCE_KEYS if k in values})
    protocol = ProtocolConfig(**{k: values[k] for k in PROTOCOL_KEYS if k in values})
    return source, protocol, str(values.get("data_dir") or DEFAULT_DATA_DIR)


def format_table(report: dict) -> str:
    """A readable two-column table of the stats report."""
    s = report
    rows = [
        ("dataset", s["dataset"]),
        ("source", s["source"]),
        ("cache", s["cache_dir"]),
        ("checksum", s["checksum"][:16]),
        ("users", f"{s['users']:,}"),
        ("items (no padding)", f"{s['items']:,}"),
        ("interactions", f"{s['interactions']:,}"),
        ("density", f"{s['density']:.4%}"),
        ("sequence length min / median / avg / max",
         f"{s['min_seq_len']} / {s['median_seq_len']:g} / {s['avg_seq_len']:.1f} / {s['max_seq_len']}"),
        ("time span", f"{s['time_span_days']:,.1f} days"),
        ("same-second neighbours / zero float32 gaps",
         f"{s['zero_gap_share']:.1%} / {s['zero_gap_share_float32']:.1%}"),
        ("training samples", f"{s['train_samples']:,}"),
        ("rows read / k-core removed", f"{s['pipeline']['rows_read']:,} / {s['pipeline']['kcore_removed']:,}"),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str]) -> int:
    """Run ``tim4rec-pl data ...`` with the arguments after ``data``; returns the exit code."""
    parser = build_parser()
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help
            return int(e.code or 0)
        if args.command is None:
            parser.print_help()
            return 2
        source, protocol, data_dir = resolve_options(args)
        data = load_or_prepare(source, protocol, data_dir, progress=args.progress)
    except UserError as e:
        print(f"tim4rec-pl: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. a data_dir that cannot be written
        print(f"tim4rec-pl: error: {e.filename or ''}: {e.strerror or e}; check the path and its permissions",
              file=sys.stderr)  # fmt: skip
        return 2
    m = data.manifest
    report = {
        "dataset": source.dataset or Path(m["source"]["file"]).name,
        "source": m["source"]["file"],
        "cache_dir": m["cache_dir"],
        "checksum": m["checksum"],
        **m["stats"],
        "pipeline": m["pipeline"],
    }
    if args.command == "prepare":
        r = report
        print(f"{r['dataset']}: {r['users']:,} users, {r['items']:,} items, {r['interactions']:,} interactions "
              f"-> {r['cache_dir']} (checksum {r['checksum'][:16]})")  # fmt: skip
    elif args.json:
        print(json.dumps(report))
    else:
        print(format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
