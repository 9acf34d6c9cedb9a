"""JSONL and CSV manifests: one row per line (a CSV record may span lines), fields holding text
or paths (relative to the manifest) to images and audio files.

The index is the byte offset where each row starts (int64, 8 bytes a row) plus the file's end;
row i is the bytes from its start to the next row's start.
"""

from __future__ import annotations

import csv
import functools
import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from pathways_mm.data.sources.base import (
    DEFAULT_RULES,
    BadSample,
    MediaRules,
    PreadFile,
    Row,
    Source,
    cached_index,
    existing_file,
    file_stamp,
)
from pathways_mm.errors import ConfigError

CHUNK = 1 << 20  # bytes scanned at a time while indexing (small: freed buffers stay resident)


def _line_starts(path: Path) -> np.ndarray:
    """Offsets of the non-blank lines of `path`, then its size (int64 [rows + 1])."""
    out, offset, carry = [], 0, b""  # offset: where `carry` (a line without its newline yet) begins
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            buf = carry + chunk
            arr = np.frombuffer(buf, np.uint8)
            newlines = np.flatnonzero(arr == 10)
            if not len(newlines):
                carry = buf
                continue
            starts = np.concatenate([[0], newlines[:-1] + 1])
            lengths = newlines - starts  # bytes before the newline
            blank = (lengths == 0) | ((lengths == 1) & (arr[starts] == 13))  # "\n" or "\r\n" alone
            out.append(starts[~blank] + offset)
            cut = int(newlines[-1]) + 1
            carry, offset = buf[cut:], offset + cut
    if carry.strip():  # a last line without a newline
        out.append(np.array([offset]))
    return np.concatenate([*out, [offset + len(carry)]]).astype(np.int64)


def _newlines_before_blocks(path: Path) -> np.ndarray:
    """Newlines before each CHUNK-aligned block of `path` (int64 [blocks + 1])."""
    counts = [0]
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            counts.append(counts[-1] + chunk.count(b"\n"))
    return np.array(counts, np.int64)


class _LineNumbers:
    """The line of a byte offset ("PATH line N"), for messages: one scan of the file on the first
    call, then a read of at most one block per call."""

    def __init__(self, path: Path):
        self.path = path
        self._before: np.ndarray | None = None

    def __call__(self, offset: int) -> str:
        if self._before is None:
            self._before = _newlines_before_blocks(self.path)
        block = offset // CHUNK
        with self.path.open("rb") as f:
            f.seek(block * CHUNK)
            newlines = int(self._before[block]) + f.read(offset - block * CHUNK).count(b"\n")
        return f"{self.path} line {newlines + 1}"


class _Manifest(Source):
    """Rows between consecutive offsets of `self.starts` (the last entry is the end of the data)."""

    starts: np.ndarray

    def __init__(self, path: Path, fields: Sequence[str], rules: MediaRules = DEFAULT_RULES):
        self.path = existing_file(Path(path), f"{self.kind} manifest")
        self.fields = tuple(fields)
        self.rules = rules
        self._file = PreadFile(self.path)
        self._line_of = _LineNumbers(self.path)

    def __len__(self) -> int:
        return len(self.starts) - 1

    def _bytes(self, i: int) -> tuple[bytes, int]:
        start, end = int(self.starts[i]), int(self.starts[i + 1])
        if end - start > self.rules.max_bytes:  # refused from the index, before it is read
            raise BadSample(
                f"{self._where(start)}: a row of {end - start} bytes; data.max_media_bytes allows {self.rules.max_bytes}"
            )
        return self._file.read(start, end - start), start

    def _where(self, offset: int) -> str:
        return self._line_of(offset)

    def _row(self, values: dict, offset: int, fields: Sequence[str] | None) -> Row:
        wanted = self.fields if fields is None else fields
        missing = [f for f in wanted if f not in values]
        if missing:
            raise BadSample(f"{self._where(offset)}: no field {missing[0]!r} (it has {sorted(values)})")
        return Row(
            {f: values[f] for f in wanted}, self.path.parent, functools.partial(self._line_of, offset), self.rules
        )


class JsonlSource(_Manifest):
    """A JSON Lines manifest: one JSON object per line."""

    kind = "jsonl"

    def __init__(self, path: Path, fields: Sequence[str], rules: MediaRules = DEFAULT_RULES):
        super().__init__(path, fields, rules)
        self.starts = _line_starts(self.path)
        if len(self) == 0:
            raise ConfigError(f"{self.path}: the manifest has no rows")

    def read(self, i: int, fields: Sequence[str] | None = None) -> Row:
        data, offset = self._bytes(i)
        try:
            values = json.loads(data)
        except json.JSONDecodeError as e:  # its own line and column would count from this one line
            raise BadSample(f"{self._where(offset)}: malformed JSON line ({e.msg} at column {e.colno})") from None
        except ValueError as e:  # UnicodeDecodeError
            raise BadSample(f"{self._where(offset)}: malformed JSON line ({e})") from None
        if not isinstance(values, dict):
            raise BadSample(f"{self._where(offset)}: expected a JSON object, got {type(values).__name__}")
        return self._row(values, offset, fields)


def _csv_records(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(offset of its first line, fields) of every record; a quoted field may span lines."""
    where = [0, 0]  # offset of the next line, offset where the current record began

    def lines() -> Iterator[str]:
        with path.open("rb") as f:
            for raw in f:
                where[0] += len(raw)
                yield raw.decode("utf-8")

    reader = csv.reader(lines())
    try:
        for record in reader:
            yield where[1], record
            where[1] = where[0]
    except (csv.Error, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} line {reader.line_num}: cannot parse the CSV ({e})") from None


def _csv_index(path: Path) -> dict[str, np.ndarray]:
    starts = [offset for offset, record in _csv_records(path) if any(v.strip() for v in record)]
    return {"starts": np.array([*starts, path.stat().st_size], np.int64)}


class CsvSource(_Manifest):
    """A CSV manifest with a header row naming the fields."""

    kind = "csv"

    def __init__(self, path: Path, fields: Sequence[str], cache: Path, rules: MediaRules = DEFAULT_RULES):
        super().__init__(path, fields, rules)
        index = cached_index(cache, "csv", file_stamp([self.path]), ("starts",), lambda: _csv_index(self.path))
        starts = index["starts"]
        if len(starts) < 2:
            raise ConfigError(f"{self.path}: the CSV has no header row")
        header, _ = self._bytes_at(int(starts[0]), int(starts[1]))
        self.header = next(csv.reader(io.StringIO(header.decode("utf-8-sig"))))  # a spreadsheet's byte-order mark
        self.starts = starts[1:]  # row 0 is the header
        if len(self) == 0:
            raise ConfigError(f"{self.path}: the manifest has a header but no rows")
        missing = [f for f in self.fields if f not in self.header]
        if missing:
            raise ConfigError(f"{self.path}: no column {missing[0]!r} in the header {self.header}")

    def _bytes_at(self, start: int, end: int) -> tuple[bytes, int]:
        return self._file.read(start, end - start), start

    def read(self, i: int, fields: Sequence[str] | None = None) -> Row:
        data, offset = self._bytes(i)
        try:
            record = next(csv.reader(io.StringIO(data.decode("utf-8"))))
        except (csv.Error, UnicodeDecodeError, StopIteration) as e:
            raise BadSample(f"{self._where(offset)}: malformed CSV record ({e})") from None
        if len(record) != len(self.header):
            raise BadSample(f"{self._where(offset)}: {len(record)} fields where the header has {len(self.header)}")
        return self._row(dict(zip(self.header, record)), offset, fields)
