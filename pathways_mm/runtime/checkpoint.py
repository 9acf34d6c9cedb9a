"""Checkpoints: DeepSpeed's files plus our metadata, checksum manifests, publishing, loading.

A checkpoint is published by writing its manifest (sha256 and size of every file) last and
atomically, then the `latest` pointer. A tag dir without a manifest is never loaded: it is a
save that did not finish (a killed rank, a pre-empted job), or one whose files nothing can
verify. Every file is read with `torch.load(weights_only=True)`, and a checkpoint's config
never names the plugins to import or the paths of this machine (`config.USER_ONLY_KEYS`): a
checkpoint never decides what code runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from pathways_mm import dist
from pathways_mm.config import (
    ExperimentConfig,
    config_from_dict,
    from_checkpoint,
    merge_dicts,
    model_differences,
    to_dict,
)
from pathways_mm.encoders.text import TextTokenizer
from pathways_mm.errors import ConfigError, TrainingAborted, clip, shorten
from pathways_mm.io import atomic_write_text, describe_os_error, existing, load_json
from pathways_mm.runtime import compat, faults
from pathways_mm.tasks import Task, get_task

META_FILE = "pmm_meta.json"
MANIFEST = "pmm_manifest.json"
LATEST = "latest"
TAG_PREFIX = "step_"


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


def read_manifest(tag_dir: Path) -> dict[str, dict[str, Any]]:
    """The manifest's file table; ConfigError naming the manifest if it is not one."""
    path = tag_dir / MANIFEST
    data = load_json(path, "checkpoint manifest")
    files = data.get("files") if isinstance(data, dict) else None
    ok = isinstance(files, dict) and all(
        isinstance(e, dict) and isinstance(e.get("sha256"), str) and type(e.get("bytes")) is int for e in files.values()
    )
    if not ok or any(Path(n).is_absolute() or ".." in Path(n).parts or not n for n in files):
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
            found.append(
                f"{path}: {path.stat().st_size} bytes, the manifest says {want['bytes']} (truncated or altered)"
            )
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
    rank, world = dist.rank_world()
    names = sorted(files)
    return sorted(p for part in dist.gather(problems(tag_dir, names[rank::world], files)) for p in part)


def _say(msg: str) -> None:
    if dist.rank_world()[0] == 0:
        print(f"pathways-mm: {msg}", file=sys.stderr)


def newest_intact(ckpt_dir: Path) -> Path | None:
    """The newest published checkpoint whose files match their checksums, saying what it skips.

    None when no checkpoint was ever published; ConfigError when some were but none is intact.
    """
    damaged: list[str] = []
    for tag_dir in tag_dirs(ckpt_dir):
        if not is_published(tag_dir):
            _say(f"skipping {tag_dir}: its save did not finish (no {MANIFEST}), so nothing can verify it")
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
    p = existing(path, "checkpoint", "give a run directory such as runs/demo, or one of its checkpoints", kind="any")
    if (p / META_FILE).is_file():
        if not is_published(p):
            raise ConfigError(
                f"{p}: unfinished checkpoint (no {MANIFEST}: its save was interrupted, or nothing recorded "
                "its checksums); unverified weights are never loaded: use another checkpoint of the run"
            )
        bad = verify(p)
        if bad:
            raise ConfigError(f"{bad[0]}; use an older checkpoint of the run")
        return p
    for cand in (p / "checkpoints", p):
        found = newest_intact(cand) if cand.is_dir() else None
        if found is not None:
            return found
    raise ConfigError(
        f"no pathways-mm checkpoint in {p} (expected {META_FILE} or a 'latest' file under {p}/checkpoints)"
    )


META_TYPES = {"step": int, "config": dict, "task_table": dict, "tokenizer_hash": str}


def read_meta(tag_dir: Path) -> dict[str, Any]:
    """The checkpoint's metadata, checked for the keys and types that loading relies on."""
    path = tag_dir / META_FILE
    meta = load_json(path, "checkpoint metadata")
    if not isinstance(meta, dict):
        raise ConfigError(f"{path}: checkpoint metadata is not a JSON object")
    for key, tp in META_TYPES.items():
        if not isinstance(meta.get(key), tp) or isinstance(meta.get(key), bool):
            raise ConfigError(
                f"{path}: checkpoint metadata needs '{key}' of type {tp.__name__}, got {shorten(meta.get(key))}"
            )
    if not isinstance(meta["config"].get("model"), dict):
        raise ConfigError(f"{path}: checkpoint metadata has no config.model section")
    if not all(isinstance(k, str) and type(v) is int for k, v in meta["task_table"].items()):
        raise ConfigError(f"{path}: checkpoint task_table must map task names to integer ids")
    return meta


def checkpoint_meta(cfg: ExperimentConfig, table: dict[str, int], tok: TextTokenizer, step: int) -> dict[str, Any]:
    """What a checkpoint records beside DeepSpeed's files (pmm_meta.json)."""
    return {
        "format": 1,
        "step": step,
        "config": to_dict(cfg),
        "task_table": table,
        # per task: the experts it owns (add-task's grown ones) and whether it is frozen; the
        # priors and allowed-expert masks themselves are weights (router.pathway / .allowed)
        "pathways": {
            name: {"id": i, "owns_experts": [], "frozen": False, "added_by": "train"} for name, i in table.items()
        },
        "tokenizer_hash": tok.hash,
        "vocab_size": tok.vocab_size,
    }


def check_compatible(
    meta: dict[str, Any], cfg: ExperimentConfig, tok: TextTokenizer, where: str = "checkpoint"
) -> None:
    """A checkpoint must match the model, the task table and the tokenizer of this run.

    The model rule is `config.model_differences` (ep_size may differ: `runtime.reshard` moves the
    optimizer state, or refuses). `where` (the metadata file) starts every error message.
    """
    if meta.get("tokenizer_hash") != tok.hash:
        raise ConfigError(
            f"{where}: checkpoint tokenizer {meta.get('tokenizer_hash')!r} differs from this install's {tok.hash}; "
            "evaluate or resume with the tokenizer it was trained with"
        )
    diff = model_differences(meta["config"]["model"], cfg.model)
    if diff:
        raise ConfigError(f"{where}: checkpoint model differs from the config in {', '.join(diff)}")
    table = {name: i for i, name in enumerate(cfg.tasks)}
    if meta["task_table"] != table:
        raise ConfigError(f"{where}: checkpoint task table {meta['task_table']} differs from the config's {table}")


class Opened(NamedTuple):
    """A verified checkpoint, its metadata, and the config it was trained with (user overrides applied)."""

    tag_dir: Path
    meta: dict[str, Any]
    cfg: ExperimentConfig


def open_checkpoint(path: str | os.PathLike, tok: TextTokenizer, overrides: dict[str, Any] | None = None) -> Opened:
    """Resolve `path` (run dir, checkpoints/ or a tag dir), verify it, read its metadata and build
    its config: the stored one without the keys only the user sets (`config.USER_ONLY_KEYS`:
    plugins, data root, DeepSpeed JSON), with `overrides` (the user's --set values, nested) on top.

    The config must still describe the stored model (`check_compatible`); the task table and
    tokenizer must match. Every command that loads a trained model starts here.
    """
    tag_dir = resolve_checkpoint(path)
    meta = read_meta(tag_dir)
    try:
        cfg = config_from_dict(merge_dicts(from_checkpoint(meta["config"]), overrides or {}))
    except ConfigError as e:
        raise ConfigError(f"{tag_dir}: checkpoint config is not valid here: {e}") from None
    check_compatible(meta, cfg, tok, where=str(tag_dir / META_FILE))
    return Opened(tag_dir, meta, cfg)


def checkpoint_tasks(opened: Opened, names: list[str] | None = None) -> list[Task]:
    """The checkpoint's tasks in task-table order (or those `names`). A task no imported module
    registers names the plugin modules the checkpoint's config lists, which are imported only
    when the user names them."""
    tag_dir, meta, cfg = opened
    table = meta["task_table"]
    names = sorted(table, key=table.get) if names is None else names
    stored = meta["config"].get("plugins")
    hint = [m for m in stored if isinstance(m, str) and m not in cfg.plugins] if isinstance(stored, list) else []
    tasks = []
    for name in names:
        try:
            tasks.append(get_task(name))
        except ConfigError as e:
            if not hint:
                raise
            plugins = clip(",".join(hint), 120)
            raise ConfigError(
                f"task {shorten(name)} of {tag_dir} is not registered; the checkpoint was trained with plugins "
                f"[{plugins}], which are imported only when you name them: add --set plugins=[{plugins}] "
                f"(or list them under plugins: in your --config)"
            ) from e
    return tasks


def save_checkpoint(engine, ckpt_dir: Path, step: int, meta: dict[str, Any], keep: int) -> Path:
    """Write, verify, then publish: DeepSpeed's files and our metadata, then a checksum manifest.

    Until the manifest is written (last, atomically, after every rank finished writing), the
    tag dir is an unfinished save that resume and eval skip; a rank killed mid-save loses
    nothing but this checkpoint.
    """
    rank, world = dist.rank_world()
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if rank == 0 and tag_dir.exists():  # an unfinished save of this step, or a re-save
        latest = ckpt_dir / LATEST
        if latest.is_file() and latest.read_text().strip() == tag:
            latest.unlink()
        shutil.rmtree(tag_dir)
    dist.barrier()
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"pmm_meta": meta, "step": step}, save_latest=False)
        if rank == 0:
            atomic_write_text(
                tag_dir / META_FILE, json.dumps(meta, indent=2)
            )  # key order kept: a declared task's inputs are ordered
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        raise _write_failed(tag_dir, e) from e
    faults.maybe_die("kill_during_save", step, rank)
    dist.barrier()  # every rank's files are complete
    names = list_files(tag_dir)
    files = {k: v for part in dist.gather(hash_files(tag_dir, names[rank::world])) for k, v in part.items()}
    if rank == 0:
        try:
            publish(tag_dir, step, files)
        except OSError as e:
            raise _write_failed(tag_dir, e) from e
        prune(ckpt_dir, keep)
    dist.barrier()
    return tag_dir


def _write_failed(tag_dir: Path, e: BaseException) -> TrainingAborted:
    """A checkpoint that could not be written (disk full, permissions): one line, and the unfinished
    tag dir removed so it frees the space it took; older checkpoints are untouched."""
    if dist.rank_world()[0] == 0:
        shutil.rmtree(tag_dir, ignore_errors=True)
    reason = (
        describe_os_error(e)
        if isinstance(e, OSError)
        else clip(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    )
    free = shutil.disk_usage(tag_dir.parent).free if tag_dir.parent.is_dir() else None
    room = f"; {free / 2**20:.0f} MiB free there" if free is not None else ""
    return TrainingAborted(
        f"could not write checkpoint {tag_dir} ({reason}){room}; free space (or fix permissions), then continue "
        "from the last complete checkpoint with --resume"
    )


def _refusal(e: Exception) -> str:
    """Why torch refused a file, without its advice to retry with weights_only=False: that would run
    whatever code the file holds."""
    text = str(e)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return f"it holds pickled code or objects ({found.group(1)}), not only tensors"
    if "Weights only load failed" in text:
        return "it holds pickled objects other than tensors and plain containers"
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return f"{type(e).__name__}: {clip(first)}"


def weights_only_load(path: str, map_location=None):
    """Load tensors and plain containers only; a file that holds code is refused (ConfigError).

    DeepSpeed 0.19.8 calls torch.load(weights_only=False), which runs any callable pickled
    into a file; a checkpoint from someone else must not be able to run code here.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # UnpicklingError for code, RuntimeError/EOFError for a damaged zip
        raise ConfigError(f"{path}: refused to load ({_refusal(e)})") from None


def load_checkpoint(engine, tag_dir: Path, with_optimizer: bool = True, with_moments: bool = True) -> None:
    """Load one tag dir into the engine (module, and optimizer/scheduler/step counters when resuming).

    with_moments=False: the optimizer's own state is left for the caller (`runtime.reshard`).
    """
    compat.use_checkpoint_loader(engine, weights_only_load)
    try:
        load_path, _ = engine.load_checkpoint(
            str(tag_dir.parent),
            tag=tag_dir.name,
            load_optimizer_states=with_optimizer and with_moments,
            load_lr_scheduler_states=with_optimizer,
            load_module_only=not with_optimizer,
        )
    except (RuntimeError, KeyError) as e:  # a state dict that does not fit this model
        raise ConfigError(f"{tag_dir}: does not fit this model ({str(e).strip().splitlines()[0]:.300})") from None
    if load_path is None:
        raise ConfigError(f"DeepSpeed could not load the checkpoint in {tag_dir}")


def load_full_state(tag_dir: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's model weights as one state dict with global expert ids, on the CPU.

    DeepSpeed writes the non-expert weights to mp_rank_00_model_states.pt and each global
    expert to its own file, so this is the state of a one-process model (ep_size 1) whatever
    ep_size the checkpoint was saved at. Model-parallel checkpoints are not supported.
    """
    main = tag_dir / "mp_rank_00_model_states.pt"
    if not main.is_file():
        raise ConfigError(f"{tag_dir}: no mp_rank_00_model_states.pt; not a pathways-mm checkpoint")
    loaded = weights_only_load(str(main), map_location="cpu")
    state = loaded.get("module") if isinstance(loaded, dict) else None
    if not isinstance(state, dict):
        raise ConfigError(f"{main}: holds no model weights ('module')")
    state = dict(state)
    for path in sorted(tag_dir.glob("layer_*_expert_*_mp_rank_00_model_states.pt")):
        expert = weights_only_load(str(path), map_location="cpu")
        if not isinstance(expert, dict):
            raise ConfigError(f"{path}: not an expert state dict")
        state.update(expert)
    return state


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], tag_dir: Path) -> None:
    """`model.load_state_dict(state)`, a mismatch reported as a ConfigError naming the checkpoint."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise ConfigError(f"{tag_dir}: weights do not fit the model its metadata describes ({detail:.200})") from None
