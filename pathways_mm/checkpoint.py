"""Checkpoint integrity without DeepSpeed: checksum manifests, publishing, atomic files.

A checkpoint is published by writing its manifest (sha256 and size of every file) last and
atomically, then the `latest` pointer. A tag dir without a manifest is a save that did not
finish (a killed rank, a pre-empted job) and is never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable

from pathways_mm.errors import ConfigError

META_FILE = "pmm_meta.json"
MANIFEST = "pmm_manifest.json"
LATEST = "latest"
TAG_PREFIX = "step_"


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:07d}"


def list_files(tag_dir: Path) -> list[str]:
    """Every file under `tag_dir` (relative, sorted) except the manifest itself."""
    return sorted(str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def file_entry(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"sha256": digest, "bytes": path.stat().st_size}


def hash_files(tag_dir: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    return {name: file_entry(tag_dir / name) for name in names}


def publish(tag_dir: Path, step: int, files: dict[str, dict[str, Any]]) -> None:
    """Make a fully written checkpoint visible: manifest first, then the run's `latest` pointer."""
    manifest = {"format": 1, "step": step, "files": dict(sorted(files.items()))}
    atomic_write_text(tag_dir / MANIFEST, json.dumps(manifest, indent=1))
    atomic_write_text(tag_dir.parent / LATEST, tag_dir.name)


def unpublish(tag_dir: Path) -> None:
    """Before a tag dir is (re)written: from here until `publish` it is an unfinished save."""
    (tag_dir / MANIFEST).unlink(missing_ok=True)


def read_manifest(tag_dir: Path) -> dict[str, dict[str, Any]]:
    """The manifest's file table; ConfigError naming the manifest if it is not one."""
    path = tag_dir / MANIFEST
    try:
        data = json.loads(path.read_text())
        files = data["files"]
        ok = isinstance(files, dict) and all(
            isinstance(e, dict) and isinstance(e.get("sha256"), str) and isinstance(e.get("bytes"), int)
            for e in files.values()
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: unreadable checkpoint manifest ({type(e).__name__}: {e})") from None
    if not ok or any(Path(n).is_absolute() or ".." in Path(n).parts for n in files):
        raise ConfigError(f"{path}: malformed checkpoint manifest (expected files: {{name: {{sha256, bytes}}}})")
    return files


def problems(tag_dir: Path, names: Iterable[str], files: dict[str, dict[str, Any]]) -> list[str]:
    """What is wrong with the listed files of a published checkpoint (empty: intact)."""
    found = []
    for name in names:
        path, want = tag_dir / name, files[name]
        if not path.is_file():
            found.append(f"{path}: missing")
        elif path.stat().st_size != want["bytes"]:
            found.append(f"{path}: {path.stat().st_size} bytes, the manifest says {want['bytes']} (truncated or altered)")
        elif file_entry(path)["sha256"] != want["sha256"]:
            found.append(f"{path}: checksum differs from the manifest (file altered or corrupted)")
    return found


def tag_dirs(ckpt_dir: Path) -> list[Path]:
    """Checkpoint tag dirs, newest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted((p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX)), reverse=True)


def is_published(tag_dir: Path) -> bool:
    return (tag_dir / MANIFEST).is_file()


def rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj` (a list of one without a process group)."""
    import torch.distributed as dist

    rank, world = rank_world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def prune(ckpt_dir: Path, keep: int) -> None:
    """Drop unfinished saves and all but the newest `keep` published checkpoints."""
    published = 0
    for tag_dir in tag_dirs(ckpt_dir):
        if is_published(tag_dir):
            published += 1
            if keep <= 0 or published <= keep:
                continue
        shutil.rmtree(tag_dir, ignore_errors=True)


def verify(tag_dir: Path) -> list[str]:
    """Problems with a checkpoint's files (empty: intact). Collective when a process group is up:
    each rank hashes a share of the files and all ranks get the same answer."""
    try:
        files = read_manifest(tag_dir)
    except ConfigError as e:
        return [str(e)]
    rank, world = rank_world()
    names = sorted(files)
    return sorted(p for part in gather(problems(tag_dir, names[rank::world], files)) for p in part)


def _is_legacy(tag_dir: Path) -> bool:
    """Saved by a pathways-mm without manifests: only trusted where DeepSpeed's `latest` names it."""
    latest = tag_dir.parent / LATEST
    return (tag_dir / META_FILE).is_file() and latest.is_file() and latest.read_text().strip() == tag_dir.name


def _say(msg: str) -> None:
    if rank_world()[0] == 0:
        print(f"pathways-mm: {msg}", file=sys.stderr)


def newest_intact(ckpt_dir: Path) -> Path | None:
    """The newest published checkpoint whose files match their checksums, saying what it skips.

    None when no checkpoint was ever published; ConfigError when some were but none is intact.
    """
    damaged: list[str] = []
    for tag_dir in tag_dirs(ckpt_dir):
        if not is_published(tag_dir):
            if _is_legacy(tag_dir):
                _say(f"{tag_dir} has no checksum manifest (saved by an older pathways-mm); loading it unverified")
                return tag_dir
            _say(f"skipping {tag_dir}: its save did not finish (no {MANIFEST})")
            continue
        bad = verify(tag_dir)
        if not bad:
            if damaged:
                _say(f"falling back to {tag_dir.name}, the newest intact checkpoint")
            return tag_dir
        _say(f"checkpoint {tag_dir.name} is damaged: {bad[0]}")
        damaged.append(bad[0])
    if damaged:
        raise ConfigError(f"no intact checkpoint in {ckpt_dir}; newest problem: {damaged[0]}")
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run dir, its checkpoints/ dir, or one tag dir -> a verified tag dir holding pmm_meta.json.

    A run or checkpoints dir falls back to the newest intact checkpoint; a named tag dir must be intact.
    """
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"checkpoint not found: {p} (give a run directory such as runs/demo, or one of its checkpoints)")
    if (p / META_FILE).is_file():
        if is_published(p):
            bad = verify(p)
            if bad:
                raise ConfigError(f"{bad[0]}; use an older checkpoint of the run")
        elif not _is_legacy(p):
            raise ConfigError(f"{p}: unfinished checkpoint (no {MANIFEST}: its save was interrupted)")
        return p
    for cand in (p / "checkpoints", p):
        found = newest_intact(cand) if cand.is_dir() else None
        if found is not None:
            return found
    raise ConfigError(f"no pathways-mm checkpoint in {p} (expected {META_FILE} or a 'latest' file under {p}/checkpoints)")


META_TYPES = {"step": int, "config": dict, "task_table": dict, "tokenizer_hash": str}


def read_meta(tag_dir: Path) -> dict[str, Any]:
    """The checkpoint's metadata, checked for the keys and types that loading relies on."""
    path = tag_dir / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable checkpoint metadata ({e})") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"{path}: checkpoint metadata is not a JSON object")
    for key, tp in META_TYPES.items():
        if not isinstance(meta.get(key), tp) or isinstance(meta.get(key), bool):
            raise ConfigError(f"{path}: checkpoint metadata needs '{key}' of type {tp.__name__}, got {meta.get(key)!r:.60}")
    if not isinstance(meta["config"].get("model"), dict):
        raise ConfigError(f"{path}: checkpoint metadata has no config.model section")
    if not all(isinstance(k, str) and type(v) is int for k, v in meta["task_table"].items()):
        raise ConfigError(f"{path}: checkpoint task_table must map task names to integer ids")
    return meta
