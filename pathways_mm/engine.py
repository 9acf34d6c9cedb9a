"""Everything DeepSpeed: process set-up, the engine, optimizer groups, checkpoints.

Model code never imports this module; training and evaluation call it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from pathways_mm import checkpoint as ckpt
from pathways_mm import faults
from pathways_mm.checkpoint import (  # noqa: F401  (re-exported: training and evaluation call them through engine)
    META_FILE,
    gather,
    newest_intact,
    rank_world,
    read_meta,
    resolve_checkpoint,
    tag_for,
)
from pathways_mm.config import ExperimentConfig, resolve_relative
from pathways_mm.errors import ConfigError


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
    """Start torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU); returns (rank, world).

    The groups keep torch's long default timeout through start-up (the rendezvous, rank 0
    building datasets while the others wait); `bound_all_groups` then sets the run's bound.
    """
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
    bound_all_groups(cfg.train.collective_timeout_s)
    return engine


def bound_all_groups(timeout_s: float) -> None:
    """Give every process group the run's collective timeout (once the engine made its groups).

    Groups made by `new_group` (DeepSpeed's expert-parallel groups) take torch's default of
    30 minutes, not the world group's timeout, so an all-to-all with a dead peer would block that long.
    """
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    if not dist.is_initialized():
        return
    for group in list(c10d._world.pg_map):
        if group is not dist.GroupMember.NON_GROUP_MEMBER:
            c10d._set_pg_timeout(timedelta(seconds=timeout_s), group)


def grads_finite(engine, loss: torch.Tensor) -> torch.Tensor:
    """Whether this rank's loss and every gradient are finite: a 0-dim bool tensor on the device.

    Reads `p.grad`, where ZeRO stage 0 keeps gradients; under ZeRO 1/2 they move into DeepSpeed's
    flat partitions after backward, so there only the loss is checked here.
    """
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    total = torch.stack([g.float().abs().sum() for g in grads]).sum() if grads else loss.new_zeros(())
    return torch.isfinite(total + loss.detach().float())


def agree_all_finite(ok: torch.Tensor) -> bool:
    """True only if every rank saw finite values: all ranks skip or step together."""
    import torch.distributed as dist

    flag = ok.to(torch.int32).reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def skip_step(engine) -> None:
    """Close this step without touching weights, optimizer moments or the LR schedule.

    DeepSpeed's own fp16 overflow path: `engine.step()` runs (so its micro-step and boundary
    counters stay right and the gradients are zeroed), the optimizer's update is a no-op, and
    an `overflow` flag makes DeepSpeed count the step as skipped and hold the LR scheduler.
    """
    opt = engine.optimizer
    saved = {k: opt.__dict__[k] for k in ("step", "overflow") if k in opt.__dict__}
    opt.step = lambda *args, **kwargs: None
    opt.overflow = True
    try:
        engine.step()
    finally:
        for k in ("step", "overflow"):
            opt.__dict__.pop(k, None)
        opt.__dict__.update(saved)


def inject_nan_grad(engine) -> None:
    """Test fault: one NaN in the first gradient (after DeepSpeed's gradient all-reduce)."""
    for p in engine.module.parameters():
        if p.grad is not None:
            p.grad.view(-1)[0] = float("nan")
            return


def save_checkpoint(engine, ckpt_dir: Path, step: int, meta: dict[str, Any], keep: int) -> Path:
    """Write, verify, then publish: DeepSpeed's files and our metadata, then a checksum manifest.

    Until the manifest is written (last, atomically, after every rank finished writing), the
    tag dir is an unfinished save that resume and eval skip; a rank killed mid-save loses
    nothing but this checkpoint.
    """
    import torch.distributed as dist

    rank, world = rank_world()
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if rank == 0 and tag_dir.exists():  # an unfinished save of this step, or a re-save
        latest = ckpt_dir / ckpt.LATEST
        if latest.is_file() and latest.read_text().strip() == tag:
            latest.unlink()
        shutil.rmtree(tag_dir)
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"pmm_meta": meta, "step": step}, save_latest=False)
    if rank == 0:
        ckpt.atomic_write_text(tag_dir / META_FILE, json.dumps(meta, indent=2, sort_keys=True))
    faults.maybe_die("kill_during_save", step, rank)
    dist.barrier()  # every rank's files are complete
    names = ckpt.list_files(tag_dir)
    files = {k: v for part in gather(ckpt.hash_files(tag_dir, names[rank::world])) for k, v in part.items()}
    if rank == 0:
        ckpt.publish(tag_dir, step, files)
        ckpt.prune(ckpt_dir, keep)
    dist.barrier()
    return tag_dir


def _weights_only_load(path: str, map_location=None):
    """What DeepSpeed's checkpoint engine loads with: tensors and plain containers only.

    DeepSpeed 0.19.8 calls torch.load(weights_only=False), which runs any callable pickled
    into a file; a checkpoint from someone else must not be able to run code here.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # UnpicklingError for code, RuntimeError/EOFError for a damaged zip
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: refused to load ({type(e).__name__}: {reason})") from None


def load_checkpoint(engine, tag_dir: Path, with_optimizer: bool = True) -> None:
    """Load one tag dir into the engine (module, and optimizer/scheduler when resuming)."""
    engine.checkpoint_engine.load = _weights_only_load
    try:
        load_path, _ = engine.load_checkpoint(
            str(tag_dir.parent),
            tag=tag_dir.name,
            load_optimizer_states=with_optimizer,
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
    loaded = _weights_only_load(str(main), map_location="cpu")
    state = loaded.get("module") if isinstance(loaded, dict) else None
    if not isinstance(state, dict):
        raise ConfigError(f"{main}: holds no model weights ('module')")
    state = dict(state)
    for path in sorted(tag_dir.glob("layer_*_expert_*_mp_rank_00_model_states.pt")):
        expert = _weights_only_load(str(path), map_location="cpu")
        if not isinstance(expert, dict):
            raise ConfigError(f"{path}: not an expert state dict")
        state.update(expert)
    return state
