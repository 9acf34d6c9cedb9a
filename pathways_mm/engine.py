"""Everything DeepSpeed: process set-up, the engine, optimizer groups, checkpoints.

Model code never imports this module; training and evaluation call it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import torch

from pathways_mm.config import ExperimentConfig, resolve_relative
from pathways_mm.errors import ConfigError

META_FILE = "pmm_meta.json"
TAG_PREFIX = "step_"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_single_process_env() -> None:
    """One process without a launcher: the env DeepSpeed's init expects (else it looks for MPI)."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def pin_accelerator() -> None:
    """Name DeepSpeed's accelerator before it is imported.

    Left to detect it, DeepSpeed builds its shared-memory op with other flags than when
    DS_ACCELERATOR=cpu is set, and the two builds evict each other from the one extension
    cache: every switch costs a 30-50 s recompile.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def init_distributed(threads: int = 0) -> tuple[int, int]:
    """Start torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU); returns (rank, world)."""
    pin_accelerator()
    import deepspeed
    import torch.distributed as dist

    if "RANK" not in os.environ:
        setup_single_process_env()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if not torch.cuda.is_available():
        # Processes on one CPU share its cores: oversubscription makes each one many times slower.
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local_world))
    elif threads:
        torch.set_num_threads(threads)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
        _unlink_shm_buffer()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def _unlink_shm_buffer() -> None:
    """Remove this rank's name of DeepSpeed's CPU all-reduce buffer (69 MB in /dev/shm).

    DeepSpeed never unlinks it, so every CPU run left one per rank behind until /dev/shm filled
    memory. Once every rank has mapped every peer's buffer (DeepSpeed opens them all during
    init, before the barrier returns), the name is no longer needed: the mappings live on and the
    memory goes back when the last process exits, even if it is killed.
    """
    import torch.distributed as dist

    if torch.cuda.is_available() or not Path("/dev/shm").is_dir():
        return
    dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    Path("/dev/shm", name).unlink(missing_ok=True)


def shutdown() -> None:
    """Leave the process group together: a rank that exits while a peer still talks to it can
    abort in the communication threads' destructors ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _fill(node: dict[str, Any], key: str, value: Any, where: str) -> None:
    if node.get(key, "auto") == "auto":
        node[key] = value
    elif node[key] != value:
        raise ConfigError(
            f"{where}.{key} is {node[key]!r} but the experiment config says {value!r}; set it to \"auto\" in the DeepSpeed JSON"
        )


def deepspeed_config(cfg: ExperimentConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON named by `train.ds_config`, with "auto" values filled from `cfg`."""
    path = resolve_relative(cfg, cfg.train.ds_config)
    if not path.is_file():
        raise ConfigError(f"train.ds_config: DeepSpeed config not found: {path}")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    _fill(ds, "train_micro_batch_size_per_gpu", cfg.train.micro_batch_size, path.name)
    _fill(ds, "gradient_accumulation_steps", cfg.train.grad_accum, path.name)
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and the world size
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = opt.setdefault("params", {})
    _fill(params, "lr", cfg.train.lr, f"{path.name}.optimizer.params")
    _fill(params, "weight_decay", cfg.train.weight_decay, f"{path.name}.optimizer.params")
    if opt.get("type", "").lower() in ("adam", "adamw"):
        params.setdefault("torch_adam", True)  # FusedAdam's JIT build costs minutes for no gain here
    if "scheduler" in ds:
        raise ConfigError(f"{path}: remove 'scheduler'; the schedule comes from train.lr/warmup_steps/min_lr_ratio")
    if not torch.cuda.is_available():
        for key in ("bf16", "fp16"):
            if ds.get(key, {}).get("enabled"):
                raise ConfigError(f"{path}: {key} needs a GPU; use configs/ds/cpu.json on a CPU machine")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage == 3 and cfg.model.moe.num_experts:
        raise ConfigError(f"{path}: ZeRO stage 3 cannot shard MoE experts in DeepSpeed; use stage 0, 1 or 2")
    ep = cfg.model.moe.ep_size if cfg.model.moe.num_experts else 1
    if ep > world_size or world_size % ep:
        raise ConfigError(
            f"model.moe.ep_size={ep} does not divide the {world_size} processes of this run; "
            f"launch a multiple of {ep} processes or lower ep_size"
        )
    return ds


def lr_lambda(cfg: ExperimentConfig):
    """Linear warm-up, then cosine decay to min_lr_ratio (a factor on train.lr)."""
    t = cfg.train

    def f(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay on weight matrices only; MoE expert parameters in their own groups (DeepSpeed requires it).

    Embeddings, norms and router parameters are not decayed: decay would pull the pathway
    priors back to zero, erasing what each task learned about where to route.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        routing = "pathway" in name or ".gate." in name
        (decay if p.dim() >= 2 and "embed" not in name and not routing else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    groups = [g for g in groups if g["params"]]
    if any(getattr(p, "allreduce", True) is False for p in model.parameters()):
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return groups


def initialize(model: torch.nn.Module, cfg: ExperimentConfig, world_size: int):
    """`deepspeed.initialize` with our optimizer groups and LR schedule; returns the engine."""
    import deepspeed

    ds = deepspeed_config(cfg, world_size)
    model = model.to(device())
    groups = param_groups(model, cfg.train.weight_decay)
    scheduler = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))  # noqa: E731
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds, lr_scheduler=scheduler)
    return engine


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:07d}"


def save_checkpoint(engine, ckpt_dir: Path, step: int, meta: dict[str, Any], keep: int) -> Path:
    """`engine.save_checkpoint` plus our metadata (config, task table, tokenizer hash) beside it."""
    import torch.distributed as dist

    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"pmm_meta": meta, "step": step})
    if dist.get_rank() == 0:
        path = ckpt_dir / tag / META_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
        os.replace(tmp, path)
        _prune(ckpt_dir, keep)
    dist.barrier()
    return ckpt_dir / tag


def _prune(ckpt_dir: Path, keep: int) -> None:
    if keep <= 0:
        return
    tags = sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX))
    for old in tags[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run dir, its checkpoints/ dir, or one tag dir -> the tag dir holding pmm_meta.json."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"checkpoint not found: {p} (give a run directory such as runs/demo, or one of its checkpoints)")
    if (p / META_FILE).is_file():
        return p
    for cand in (p, p / "checkpoints"):
        latest = cand / "latest"
        if latest.is_file():
            tag_dir = cand / latest.read_text().strip()
            if (tag_dir / META_FILE).is_file():
                return tag_dir
    raise ConfigError(f"no pathways-mm checkpoint in {p} (expected {META_FILE} or a 'latest' file under {p}/checkpoints)")


def read_meta(tag_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((tag_dir / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{tag_dir / META_FILE}: unreadable checkpoint metadata ({e})") from None


def load_checkpoint(engine, tag_dir: Path, with_optimizer: bool = True) -> None:
    """Load one tag dir into the engine (module, and optimizer/scheduler when resuming)."""
    load_path, _ = engine.load_checkpoint(
        str(tag_dir.parent),
        tag=tag_dir.name,
        load_optimizer_states=with_optimizer,
        load_lr_scheduler_states=with_optimizer,
        load_module_only=not with_optimizer,
    )
    if load_path is None:
        raise ConfigError(f"DeepSpeed could not load the checkpoint in {tag_dir}")
