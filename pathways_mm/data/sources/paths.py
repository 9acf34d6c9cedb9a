"""The one rule for paths that data names: a media path in a manifest row, CSV cell, Hugging Face
or parquet column, and the files a shard pattern, a parquet folder or a `save_to_disk` folder
lead to, must resolve (symlinks followed) inside the data's own folder or a folder the user lists
in `data.media_roots`. A dataset from a stranger could otherwise make training read any file the
user can read. The check resolves names only (no byte of the file is read), and what is read
afterwards is the resolved path.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from pathways_mm.data.sources.base import BadSample, Row
from pathways_mm.errors import ConfigError, shorten


@functools.lru_cache(maxsize=256)
def _real_folder(folder: str) -> str:
    return os.path.realpath(folder)  # once per folder: rows of one manifest share it


def _within(real: str, folder: str) -> bool:
    return real == folder or real.startswith(folder.rstrip(os.sep) + os.sep)


def _resolve(folder: Path, name: str) -> str:
    """`name` (relative to `folder`, or absolute) with every symlink followed; ValueError for a
    name no file can have (a NUL byte)."""
    return os.path.realpath(os.path.join(folder, name))


def allowed(real: str, folder: Path, roots: Iterable[Path]) -> bool:
    """Whether the resolved path `real` lies inside `folder` or one of `roots` (each resolved too)."""
    return any(_within(real, _real_folder(str(f))) for f in (folder, *roots))


def _where_allowed(folder: Path, roots: Sequence[Path]) -> str:
    also = f" or data.media_roots {[str(r) for r in roots]}" if roots else ""
    return f"the data folder {folder}{also}"


def media_path(row: Row, value: str, what: str) -> Path:
    """The file a row's media field names, resolved; BadSample, naming the row, unless it lies
    inside the row's folder or `data.media_roots`."""
    try:
        real = _resolve(row.base, value)
    except (ValueError, OSError) as e:  # a NUL byte; a name too long for the file system
        raise BadSample(f"{row.where}: {what} path {shorten(value)} is not a file name ({e})") from None
    if not allowed(real, row.base, row.rules.roots):
        raise BadSample(
            f"{row.where}: {what} path {shorten(value)} leads outside {_where_allowed(row.base, row.rules.roots)} "
            "(to read media elsewhere, list its folder in data.media_roots)"
        )
    return Path(real)


def files_inside(paths: Iterable[Path], folder: Path, roots: Sequence[Path], what: str) -> list[Path]:
    """`paths` (shards, parquet files), each checked to resolve inside `folder` or `roots`;
    ConfigError naming the first that does not."""
    out = []
    for p in paths:
        if not allowed(_resolve(folder, str(p)), folder, roots):
            raise ConfigError(
                f"{what} {p} leads outside {_where_allowed(folder, roots)} (a symlink or '..'); "
                "to read files elsewhere, list their folder in data.media_roots"
            )
        out.append(p)
    return out


def pattern_folder(pattern: str) -> Path:
    """The folder a shard pattern's files must stay in: where its text before any brace ends."""
    head = pattern.split("{", 1)[0]
    return Path(head) if head.endswith(os.sep) else Path(head).parent
