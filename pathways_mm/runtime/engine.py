"""Everything DeepSpeed: process set-up, the engine, optimizer groups, the step's numerics.

The only module that calls `deepspeed.initialize`. Model code never imports it; training,
evaluation and the tools that load a model call it (checkpoints: `runtime.checkpoint`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from torch.utils import cpp_extension

from pathways_mm.config import ExperimentConfig, resolve_relative
from pathways_mm.errors import ConfigError
from pathways_mm.io import existing, load_json
from pathways_mm.runtime import compat

# What `train.ds_config: null` (the default) means, wherever the experiment file lives: float32,
# ZeRO stage 0, AdamW (configs/ds/cpu.json holds the same; gpu_bf16*.json add bf16 and ZeRO).
BUILTIN_DS: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": 1.0,
    "steps_per_print": 1_000_000,
    "wall_clock_breakdown": False,
    "zero_optimization": {"stage": 0},
    "optimizer": {
        "type": "AdamW",
        "params": {"lr": "auto", "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": "auto", "torch_adam": True},
    },
}


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


def init_distributed(threads: int = 0) -> tuple[int, int]:
    """Start torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU); returns (rank, world).

    The groups keep torch's long default timeout through start-up (the rendezvous, rank 0
    building datasets while the others wait); `initialize` then sets the run's bound.
    """
    if "RANK" not in os.environ:
        setup_single_process_env()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if not torch.cuda.is_available():
        # Processes on one CPU share its cores: oversubscription makes each one many times slower.
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local_world))
    elif threads:
        torch.set_num_threads(threads)
    if not dist.is_initialized():
        if not torch.cuda.is_available():
            _warn_stale_build_lock("deepspeed_shm_comm")
        with _quiet():
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
        _unlink_shm_buffer()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def _warn_stale_build_lock(op: str, stale_s: float = 600) -> None:
    """Say so when DeepSpeed's JIT build of `op` will wait on a lock nobody holds. A process
    killed while building (a timeout, Ctrl-C in the first minute of a first run) leaves the lock
    file; torch then waits on it forever, silently. A build takes about a minute, so a lock older
    than `stale_s` is almost surely such a leftover."""
    try:
        lock = Path(cpp_extension._get_build_directory(op, verbose=False)) / "lock"
        age = time.time() - lock.stat().st_mtime
    except (OSError, RuntimeError, AttributeError):  # no lock (the usual case), or torch moved it
        return
    if age > stale_s:
        print(
            f"pathways-mm: waiting on {lock}, left {age / 60:.0f} minutes ago by a DeepSpeed build that was "
            "killed; if no other pathways-mm is starting on this machine, delete it",
            file=sys.stderr,
            flush=True,
        )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hold back what DeepSpeed prints while it starts ("... shm_comm_op built successfully", "No
    existing process group found ...", on stdout among a command's results); shown if start-up
    fails, or always with PMM_VERBOSE=1."""
    if os.environ.get("PMM_VERBOSE"):
        yield
        return
    held = io.StringIO()
    try:
        with contextlib.redirect_stdout(held):
            yield
    except BaseException:
        sys.stdout.write(held.getvalue())
        raise


def _unlink_shm_buffer() -> None:
    """Remove this rank's name of DeepSpeed's CPU all-reduce buffer (69 MB in /dev/shm).

    DeepSpeed never unlinks it, so every CPU run left one per rank behind until /dev/shm filled
    memory. Once every rank has mapped every peer's buffer (DeepSpeed opens them all during
    init, before the barrier returns), the name is no longer needed: the mappings live on and the
    memory goes back when the last process exits, even if it is killed.
    """
    if torch.cuda.is_available() or not Path("/dev/shm").is_dir():
        return
    dist.barrier()
    name = (
        f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
        f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}"
    )
    Path("/dev/shm", name).unlink(missing_ok=True)


def shutdown() -> None:
    """Leave the process group together: a rank that exits while a peer still talks to it can
    abort in the communication threads' destructors ("terminate called without an active exception")."""
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
            f'{where}.{key} is {node[key]!r} but the experiment config says {value!r}; set it to "auto" in the DeepSpeed JSON'
        )


def deepspeed_config(cfg: ExperimentConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON named by `train.ds_config` (BUILTIN_DS when null), with "auto" values filled from `cfg`."""
    if cfg.train.ds_config is None:
        path, ds = Path("train.ds_config"), copy.deepcopy(BUILTIN_DS)
    else:
        path = resolve_relative(cfg, cfg.train.ds_config)
        existing(
            path, "train.ds_config: DeepSpeed config", "set train.ds_config to a JSON file such as configs/ds/cpu.json"
        )
        ds = load_json(path, "DeepSpeed config")
        if not isinstance(ds, dict):
            raise ConfigError(f"{path}: a DeepSpeed config is a JSON object")
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
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return groups


def initialize(model: torch.nn.Module, cfg: ExperimentConfig, world_size: int):
    """`deepspeed.initialize` with our optimizer groups and LR schedule; returns the engine."""
    ds = deepspeed_config(cfg, world_size)
    model = model.to(device())
    groups = param_groups(model, cfg.train.weight_decay)
    scheduler = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))  # noqa: E731
    with _quiet():  # "No existing process group found, creating a new group named: ep_size_1" on stdout
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds, lr_scheduler=scheduler)
    compat.set_all_group_timeouts(cfg.train.collective_timeout_s)
    return engine


def expert_peers(cfg: ExperimentConfig) -> list[int] | None:
    """The ranks this rank exchanges tokens with (its expert-parallel group); None without expert parallelism.

    DeepSpeed groups consecutive ranks by default; `"use_data_before_expert_parallelism": true` in
    the DeepSpeed JSON strides them instead (ranks 0 and 2 of four), across machines.
    """
    ep = cfg.model.moe.ep_size if cfg.model.moe.num_experts else 1
    return compat.expert_parallel_group_ranks(f"ep_size_{ep}") if ep > 1 else None


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
    flag = ok.to(torch.int32).reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def skip_step(engine) -> None:
    """Close this step without touching weights, optimizer moments or the LR schedule."""
    compat.skip_optimizer_step(engine)


def inject_nan_grad(engine) -> None:
    """Test fault: one NaN in the first gradient (after DeepSpeed's gradient all-reduce)."""
    for p in engine.module.parameters():
        if p.grad is not None:
            p.grad.view(-1)[0] = float("nan")
            return


def eval_ds_config() -> dict[str, Any]:
    """Inference only: no optimizer; bf16 on a GPU, float32 on a CPU."""
    ds: dict[str, Any] = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 0}}
    if torch.cuda.is_available():
        ds["bf16"] = {"enabled": True}
    return ds


def initialize_for_eval(model: torch.nn.Module, cfg: ExperimentConfig):
    """An inference engine (no optimizer) around `model`: expert-parallel groups, bf16 on a GPU."""
    with _quiet():
        engine, *_ = deepspeed.initialize(model=model.to(device()), config=eval_ds_config())
    compat.set_all_group_timeouts(cfg.train.collective_timeout_s)
    return engine


def weights_in_sync(engine, world: int) -> bool | None:
    """Data-parallel replicas must hold the same non-expert weights: compare checksums across ranks."""
    if world == 1:
        return None
    sums = [p.detach().double().sum() for p in engine.module.parameters() if getattr(p, "allreduce", True)]
    local = torch.stack(sums)  # on the device: nccl gathers only device tensors
    gathered = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    return all(torch.equal(g.cpu(), gathered[0].cpu()) for g in gathered)


def continue_schedule(src, dst) -> None:
    """`dst` where `src` stands: the LR schedule's position (with each group's learning rate) and
    the step counters DeepSpeed checkpoints (global steps and samples, skipped steps)."""
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": on purpose, no step is taken
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(src.lr_scheduler.last_epoch - dst.lr_scheduler.last_epoch):
            dst.lr_scheduler.step()
    dst.global_steps, dst.global_samples, dst.skipped_steps = src.global_steps, src.global_samples, src.skipped_steps
