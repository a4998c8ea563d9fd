"""Read example records (one dict per example) from jsonl, csv and parquet files or folders of them."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from kubetune.runtime.contract import DataFormat
from kubetune.runtime.io.errors import DataError, StorageError
from kubetune.runtime.io.settings import RuntimeSettings
from kubetune.runtime.io.storage import fetch

FORMAT_BY_EXTENSION = {
    ".jsonl": DataFormat.JSONL,
    ".json": DataFormat.JSONL,
    ".ndjson": DataFormat.JSONL,
    ".csv": DataFormat.CSV,
    ".parquet": DataFormat.PARQUET,
    ".pq": DataFormat.PARQUET,
}
READABLE_FORMATS = frozenset({DataFormat.JSONL, DataFormat.CSV, DataFormat.PARQUET})

Record = dict[str, Any]


def _format_of(path: Path, declared: DataFormat, uri: str) -> DataFormat:
    if declared != DataFormat.AUTO:
        if declared not in READABLE_FORMATS:
            raise DataError("data.format", f"format {declared.value} does not hold records; use jsonl, csv or parquet")
        return declared
    found = FORMAT_BY_EXTENSION.get(path.suffix.lower())
    if found is None:
        raise DataError(
            "data.format",
            f"cannot tell the format of {uri} from its extension {path.suffix or '(none)'!r}; "
            f"use one of {', '.join(sorted(FORMAT_BY_EXTENSION))} or set data.format",
        )
    return found


def _read_jsonl(path: Path, uri: str) -> list[Record]:
    records: list[Record] = []
    with path.open(encoding="utf-8") as stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(uri, f"line {number} is not valid JSON: {error.msg}") from None
            if not isinstance(record, dict):
                raise DataError(uri, f"line {number} is not a JSON object")
            records.append(record)
    return records


def _read_csv(path: Path) -> list[Record]:
    with path.open(encoding="utf-8", newline="") as stream:
        return [dict(row) for row in csv.DictReader(stream)]


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq

    records: list[Record] = pq.read_table(path).to_pylist()
    return records


def _files_of(path: Path, declared: DataFormat) -> list[Path]:
    """A file itself, or the data files of a folder in name order."""
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if declared == DataFormat.AUTO:
        files = [p for p in files if p.suffix.lower() in FORMAT_BY_EXTENSION]
    return files


def local_data(uri: str, settings: RuntimeSettings, field: str) -> Path:
    """The local copy of a data URI (downloaded first when remote); `field` names the spec field for errors."""
    try:
        path = fetch(uri, settings)
    except StorageError as error:
        raise DataError(field, f"cannot read {uri}: {error.problem}") from None
    if not path.exists():
        raise DataError(field, f"cannot read {uri}: no such file or folder")
    return path


def read_records(uri: str, declared: DataFormat, settings: RuntimeSettings, field: str) -> list[Record]:
    """Every record at `uri` (a file or a folder of files); `field` names the spec field for errors."""
    path = local_data(uri, settings, field)
    records: list[Record] = []
    for file in _files_of(path, declared):
        data_format = _format_of(file, declared, uri)
        try:
            if data_format == DataFormat.JSONL:
                records.extend(_read_jsonl(file, uri))
            elif data_format == DataFormat.CSV:
                records.extend(_read_csv(file))
            else:
                records.extend(_read_parquet(file))
        except DataError as error:
            raise DataError(field, f"cannot read {error.where}: {error.problem}") from None
        except (OSError, UnicodeDecodeError, csv.Error, ValueError) as error:
            raise DataError(field, f"cannot read {uri}: {error}") from None
    if not records:
        raise DataError(field, f"no examples in {uri}")
    return records
