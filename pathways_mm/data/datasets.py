"""Task datasets on disk: each split built once into the data root, then read back.

A split is a JSONL file of small JSON samples (media tasks point into their own banks under
the same root), or, for a task declared in a config, its source (`data/sources/`): an index
whose rows are read when asked for. `encode` turns a sample into the `MultimodalExample` the
model reads. Beside each built split, a small record (`*.jsonl.check`) holds its sample count,
size and sha256, written after the split: every read verifies them, so a cut or altered cache is
an error naming the file, never a task that silently shrank. The split itself is byte-identical
on every build.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pathways_mm.errors import ConfigError, clip, shorten
from pathways_mm.io import atomic_write_text, atomic_writer, load_json, output_dir
from pathways_mm.tasks.base import MultimodalExample, Task

RECORD_SUFFIX = ".check"


def split_path(task: Task, split: str, root: Path, seed: int) -> Path:
    version = getattr(task, "data_version", 1)
    return Path(root) / task.name / f"{split}-seed{seed}-v{version}.jsonl"


def record_path(path: Path) -> Path:
    """Where the sample count and checksum of the split cache `path` are kept."""
    return path.with_name(path.name + RECORD_SUFFIX)


def load_split(task: Task, split: str, root: Path, seed: int) -> Sequence[Any]:
    """Samples of one split, built once into `root` (atomically, with its record) and verified
    against that record on every read afterwards; a declared task's split is its source (an
    index; rows are read when asked for)."""
    if split not in task.splits:
        raise ConfigError(f"task '{task.name}' has no split '{split}'; it has {list(task.splits)}")
    task.bind(Path(root), seed)
    open_split = getattr(task, "open_split", None)
    if open_split is not None:  # a declared task: its rows stay on disk, read on demand
        return open_split(split, Path(root))
    path = split_path(task, split, root, seed)
    legacy = path.is_file()  # a cache without a record: an older pathways-mm wrote it, or its record was deleted
    if legacy and record_path(path).is_file():
        return _read_cache(path)
    if not legacy:
        output_dir(path.parent, f"the data root (PMM_DATA or data.root) for the '{task.name}' cache")
    samples, data = _build(task, split, root, seed)
    if legacy and path.read_bytes() != data:  # adopted only if it is whole
        raise ConfigError(
            f"{path}: dataset cache without a checksum record differs from a fresh build (cut, altered or "
            "stale); delete it and it is rebuilt"
        )
    if not legacy:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_writer(path, "wb") as f:  # a half-written split is never read
            f.write(data)
    try:
        atomic_write_text(record_path(path), json.dumps(_record(data, len(samples)), indent=1))
    except OSError:  # a read-only data root may hold an older pathways-mm's caches, checked just above
        if not legacy:
            raise
    return samples


def _record(data: bytes, num_samples: int) -> dict[str, Any]:
    return {"format": 1, "samples": num_samples, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _plugin_error(e: Exception) -> str:
    """A task's own exception as a few words of one line ("RuntimeError: boom")."""
    try:
        text = " ".join(str(e).split())
    except Exception:  # an exception whose __str__ raises too
        text = ""
    return f"{type(e).__name__}: {clip(text, 120)}" if text else type(e).__name__


def _tracebacks() -> bool:
    """PMM_TRACEBACK=1: a task's own exception propagates as it is, with its traceback."""
    return bool(os.environ.get("PMM_TRACEBACK"))


def _build_samples(task: Task, split: str, root: Path, seed: int) -> list[Any]:
    """`task.build_dataset(...)` as a list; an exception of the task's code is one line naming the
    task, the split and how many samples came before it."""
    samples: list[Any] = []
    try:
        for sample in task.build_dataset(split, Path(root), seed):
            samples.append(sample)
    except ConfigError:
        raise
    except Exception as e:
        if _tracebacks():
            raise
        raise ConfigError(
            f"task '{task.name}': build_dataset('{split}') failed at {split}[{len(samples)}] ({_plugin_error(e)}); "
            "PMM_TRACEBACK=1 shows where"
        ) from None
    return samples


def _build(task: Task, split: str, root: Path, seed: int) -> tuple[list[Any], bytes]:
    """The split's samples and their cache bytes; a sample that is not JSON names the task and
    sample (it would otherwise fail mid-run, far from its cause)."""
    samples = _build_samples(task, split, root, seed)
    lines = []
    for i, sample in enumerate(samples):
        try:
            json.dumps(sample, ensure_ascii=False).encode("utf-8")  # lone surrogates, bytes, NaN...
            lines.append(json.dumps(sample, sort_keys=True, allow_nan=False) + "\n")
        except (TypeError, ValueError) as e:  # UnicodeEncodeError is a ValueError
            raise ConfigError(
                f"task '{task.name}': build_dataset's {split}[{i}] is not a JSON sample "
                f"({type(e).__name__}: {clip(str(e), 120)}): {shorten(sample)}; return dicts of str, numbers, lists"
            ) from None
    return samples, "".join(lines).encode("ascii")


def _read_cache(path: Path) -> list[Any]:
    """The samples of a split cache, verified against its record."""
    record = load_json(record_path(path), "dataset cache record")
    data = path.read_bytes()
    ok = (
        isinstance(record, dict)
        and record.get("bytes") == len(data)
        and record.get("sha256") == hashlib.sha256(data).hexdigest()
    )
    if not ok:
        want, lines = record.get("samples") if isinstance(record, dict) else None, data.count(b"\n")
        raise ConfigError(
            f"{path}: dataset cache is cut or altered ({len(data)} bytes, {lines} samples; its record says "
            f"{shorten(want)} samples); delete it and it is rebuilt"
        )
    try:
        samples = [json.loads(line) for line in data.decode("utf-8").splitlines()]
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError: written wrong, and recorded so
        raise ConfigError(f"{path}: damaged dataset cache ({type(e).__name__}); delete it and it is rebuilt") from None
    if len(samples) != record.get("samples"):
        raise ConfigError(
            f"{path}: {len(samples)} samples, its record says {shorten(record.get('samples'))}; delete it"
        )
    return samples


def encode(task: Task, sample: Any, where: str | None = None) -> MultimodalExample:
    """`task.encode(sample)`; a malformed sample, or any exception of the task's code, is a
    ConfigError of one line naming the task and `where` (the split and index: "train[17]")."""
    try:
        ex = task.encode(sample)
    except ConfigError:  # a bad sample (BadSample) names its file already
        raise
    except Exception as e:
        if _tracebacks():
            raise
        at = f", {where}" if where else ""
        raise ConfigError(
            f"task '{task.name}'{at}: cannot encode sample {shorten(sample)} ({_plugin_error(e)}; PMM_TRACEBACK=1 "
            f"shows where); if it came from the dataset cache under {task.name}/, delete that file to rebuild it"
        ) from None
    _check_example(ex, task.name, where)
    return ex


def _check_example(ex: Any, name: str, where: str | None) -> None:
    ok = (
        isinstance(ex, MultimodalExample)
        and isinstance(ex.target_text, str)
        and isinstance(ex.segments, (tuple, list))
        and all(isinstance(seg, (tuple, list)) and len(seg) == 2 and isinstance(seg[0], str) for seg in ex.segments)
    )
    if not ok:
        at = f", {where}" if where else ""
        raise ConfigError(
            f"task '{name}'{at}: encode must return MultimodalExample(segments=((modality, raw), ...), target_text=str), "
            f"got {shorten(ex)}"
        )
