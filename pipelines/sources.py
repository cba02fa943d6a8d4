"""Declared data sources: find their files, read every row of every supported file type, and
let people add a file (`make data-add FILE=...`) without anything ever writing over it.

    python -m pipelines.sources add ~/chats.jsonl --format sharegpt   # copy into data/raw/, track with DVC, check it parses
    python -m pipelines.sources list                                  # each source, its files, formats and rows

Reading never fails on one bad row: invalid UTF-8 is decoded with surrogate escapes so that the
row holding it, and only that row, is quarantined (`invalid_utf8`); a line that is not JSON
becomes a `malformed_json` row, and so does one bad element of a JSON array (the others are
read); a JSON file whose elements cannot be told apart stops the source, saying where. A UTF-8
byte-order mark is dropped. File types: JSONL, JSON (an array, or an object holding one), CSV,
Parquet, a saved `datasets` folder, and a Hugging Face id (only when a source names one).

How a file's rows are read (its format, ranking, columns, ShareGPT tags) is its source's
declaration in params.yaml, unless a LLaMA-Factory `dataset_info.json` in its folder (or a
folder above it, up to the source's own) has an entry naming it: that entry wins, as it is the
more specific. `add --format` records the format there, so prepare reads the file as checked.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from pipelines.clean import has_undecodable
from pipelines.data_config import MEDIA_COLUMNS, DatasetInfoEntry, SourceParams
from pipelines.formats import DEFAULT, Convention

RAW = Path("data/raw")
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
DATASET_INFO = "dataset_info.json"  # LLaMA-Factory's declarations of the files beside it: never data
JSON_CELLS = ("messages", "conversations", "chosen", "rejected", "prompt", "completion", "history", "tools")
BOM = "\ufeff"


@dataclass
class RawRow:
    source: str
    file: str
    line: int  # 1-based line (JSONL, CSV) or record number (JSON, Parquet, datasets)
    raw: str  # as found, for the quarantine file
    row: object = None
    error: tuple[str, str] | None = None  # (reason code, detail)
    convention: Convention = DEFAULT  # how the row is normalised (its file's declaration)


class SourceError(ValueError):
    """A declared source that cannot be read at all (missing, empty, unknown file type)."""


def is_dataset_dir(path: Path) -> bool:
    """A folder saved by `datasets` (a Dataset: state.json beside its dataset_info.json; or a
    DatasetDict). A folder holding only LLaMA-Factory's dataset_info.json is not one."""
    return path.is_dir() and (((path / "state.json").exists() and (path / DATASET_INFO).exists()) or (path / "dataset_dict.json").exists())


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
    return [p for p in found if is_dataset_dir(p) or (p.suffix in DATA_SUFFIXES and not p.name.startswith(".") and p.name != DATASET_INFO)]


def root_of(src: SourceParams) -> Path:
    """The folder a path source stands for: the folder itself, a file's folder, a glob's fixed part."""
    assert src.path is not None
    if any(ch in src.path for ch in "*?["):
        fixed = re.split(r"[*?\[]", src.path, maxsplit=1)[0]
        return Path(fixed) if fixed.endswith("/") else Path(fixed).parent
    path = Path(src.path)
    return path if path.is_dir() and not is_dataset_dir(path) else path.parent


def source_convention(src: SourceParams) -> Convention:
    return Convention.declared(src.format, src.ranking, src.tags, src.columns)


def entry_convention(entry: DatasetInfoEntry) -> Convention:
    """A dataset_info.json entry as a Convention. LLaMA-Factory declares pre-training text as
    alpaca with only a `prompt` column: that is the `text` format here."""
    columns = {k: v for k, v in entry.columns.items() if k not in MEDIA_COLUMNS}
    if entry.formatting == "alpaca" and set(columns) == {"prompt"}:
        return Convention.declared("text", columns={"text": columns["prompt"]})
    return Convention.declared(entry.formatting, entry.ranking, entry.tags, columns)


class DatasetInfo:
    """The LLaMA-Factory dataset_info.json files of a source's folders, read once each."""

    def __init__(self) -> None:
        self.read: dict[Path, dict[str, DatasetInfoEntry]] = {}

    def entries(self, folder: Path) -> dict[str, DatasetInfoEntry]:
        if folder not in self.read:
            self.read[folder] = self._load(folder / DATASET_INFO) if (folder / DATASET_INFO).is_file() and not is_dataset_dir(folder) else {}
        return self.read[folder]

    @staticmethod
    def _load(path: Path) -> dict[str, DatasetInfoEntry]:
        try:
            data = json.loads(_decode(path.read_bytes()))
        except json.JSONDecodeError as exc:
            raise SourceError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno}); it declares how the data files beside it are read (LLaMA-Factory's dataset_info.json): fix it or remove it") from None
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            return {}  # not LLaMA-Factory's: e.g. a `datasets` folder's own metadata
        out = {}
        for name, raw in data.items():
            try:
                out[name] = DatasetInfoEntry.model_validate(raw)
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or name}: {e['msg']}" for e in exc.errors())
                raise SourceError(f"{path}: entry '{name}': {problems}") from None
        return out

    def entry_for(self, file: Path, root: Path) -> tuple[Path, str, DatasetInfoEntry] | None:
        """The entry naming `file` (or a folder holding it), in the nearest dataset_info.json
        from the file's folder up to the source's root folder."""
        target = file.resolve()
        folders = [file.parent, *file.parent.parents]
        stop = next((i for i, f in enumerate(folders) if f.resolve() == root.resolve()), 0)
        for folder in folders[: stop + 1]:
            for name, entry in self.entries(folder).items():
                if entry.file_name is None:
                    continue
                named = (folder / entry.file_name).resolve()
                if named == target or named in target.parents:
                    return folder / DATASET_INFO, name, entry
        return None


def declared_files(src: SourceParams, info: DatasetInfo | None = None) -> list[tuple[Path, Convention, str]]:
    """(file, how its rows are read, where that was declared) for every file of a path source."""
    info = info or DatasetInfo()
    base, root = source_convention(src), root_of(src)
    out = []
    for f in files_of(src):
        found = info.entry_for(f, root)
        out.append((f, entry_convention(found[2]), f"{found[0]} entry '{found[1]}'") if found else (f, base, "params.yaml"))
    return out


def source_deps(params) -> list[str]:
    """Local paths the prepare stage reads, for its DVC dependencies (a glob: its folder; a
    file: also the dataset_info.json beside it, which says how it is read)."""
    deps = []
    for src in params.data.sources:
        if src.path is None:
            continue
        path = src.path
        if any(ch in path for ch in "*?["):
            path = str(Path(path.split("*")[0].split("?")[0].split("[")[0]).parent if "/" in path else ".")
        deps.append(path.rstrip("/"))
        if Path(path).is_file() and (info := Path(path).parent / DATASET_INFO).is_file():
            deps.append(info.as_posix())
    return list(dict.fromkeys(deps))


def _decode(data: bytes) -> str:
    """UTF-8 with surrogate escapes for bad bytes (their row is quarantined), without the
    byte-order mark some editors put first (it would make the first row unreadable)."""
    return data.decode("utf-8", errors="surrogateescape").removeprefix(BOM)


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


def _record(label: str, path: Path, n: int, raw: str, row: object, conv: Convention) -> RawRow:
    if _bad_utf8(row):
        return RawRow(label, str(path), n, _printable(raw), error=("invalid_utf8", "the row holds bytes that are not valid UTF-8"), convention=conv)
    return RawRow(label, str(path), n, raw, row=conv.rename(row), convention=conv)


def read_jsonl(label: str, path: Path, conv: Convention) -> Iterator[RawRow]:
    for n, line in enumerate(_decode(path.read_bytes()).split("\n"), start=1):
        if not line.strip():
            continue
        if has_undecodable(line):
            yield RawRow(label, str(path), n, _printable(line), error=("invalid_utf8", "the line holds bytes that are not valid UTF-8"), convention=conv)
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            yield RawRow(label, str(path), n, line, error=("malformed_json", exc.msg), convention=conv)
            continue
        yield _record(label, path, n, line, row, conv)


_JSON_SYNTAX = re.compile(r'["\\\[\]{},]')


def array_elements(text: str) -> tuple[list[tuple[int, str]], str | None]:
    """The top-level elements of a JSON array as (line, text), found by bracket depth outside
    strings, so that one bad element does not hide the others. The second value says why the
    elements cannot be told apart (None when they can); the list then holds those before it."""
    start = len(text) - len(text.lstrip())
    if text[start : start + 1] != "[":
        return [], "the file is not a JSON array"
    elements: list[tuple[int, str]] = []
    depth, in_string, skip, begin = 0, False, -1, start + 1

    def cut(end: int) -> None:
        chunk = text[begin:end]
        if chunk.strip():  # `[]` and a trailing comma hold no element
            first = begin + len(chunk) - len(chunk.lstrip())
            elements.append((text.count("\n", 0, first) + 1, chunk))

    for m in _JSON_SYNTAX.finditer(text, start):
        i, ch = m.start(), m.group()
        if i == skip:
            continue
        if in_string:
            if ch == "\\":
                skip = i + 1
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
            if depth == 0:
                cut(i)
                trailing = text[i + 1 :].strip()
                return elements, (f"text after the array's end (line {text.count(chr(10), 0, i) + 1})" if trailing else None)
            if depth < 0:
                break
        elif ch == "," and depth == 1:
            cut(i)
            begin = i + 1
    return elements, "its brackets or quotes do not balance"


def read_json(label: str, path: Path, conv: Convention) -> Iterator[RawRow]:
    text = _decode(path.read_bytes())
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        yield from _recover_array(label, path, text, conv, exc)
        return
    if isinstance(data, dict):  # {"data": [...]} and the like: the first list of records
        data = next((v for v in data.values() if isinstance(v, list)), [data])
    if not isinstance(data, list):
        data = [data]
    for n, row in enumerate(data, start=1):
        yield _record(label, path, n, json.dumps(row, ensure_ascii=False)[:2000], row, conv)


def _recover_array(label: str, path: Path, text: str, conv: Convention, exc: json.JSONDecodeError) -> Iterator[RawRow]:
    """A JSON array with bad elements: every element that parses is read, each bad one is a
    `malformed_json` row. A file whose elements cannot be told apart stops the source."""
    elements, unsplittable = array_elements(text)
    if unsplittable:
        raise SourceError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}), and {unsplittable}, so its rows cannot be told apart"
            f" ({len(elements)} array element(s) before that point); fix the file, or convert it to JSONL where a bad line costs only itself"
        )
    for n, (line, chunk) in enumerate(elements, start=1):
        try:
            row = json.loads(chunk)
        except json.JSONDecodeError as bad:
            yield RawRow(label, str(path), n, chunk.strip()[:2000], error=("malformed_json", f"array element {n} (line {line + bad.lineno - 1}): {bad.msg}"), convention=conv)
            continue
        yield _record(label, path, n, chunk.strip()[:2000], row, conv)


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


def read_csv(label: str, path: Path, conv: Convention) -> Iterator[RawRow]:
    reader = csv.DictReader(io.StringIO(_decode(path.read_bytes()), newline=""))
    for row in reader:
        raw = json.dumps(row, ensure_ascii=False)
        parsed = {k: _cell(k, v) for k, v in row.items() if k is not None}
        yield _record(label, path, reader.line_num, raw[:2000], parsed, conv)


def _rows_of_table(label: str, path: Path, records, conv: Convention) -> Iterator[RawRow]:
    for n, row in enumerate(records, start=1):
        yield _record(label, path, n, json.dumps(row, ensure_ascii=False, default=str)[:2000], row, conv)


def read_parquet(label: str, path: Path, conv: Convention) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    yield from _rows_of_table(label, path, pq.read_table(path).to_pylist(), conv)


def read_dataset_dir(label: str, path: Path, conv: Convention) -> Iterator[RawRow]:
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    parts = ds.values() if isinstance(ds, DatasetDict) else [ds]
    for part in parts:
        yield from _rows_of_table(label, path, part, conv)


READERS = {".jsonl": read_jsonl, ".json": read_json, ".csv": read_csv, ".parquet": read_parquet}


def read_file(label: str, path: Path, conv: Convention) -> Iterator[RawRow]:
    yield from (read_dataset_dir if is_dataset_dir(path) else READERS[path.suffix])(label, path, conv)


def read_source(src: SourceParams) -> Iterator[RawRow]:
    """Every raw row of a source, or a SourceError naming it when it cannot be read at all."""
    if src.hub is not None:
        from datasets import load_dataset

        try:
            ds = load_dataset(src.hub, split=src.hub_split)
        except Exception as exc:  # offline, unknown id, ...: say which source and why
            raise SourceError(f"source '{src.label}': cannot load hub dataset '{src.hub}' ({type(exc).__name__}: {exc}); it needs a network, or declare a local path instead") from None
        yield from _rows_of_table(src.label, Path(f"hub:{src.hub}"), ds, source_convention(src))
        return
    files = declared_files(src)
    if not files:
        if src.required:
            raise SourceError(f"source '{src.label}': no data files at '{src.path}' (looked for {', '.join(DATA_SUFFIXES)} and saved datasets); fix data.sources in params.yaml or add files")
        return
    for f, conv, _ in files:
        yield from read_file(src.label, f, conv)


# ---------------------------------------------------------------- the CLI


def check_file(path: Path, fmt: str | Convention = "auto") -> Counter:
    """Parse a file as prepare will: counts of usable rows per table and of problems per reason.
    A format name is read as the file's declaration would be (a dataset_info.json entry beside
    it wins over 'auto'); a Convention is used as given."""
    from pipelines.formats import RowError, normalise

    if isinstance(fmt, Convention):
        rows = read_file("check", path, fmt)
    else:
        rows = read_source(SourceParams(name="check", path=str(path), format=fmt))
    counts: Counter = Counter()
    for r in rows:
        if r.error:
            counts[f"quarantined: {r.error[0]}"] += 1
            continue
        try:
            (table,) = normalise(r.row, r.convention)
            counts[table] += 1
        except RowError as exc:
            counts[f"quarantined: {exc.code}"] += 1
    return counts


def declaration_for(path: Path, fmt: str, name: str) -> DatasetInfoEntry | None:
    """What `add` records for a file: the LLaMA-Factory entry found beside it (its
    dataset_info.json), with `fmt` as its formatting unless fmt is 'auto'; or `fmt` alone."""
    found = DatasetInfo().entry_for(path, path.parent)
    if found:
        entry = found[2].model_copy(update={"file_name": name, **({"formatting": fmt} if fmt != "auto" else {})})
        return DatasetInfoEntry.model_validate(entry.model_dump(exclude_defaults=True))
    return DatasetInfoEntry(file_name=name, formatting=fmt) if fmt != "auto" else None


def record_declaration(dest: Path, entry: DatasetInfoEntry) -> Path:
    """Write `entry` for `dest` into the dataset_info.json of its folder (other entries kept)."""
    info = dest.parent / DATASET_INFO
    data = json.loads(_decode(info.read_bytes())) if info.exists() else {}
    data = {k: v for k, v in data.items() if v.get("file_name") != dest.name}
    key = dest.stem if dest.stem not in data else dest.name
    data[key] = entry.model_dump(exclude_defaults=True) | {"file_name": dest.name, "formatting": entry.formatting}
    info.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return info


def add(path: Path, fmt: str = "auto") -> Path:
    if not path.exists():
        raise SystemExit(f"{path}: no such file")
    if not (is_dataset_dir(path) or path.suffix in DATA_SUFFIXES):
        raise SystemExit(f"{path}: unsupported file type '{path.suffix}'; supported: {', '.join(DATA_SUFFIXES)} or a saved datasets folder")
    dest = path if RAW.resolve() in path.resolve().parents else RAW / path.name
    try:
        entry = declaration_for(path, fmt, dest.name)
        counts = check_file(path, entry_convention(entry) if entry else fmt)
    except SourceError as exc:
        raise SystemExit(str(exc)) from None
    usable = sum(v for k, v in counts.items() if not k.startswith("quarantined"))
    if usable == 0:
        problems = ", ".join(f"{k.split(': ')[1]} x{v}" for k, v in counts.items()) or "no rows"
        raise SystemExit(f"{path}: no usable rows in format '{entry.formatting if entry else fmt}' ({problems}); see data/README.md for the formats")
    if dest != path:
        if dest.exists():
            raise SystemExit(f"{dest} exists already; rename the file or remove the old one first (nothing was changed)")
        RAW.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if path.is_dir() else shutil.copy2)(path, dest)
    info = record_declaration(dest, entry) if entry else None
    tracked = subprocess.run([sys.executable, "-m", "dvc", "add", "--quiet", str(dest)], capture_output=True, text=True)
    summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    print(f"added {dest} ({summary})")
    if info:
        print(f"format '{entry.formatting}'{' (ranking)' if entry.ranking else ''} recorded in {info}: prepare reads the file so")
    commit = " ".join([f"{dest}.dvc", f"{dest.parent}/.gitignore", *([str(info)] if info else [])])
    if tracked.returncode == 0:
        print(f"tracked by DVC: commit {commit} with git; `make pipeline` uses it from now on")
    else:
        print(f"not tracked by DVC ({tracked.stderr.strip().splitlines()[-1] if tracked.stderr.strip() else 'dvc add failed'}); it is still read from {dest}")
    return dest


def list_sources(params) -> None:
    for src in params.data.sources:
        where = src.hub and f"hub {src.hub}" or src.path
        print(f"{src.label}: {where} (format {src.format}, split {src.split}, weight {src.weight}{'' if src.required else ', optional'})")
        if src.path is None:
            continue
        for f, conv, declared in declared_files(src):
            counts = check_file(f, conv)
            print(f"  {f} (format {conv.format}{', ranking' if conv.ranking else ''}: {declared}): " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


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
    except (ConfigError, SourceError) as exc:
        raise SystemExit(str(exc)) from None


if __name__ == "__main__":
    main()
