"""Data sources of declared tasks: manifests, WebDataset shards, Hugging Face datasets on disk.

The shard and Hugging Face sources are imported when a task uses one: `webdataset` and
`datasets` (with pyarrow) are only needed then, and a machine that trains the built-in tasks
(an offline GPU machine with PyTorch's usual packages) need not have them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pathways_mm.config import SourceConfig
from pathways_mm.data.sources.base import DEFAULT_RULES, BadSample, MediaRules, Row, Source
from pathways_mm.data.sources.manifest import CsvSource, JsonlSource
from pathways_mm.errors import ConfigError

__all__ = ["BadSample", "MediaRules", "Row", "Source", "open_source", "source_format"]


def source_format(src: SourceConfig) -> str:
    """The source's format: as given, else from the path (suffix, or what a folder holds)."""
    if src.format:
        return src.format
    path = Path(src.path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    if suffix == ".tar":
        return "webdataset"
    if suffix == ".parquet" or (path.is_dir() and any(path.glob("*.parquet"))):
        return "parquet"
    if path.is_dir() and any((path / f).is_file() for f in ("state.json", "dataset_dict.json")):
        return "hf"
    raise ConfigError(
        f"{src.path}: cannot tell the format from the path; set format: to one of jsonl, csv, webdataset, hf, parquet"
    )


def open_source(
    src: SourceConfig, fields: Sequence[str], split: str, cache: Path, rules: MediaRules = DEFAULT_RULES
) -> Source:
    """One split's source, its index built (or read from `cache`, the data root); its rows'
    media follow `rules` (where files may be, how large media may be)."""
    fmt = source_format(src)
    path = Path(src.path)
    if fmt == "jsonl":
        return JsonlSource(path, fields, rules)
    if fmt == "csv":
        return CsvSource(path, fields, cache, rules)
    if fmt == "webdataset":
        from pathways_mm.data.sources.shards import ShardSource  # needs webdataset

        return ShardSource(src.path, fields, cache, rules)
    from pathways_mm.data.sources.hf import HfSource  # needs datasets

    return HfSource(path, fields, fmt, src.split or split, cache, rules)
