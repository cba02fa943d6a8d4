"""Declared data sources: find their files, read every row of every supported file type, and
let people add a file (`make data-add FILE=...`) without anything ever writing over it.

    python -m pipelines.sources add ~/chats.jsonl    # copy into data/raw/, track with DVC, check it parses
    python -m pipelines.sources list                 # each source, its files, formats and rows

Reading never fails on one bad row: invalid UTF-8 is decoded with surrogate escapes so that the
row holding it, and only that row, is quarantined (`invalid_utf8`); a line that is not JSON
becomes a `malformed_json` row. File types: JSONL, JSON (an array, or an object holding one),
CSV, Parquet, a saved `datasets` folder, and a Hugging Face id (only when a source names one).
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipelines.clean import has_undecodable
from pipelines.data_config import SourceParams

RAW = Path("data/raw")
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
PREPARE_CODE = [
    "pipelines/prepare.py", "pipelines/formats.py", "pipelines/clean.py",
    "pipelines/sources.py", "pipelines/validate.py", "pipelines/data_config.py", "pipelines/section.py",
]
JSON_CELLS = ("messages", "conversations", "chosen", "rejected", "prompt", "completion", "history", "tools")


@dataclass
class RawRow:
    source: str
    file: str
    line: int  # 1-based line (JSONL, CSV) or record number (JSON, Parquet, datasets)
    raw: str  # as found, for the quarantine file
    row: object = None
    error: tuple[str, str] | None = None  # (reason code, detail)


class SourceError(ValueError):
    """A declared source that cannot be read at all (missing, empty, unknown file type)."""


def is_dataset_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists())


def files_of(src: SourceParams) -> list[Path]:
    """The data files a path source stands for, in a stable order."""
    assert src.path is not None
    if any(ch in src.path for ch in "*?["):
        found = [Path(p) for p in sorted(glob.glob(src.path, recursive=True))]
    elif is_dataset_dir(Path(src.path)):
        return [Path(src.path)]
    elif Path(src.path).is_dir():
        found = sorted(p for p in Path(src.path).rglob("*") if p.is_file() or is_dataset_dir(p))
        datasets = [p for p in found if is_dataset_dir(p)]
        found = datasets + [p for p in found if not any(d in p.parents for d in datasets)]
    else:
        found = [Path(src.path)] if Path(src.path).exists() else []
    return [p for p in found if is_dataset_dir(p) or (p.suffix in DATA_SUFFIXES and not p.name.startswith("."))]


def source_deps(params) -> list[str]:
    """Local paths the prepare stage reads, for its DVC dependencies (a glob: its folder)."""
    deps = []
    for src in params.data.sources:
        if src.path is None:
            continue
        path = src.path
        if any(ch in path for ch in "*?["):
            path = str(Path(path.split("*")[0].split("?")[0].split("[")[0]).parent if "/" in path else ".")
        deps.append(path.rstrip("/"))
    return deps


def _decode(data: bytes) -> str:
    return data.decode("utf-8", errors="surrogateescape")


def _bad_utf8(obj: object) -> bool:
    if isinstance(obj, str):
        return has_undecodable(obj)
    if isinstance(obj, dict):
        return any(_bad_utf8(k) or _bad_utf8(v) for k, v in obj.items())
    if isinstance(obj, list):
        return any(_bad_utf8(v) for v in obj)
    return False


def _printable(text: str) -> str:
    return text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")


def _mapped(row: object, columns: dict[str, str]) -> object:
    if not columns or not isinstance(row, dict):
        return row
    row = dict(row)
    for canonical, column in columns.items():
        if column in row:
            row[canonical] = row.pop(column)
    return row


def _record(label: str, path: Path, n: int, raw: str, row: object, columns: dict[str, str]) -> RawRow:
    if _bad_utf8(row):
        return RawRow(label, str(path), n, _printable(raw), error=("invalid_utf8", "the row holds bytes that are not valid UTF-8"))
    return RawRow(label, str(path), n, raw, row=_mapped(row, columns))


def read_jsonl(label: str, path: Path, columns: dict[str, str]) -> Iterator[RawRow]:
    for n, line in enumerate(_decode(path.read_bytes()).split("\n"), start=1):
        if not line.strip():
            continue
        if has_undecodable(line):
            yield RawRow(label, str(path), n, _printable(line), error=("invalid_utf8", "the line holds bytes that are not valid UTF-8"))
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            yield RawRow(label, str(path), n, line, error=("malformed_json", exc.msg))
            continue
        yield _record(label, path, n, line, row, columns)


def read_json(label: str, path: Path, columns: dict[str, str]) -> Iterator[RawRow]:
    text = _decode(path.read_bytes())
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:  # the whole file is one unreadable row
        yield RawRow(label, str(path), 1, _printable(text[:500]), error=("malformed_json", f"{exc.msg} (line {exc.lineno}): the file is not a JSON document"))
        return
    if isinstance(data, dict):  # {"data": [...]} and the like: the first list of records
        data = next((v for v in data.values() if isinstance(v, list)), [data])
    if not isinstance(data, list):
        data = [data]
    for n, row in enumerate(data, start=1):
        yield _record(label, path, n, json.dumps(row, ensure_ascii=False)[:2000], row, columns)


def _cell(key: str, value: str):
    """CSV cells are text: JSON-looking cells of conversational fields are parsed."""
    if value == "":
        return None
    if key in JSON_CELLS and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def read_csv(label: str, path: Path, columns: dict[str, str]) -> Iterator[RawRow]:
    reader = csv.DictReader(io.StringIO(_decode(path.read_bytes()), newline=""))
    for row in reader:
        raw = json.dumps(row, ensure_ascii=False)
        parsed = {k: _cell(k, v) for k, v in row.items() if k is not None}
        yield _record(label, path, reader.line_num, raw[:2000], parsed, columns)


def _rows_of_table(label: str, path: Path, records, columns: dict[str, str]) -> Iterator[RawRow]:
    for n, row in enumerate(records, start=1):
        yield _record(label, path, n, json.dumps(row, ensure_ascii=False, default=str)[:2000], row, columns)


def read_parquet(label: str, path: Path, columns: dict[str, str]) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    yield from _rows_of_table(label, path, pq.read_table(path).to_pylist(), columns)


def read_dataset_dir(label: str, path: Path, columns: dict[str, str]) -> Iterator[RawRow]:
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    parts = ds.values() if isinstance(ds, DatasetDict) else [ds]
    for part in parts:
        yield from _rows_of_table(label, path, part, columns)


READERS = {".jsonl": read_jsonl, ".json": read_json, ".csv": read_csv, ".parquet": read_parquet}


def read_source(src: SourceParams) -> Iterator[RawRow]:
    """Every raw row of a source, or a SourceError naming it when it cannot be read at all."""
    if src.hub is not None:
        from datasets import load_dataset

        try:
            ds = load_dataset(src.hub, split=src.hub_split)
        except Exception as exc:  # offline, unknown id, ...: say which source and why
            raise SourceError(f"source '{src.label}': cannot load hub dataset '{src.hub}' ({type(exc).__name__}: {exc}); it needs a network, or declare a local path instead") from None
        yield from _rows_of_table(src.label, Path(f"hub:{src.hub}"), ds, src.columns)
        return
    files = files_of(src)
    if not files:
        if src.required:
            raise SourceError(f"source '{src.label}': no data files at '{src.path}' (looked for {', '.join(DATA_SUFFIXES)} and saved datasets); fix data.sources in params.yaml or add files")
        return
    for f in files:
        yield from (read_dataset_dir if is_dataset_dir(f) else READERS[f.suffix])(src.label, f, src.columns)


# ---------------------------------------------------------------- the CLI


def check_file(path: Path, fmt: str) -> Counter:
    """Parse a file as prepare will: counts of usable rows per table and of problems per reason."""
    from pipelines.formats import RowError, normalise

    counts: Counter = Counter()
    for r in read_source(SourceParams(name="check", path=str(path), format=fmt)):
        if r.error:
            counts[f"quarantined: {r.error[0]}"] += 1
            continue
        try:
            (table,) = normalise(r.row, fmt)
            counts[table] += 1
        except RowError as exc:
            counts[f"quarantined: {exc.code}"] += 1
    return counts


def add(path: Path, fmt: str = "auto") -> Path:
    if not path.exists():
        raise SystemExit(f"{path}: no such file")
    if not (is_dataset_dir(path) or path.suffix in DATA_SUFFIXES):
        raise SystemExit(f"{path}: unsupported file type '{path.suffix}'; supported: {', '.join(DATA_SUFFIXES)} or a saved datasets folder")
    counts = check_file(path, fmt)
    usable = sum(v for k, v in counts.items() if not k.startswith("quarantined"))
    if usable == 0:
        problems = ", ".join(f"{k.split(': ')[1]} x{v}" for k, v in counts.items()) or "no rows"
        raise SystemExit(f"{path}: no usable rows in format '{fmt}' ({problems}); see data/README.md for the formats")
    dest = path if RAW.resolve() in path.resolve().parents else RAW / path.name
    if dest != path:
        if dest.exists():
            raise SystemExit(f"{dest} exists already; rename the file or remove the old one first (nothing was changed)")
        RAW.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if path.is_dir() else shutil.copy2)(path, dest)
    tracked = subprocess.run([sys.executable, "-m", "dvc", "add", "--quiet", str(dest)], capture_output=True, text=True)
    summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    print(f"added {dest} ({summary})")
    if tracked.returncode == 0:
        print(f"tracked by DVC: commit {dest}.dvc and {dest.parent}/.gitignore with git; `make pipeline` uses it from now on")
    else:
        print(f"not tracked by DVC ({tracked.stderr.strip().splitlines()[-1] if tracked.stderr.strip() else 'dvc add failed'}); it is still read from {dest}")
    return dest


def list_sources(params) -> None:
    for src in params.data.sources:
        where = src.hub and f"hub {src.hub}" or src.path
        print(f"{src.label}: {where} (format {src.format}, split {src.split}, weight {src.weight}{'' if src.required else ', optional'})")
        if src.path is None:
            continue
        for f in files_of(src):
            counts = check_file(f, src.format)
            print(f"  {f}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


def main(argv: list[str] | None = None) -> None:
    from pipelines.config import ConfigError, load_params

    parser = argparse.ArgumentParser(prog="python -m pipelines.sources", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("add", help="copy a file into data/raw/, track it with DVC, check that it parses")
    a.add_argument("path", type=Path)
    a.add_argument("--format", default="auto", help="row format to check it against (default: auto, by keys)")
    sub.add_parser("list", help="the declared sources, their files and row counts")
    args = parser.parse_args(argv)
    if args.command == "add":
        from pipelines.formats import normaliser

        try:
            normaliser(args.format)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        add(args.path, args.format)
        return
    try:
        list_sources(load_params())
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None


if __name__ == "__main__":
    main()
