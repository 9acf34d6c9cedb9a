"""Task datasets on disk: each split built once into the data root, then read back.

A split is a JSONL file of small JSON samples (media tasks point into their own banks under
the same root), or, for a task declared in a config, its source (`data/sources/`): an index
whose rows are read when asked for. `encode` turns a sample into the `MultimodalExample` the
model reads.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pathways_mm.errors import ConfigError
from pathways_mm.io import atomic_writer
from pathways_mm.tasks.base import MultimodalExample, Task


def split_path(task: Task, split: str, root: Path, seed: int) -> Path:
    version = getattr(task, "data_version", 1)
    return Path(root) / task.name / f"{split}-seed{seed}-v{version}.jsonl"


def load_split(task: Task, split: str, root: Path, seed: int) -> Sequence[Any]:
    """Samples of one split, built once into `root` (atomically) and read back afterwards; a
    declared task's split is its source (an index; rows are read when asked for)."""
    if split not in task.splits:
        raise ConfigError(f"task '{task.name}' has no split '{split}'; it has {list(task.splits)}")
    task.bind(Path(root), seed)
    open_split = getattr(task, "open_split", None)
    if open_split is not None:  # a declared task: its rows stay on disk, read on demand
        return open_split(split, Path(root))
    path = split_path(task, split, root, seed)
    if path.is_file():
        return _read_cache(path)
    samples = list(task.build_dataset(split, Path(root), seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path) as f:  # a half-written split is never read
        for sample in samples:
            f.write(json.dumps(sample, sort_keys=True) + "\n")
    return samples


def _read_cache(path: Path) -> list[Any]:
    try:
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f]
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError: damaged after it was written
        raise ConfigError(f"{path}: damaged dataset cache ({type(e).__name__}); delete it and it is rebuilt") from None


def encode(task: Task, sample: Any) -> MultimodalExample:
    """`task.encode(sample)`, with a malformed sample reported as a ConfigError naming the task."""
    try:
        ex = task.encode(sample)
    except ConfigError:  # a bad sample (BadSample) names its file already
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise ConfigError(
            f"task '{task.name}': cannot encode sample {str(sample)[:80]!r} ({type(e).__name__}: {e}); "
            f"if it came from the dataset cache under {task.name}/, delete that file to rebuild it"
        ) from None
    _check_example(ex, task.name)
    return ex


def _check_example(ex: Any, where: str) -> None:
    ok = (
        isinstance(ex, MultimodalExample)
        and isinstance(ex.target_text, str)
        and isinstance(ex.segments, (tuple, list))
        and all(isinstance(seg, (tuple, list)) and len(seg) == 2 and isinstance(seg[0], str) for seg in ex.segments)
    )
    if not ok:
        raise ConfigError(
            f"task '{where}': encode must return MultimodalExample(segments=((modality, raw), ...), target_text=str), "
            f"got {str(ex)[:120]}"
        )
