"""What every data source shares: the row it hands out, the error a bad row raises, and the
on-disk cache of an index that is slow to build.

A source is one split of a declared task. It holds an index in memory (numpy arrays of a few
bytes per row: file offsets, shard numbers), never the samples; `source[i]` reads row i from
disk when it is asked for, in whichever process asks (DataLoader workers included: reads use
`os.pread`, which shares no file position between processes).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pathways_mm.config import ExperimentConfig
from pathways_mm.errors import ConfigError
from pathways_mm.tasks.digits import cached_bank

INDEX_VERSION = 1


class BadSample(ConfigError):
    """One row cannot be used (a malformed line, a missing file or member, undecodable media);
    the message names the file and the line or key."""


@dataclass(frozen=True)
class MediaRules:
    """Where a row's media files may be and how large its media may be (docs/failure.md)."""

    roots: tuple[Path, ...]  # folders allowed besides the row's own (data.media_roots)
    max_bytes: int  # a media file, shard member or manifest row; a clip's decoded samples
    max_image_pixels: int
    max_audio_seconds: float
    max_audio_channels: int

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> MediaRules:
        d = cfg.data
        return cls(
            roots=tuple(Path(r).expanduser() for r in d.media_roots),
            max_bytes=d.max_media_bytes,
            max_image_pixels=d.max_image_pixels,
            max_audio_seconds=cfg.model.audio.max_seconds,
            max_audio_channels=d.max_audio_channels,
        )


DEFAULT_RULES = MediaRules.from_config(ExperimentConfig())


@dataclass(frozen=True)
class Row:
    """One row of a source: field -> value (text, a path relative to `base`, or file bytes)."""

    fields: dict[str, Any]
    base: Path  # what relative media paths are relative to, and the folder they must stay in
    locate: Callable[[], str]  # where the row is, for messages: computed only when one is needed
    rules: MediaRules = DEFAULT_RULES

    @property
    def where(self) -> str:
        """Where the row is: "/data/train.jsonl line 12", "/data/shard-000.tar key 00042", ..."""
        return self.locate()

    def __str__(self) -> str:  # how error messages name a sample
        return self.where


class Source(Sequence):
    """One split read on demand; subclasses set `kind`, `path`, `fields`, `rules` and implement `read`."""

    kind: str
    path: Path
    fields: tuple[str, ...]  # the fields the task reads (columns, keys, extensions)
    rules: MediaRules = DEFAULT_RULES

    def read(self, i: int, fields: Sequence[str] | None = None) -> Row:
        """Row i with `fields` (default: all the task reads); BadSample if it cannot be read."""
        raise NotImplementedError

    def __getitem__(self, i):
        if isinstance(i, slice):
            return _Slice(self, range(len(self))[i])
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} of a source with {len(self)} rows")
        return self.read(i % len(self))

    def describe(self) -> str:
        return f"{self.kind} {self.path}"

    def index_bytes(self) -> int:
        """Bytes of the in-memory index (numpy arrays)."""
        return sum(v.nbytes for v in vars(self).values() if isinstance(v, np.ndarray))


class _Slice(Sequence):
    """Rows `rows` of a source, still read on demand (evaluation's first N samples)."""

    def __init__(self, source: Source, rows: range):
        self.source, self.rows = source, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return _Slice(self.source, self.rows[i])
        return self.source.read(self.rows[i])

    def read(self, i: int, fields: Sequence[str] | None = None) -> Row:
        return self.source.read(self.rows[i], fields)


class PreadFile:
    """A file read with `os.pread`: safe to share with forked worker processes (no shared
    position); reopened after a fork or unpickling."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None
        self._pid = -1

    def read(self, offset: int, size: int) -> bytes:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return os.pread(self._fd, size, offset)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_fd": None, "_pid": -1}


def file_stamp(paths: Iterable[Path]) -> str:
    """Identity of files as they are now (path, size, modification time): a changed file gets a new index."""
    h = hashlib.sha256(str(INDEX_VERSION).encode())
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def cached_index(
    root: Path, kind: str, stamp: str, keys: tuple[str, ...], build: Callable[[], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """An index built once per file state into `root`/index (slow to build: CSV, tar shards)."""
    return cached_bank(Path(root) / "index" / f"{kind}-{stamp}.npz", keys, build)


def existing_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path} (check the path in the experiment's declare: section)")
    return path
