"""Hugging Face `datasets` on local disk: a `save_to_disk` folder, or parquet files (converted
once into an Arrow cache under the data root). Nothing is fetched from a hub.

Arrow files are memory-mapped, so the training process holds no index of its own: row i is
read from the map. Image and Audio features are read as their stored file bytes (or path) and
decoded like a manifest's files; a ClassLabel target becomes its label name.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import datasets
from datasets import ClassLabel, DatasetDict

from pathways_mm.data.sources.base import BadSample, Row, Source
from pathways_mm.errors import ConfigError


def _row_where(path: Path, i: int) -> str:
    return f"{path} row {i}"


def _open(path: Path, fmt: str, split: str, cache: Path) -> datasets.Dataset:
    datasets.disable_progress_bars()
    try:
        if fmt == "parquet":
            files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
            if not files or not all(f.is_file() for f in files):
                raise ConfigError(f"parquet files not found: {path}")
            return datasets.Dataset.from_parquet([str(f) for f in files], cache_dir=str(cache / "hf"))
        if not path.is_dir():
            raise ConfigError(f"Hugging Face dataset folder not found: {path} (a folder written by save_to_disk)")
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{path}: cannot open as a Hugging Face dataset ({type(e).__name__}: {e})") from None
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise ConfigError(f"{path}: no split {split!r} in the DatasetDict (it has {list(ds)}); set split:")
        ds = ds[split]
    return ds


class HfSource(Source):
    """One split of a Hugging Face dataset, read row by row from its memory-mapped Arrow files."""

    def __init__(self, path: Path, fields: Sequence[str], fmt: str, split: str, cache: Path):
        self.kind, self.path, self.fields = fmt, Path(path), tuple(fields)
        ds = _open(self.path, fmt, split, Path(cache))
        missing = [f for f in self.fields if f not in ds.column_names]
        if missing:
            raise ConfigError(f"{self.path}: no column {missing[0]!r} (columns: {ds.column_names})")
        self.labels = {f: ds.features[f] for f in self.fields if isinstance(ds.features[f], ClassLabel)}
        self._table = ds.select_columns(list(self.fields)).with_format("arrow")  # raw storage: no decoding
        if len(self) == 0:
            raise ConfigError(f"{self.path}: the dataset has no rows")

    def __len__(self) -> int:
        return len(self._table)

    def read(self, i: int, fields: Sequence[str] | None = None) -> Row:
        try:
            values = self._table[int(i)].to_pylist()[0]
        except Exception as e:  # a damaged Arrow file surfaces as any of pyarrow's errors
            raise BadSample(f"{self.path} row {i}: unreadable ({type(e).__name__}: {e})") from None
        wanted = self.fields if fields is None else fields
        out = {}
        for f in wanted:
            v = values[f]
            out[f] = self.labels[f].int2str(v) if f in self.labels and isinstance(v, int) and v >= 0 else v
        return Row(
            out, self.path if self.path.is_dir() else self.path.parent, functools.partial(_row_where, self.path, i)
        )
