"""Atomic files: readers see the old file or the whole new one, never a part.

Every file pathways-mm writes for later reading (checkpoint metadata and manifests, dataset
caches, reports, routes files) goes through `atomic_writer`: write to a temporary file in the
same folder, flush and fsync it, then rename it over the target.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from pathways_mm.errors import ConfigError


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary sibling of `path` for writing; on success it replaces `path`.

    The data is on disk (fsync) before the name points at it; on any error the temporary file
    is removed and `path` is left as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_writer(path) as f:
        f.write(text)


def existing(path: str | os.PathLike, what: str, hint: str, kind: str = "file") -> Path:
    """`path` as a Path if it is an existing file (or, with kind="any", anything); else a
    ConfigError `{what} not found: {path} ({hint})` that tells the user what to give instead."""
    p = Path(path)
    if not (p.is_file() if kind == "file" else p.exists()):
        raise ConfigError(f"{what} not found: {p} ({hint})")
    return p
