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

from pathways_mm.data.sources.base import DEFAULT_RULES, BadSample, MediaRules, Row, Source
from pathways_mm.data.sources.paths import files_inside
from pathways_mm.errors import ConfigError
from pathways_mm.io import load_json


def _row_where(path: Path, i: int) -> str:
    return f"{path} row {i}"


def _saved_files(path: Path, roots: Sequence[Path]) -> None:
    """Check that every file `load_from_disk` opens under `path` (as its JSON files name them: a
    DatasetDict's split folders, each one's state, info and Arrow files) stays inside `path` or
    `roots`, before any of them is read."""
    what = "Hugging Face dataset file"
    folders = [path]
    index = path / "dataset_dict.json"
    if index.is_file():
        files_inside([index], path, roots, what)
        splits = load_json(index, "Hugging Face dataset_dict.json")
        names = splits.get("splits") if isinstance(splits, dict) else None
        folders = [path / s for s in names if isinstance(s, str)] if isinstance(names, list) else []
    for folder in folders:
        state = folder / "state.json"
        files_inside([folder, state, folder / "dataset_info.json"], path, roots, what)
        if not state.is_file():
            continue  # load_from_disk says what is missing
        record = load_json(state, "Hugging Face state.json")
        data = record.get("_data_files", []) if isinstance(record, dict) else []
        names = [d.get("filename") for d in data if isinstance(d, dict)] if isinstance(data, list) else []
        files_inside([folder / n for n in names if isinstance(n, str)], path, roots, what)


def _open(path: Path, fmt: str, split: str, cache: Path, roots: Sequence[Path]) -> datasets.Dataset:
    datasets.disable_progress_bars()
    try:
        if fmt == "parquet":
            files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
            if not files or not all(f.is_file() for f in files):
                raise ConfigError(f"parquet files not found: {path}")
            if path.is_dir():
                files_inside(files, path, roots, "parquet file")
            return datasets.Dataset.from_parquet([str(f) for f in files], cache_dir=str(cache / "hf"))
        if not path.is_dir():
            raise ConfigError(f"Hugging Face dataset folder not found: {path} (a folder written by save_to_disk)")
        _saved_files(path, roots)
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

    def __init__(
        self, path: Path, fields: Sequence[str], fmt: str, split: str, cache: Path, rules: MediaRules = DEFAULT_RULES
    ):
        self.kind, self.path, self.fields, self.rules = fmt, Path(path), tuple(fields), rules
        ds = _open(self.path, fmt, split, Path(cache), rules.roots)
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
        base = self.path if self.path.is_dir() else self.path.parent
        return Row(out, base, functools.partial(_row_where, self.path, i), self.rules)
