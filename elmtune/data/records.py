"""Read records from JSON array, JSONL, Parquet or CSV files, directories of them, or ``datasets`` folders.

Every problem is reported with the file and the record (or line) it is in.  Whole-file problems (not UTF-8,
not JSON, empty) are always errors; a bad record inside a good file is an error too unless the caller asked
to skip bad records, in which case it is counted with its reason.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


class DataError(ValueError):
    """Bad input data; the message names the file, the record and (where it applies) the field."""


@dataclass
class Record:
    source: str  # the file it came from
    index: int  # its 0-based position in that file (JSON array index, or JSONL record number)
    values: dict
    line: int | None = None  # JSONL line number (1-based), for messages

    @property
    def where(self) -> str:
        return f"{self.source}: record {self.index}" + (f" (line {self.line})" if self.line else "")


@dataclass
class SkipLog:
    """Bad records skipped under ``on_bad_record=skip``: how many, and the first few reasons."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, reason: str) -> None:
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(reason)


def refuse_or_skip(reason: str, skips: SkipLog | None) -> None:
    """A bad record: a :class:`DataError` (``skips`` is None: on_bad_record=error), else counted as skipped."""
    if skips is None:
        raise DataError(reason)
    skips.add(reason)


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise _DuplicateKey(duplicates[0])
    return dict(pairs)


class _DuplicateKey(Exception):
    pass


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")  # a leading byte-order mark is harmless: accept it
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start}, line {line}); re-save the file as UTF-8") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    return text


def _read_json_array(path: Path, skips: SkipLog | None) -> Iterator[Record]:
    text = _read_text(path)
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except _DuplicateKey as e:
        raise DataError(f"{path}: a record has the key {e.args[0]!r} twice") from None
    if isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON array of records, found a single object "
                        "(wrap it in [ ] or write one object per line as .jsonl)")
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records, found {type(data).__name__}")
    for index, values in enumerate(data):
        if not isinstance(values, dict):
            refuse_or_skip(f"{path}: record {index}: expected an object with fields, got {type(values).__name__}",
                           skips)
            continue
        yield Record(str(path), index, values)


def _read_jsonl(path: Path, skips: SkipLog | None) -> Iterator[Record]:
    text = _read_text(path)
    index = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            values = json.loads(line, object_pairs_hook=_no_duplicate_keys)
            problem = None if isinstance(values, dict) else f"expected a JSON object, got {type(values).__name__}"
        except json.JSONDecodeError as e:
            problem = f"invalid JSON at column {e.colno}: {e.msg}"
        except _DuplicateKey as e:
            problem = f"the key {e.args[0]!r} appears twice"
        if problem:
            refuse_or_skip(f"{path}: line {number}: {problem}", skips)
            index += 1
            continue
        yield Record(str(path), index, values, line=number)
        index += 1


def _read_parquet(path: Path) -> Iterator[Record]:
    """Rows of a Parquet file as records (nested columns, such as a list of messages, come back as lists of
    dicts), read a batch at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(str(path))
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    except (pa.ArrowException, ValueError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    index = 0
    for batch in table.iter_batches(batch_size=1024):
        for values in batch.to_pylist():
            yield Record(str(path), index, values)
            index += 1


#: CSV cells are text: these columns may hold a JSON list (a conversation), decoded when the cell starts with [.
_JSON_COLUMNS = ("messages", "conversations")


def _read_csv(path: Path, skips: SkipLog | None) -> Iterator[Record]:
    """Rows of a CSV file (a header row first) as records of strings, every cell exactly as written — no type
    guessing, so an answer "42" stays the string "42".  A ``messages`` or ``conversations`` cell holding a JSON
    list is decoded."""
    text = _read_text(path)
    csv.field_size_limit(2**31 - 1)  # a long conversation in one cell is fine
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except csv.Error as e:
        raise DataError(f"{path}: line 1: invalid CSV ({e})") from None
    names = [name.strip() for name in header]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"{path}: line 1: the column {duplicates[0]!r} appears twice in the header")
    index, previous_end = 0, reader.line_num
    while True:
        start = previous_end + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"{path}: line {start}: invalid CSV ({e})") from None
        previous_end = reader.line_num
        if not row or row == [""] and len(names) > 1:
            continue  # a blank line
        problem = None
        if len(row) != len(names):
            problem = f"has {len(row)} cells, the header has {len(names)}"
        else:
            values: dict = dict(zip(names, row))
            for column in _JSON_COLUMNS:
                cell = values.get(column)
                if isinstance(cell, str) and cell.lstrip().startswith("["):
                    try:
                        values[column] = json.loads(cell)
                    except json.JSONDecodeError as e:
                        problem = f"column {column!r}: invalid JSON at column {e.colno}: {e.msg}"
        if problem:
            refuse_or_skip(f"{path}: record {index} (line {start}): {problem}", skips)
        else:
            yield Record(str(path), index, values, line=start)
        index += 1


def _read_datasets_folder(path: Path) -> Iterator[Record]:
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        data = load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{path}: cannot load this `datasets` folder ({e})") from None
    if isinstance(data, DatasetDict):
        if "train" not in data:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (has: {', '.join(data)})")
        data = data["train"]
    assert isinstance(data, Dataset)
    for index, values in enumerate(data):
        yield Record(str(path), index, dict(values))


def _is_datasets_folder(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()


SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")


def data_files(spec: str | Path) -> list[Path]:
    """The files (or ``datasets`` folders) a ``--data`` value stands for."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        if _is_datasets_folder(path):
            return [path]
        files = sorted((p for p in path.iterdir() if p.suffix in SUFFIXES and p.is_file()), key=_natural_key)
        if not files:
            raise DataError(f"{path}: no .json or .jsonl files (nor .parquet, .csv) in this directory")
        return files
    if path.suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {path.suffix or '(none)'}; use .json (an array), .jsonl, "
                        ".parquet or .csv")
    return [path]


def read_records(specs: list[str], skips: SkipLog | None = None) -> Iterator[Record]:
    """All records of all ``--data`` values, in order.  ``skips`` given → bad records are skipped and logged."""
    for spec in specs:
        for path in data_files(spec):
            if path.is_dir():
                yield from _read_datasets_folder(path)
            elif path.suffix == ".jsonl":
                yield from _read_jsonl(path, skips)
            elif path.suffix == ".parquet":
                yield from _read_parquet(path)
            elif path.suffix == ".csv":
                yield from _read_csv(path, skips)
            else:
                yield from _read_json_array(path, skips)
