"""Every private DeepSpeed and torch.distributed API pathways-mm relies on, in one place.

A DeepSpeed or torch upgrade that moves one of these breaks this module and nothing else; the
layer test (tests/test_layers.py) keeps private names from being imported anywhere else.
Pinned: deepspeed 0.19.8, torch 2.11.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from deepspeed.moe.sharded_moe import _AllToAll, _route_slots, _sparse_decode, _sparse_encode
from deepspeed.utils import groups
from torch import distributed as dist
from torch.distributed import distributed_c10d as c10d

# DeepSpeed-MoE's capacity dispatch, reused by routing.dispatch.CapacityDispatch on our routes:
# slots in the [experts * capacity] buffer, scatter into it, gather back with gate weights.
route_slots = _route_slots
sparse_encode = _sparse_encode
sparse_decode = _sparse_decode


def all_to_all_equal(group: Any, x: torch.Tensor) -> torch.Tensor:
    """DeepSpeed's autograd all-to-all of equal splits over `group` (the expert-parallel group)."""
    return _AllToAll.apply(group, x)


def set_all_group_timeouts(timeout_s: float) -> None:
    """Give every existing process group this collective timeout.

    Groups made by `new_group` (DeepSpeed's expert-parallel groups) keep torch's default of
    30 minutes, not the world group's timeout; torch has no public way to change it afterwards.
    """
    if not dist.is_initialized():
        return
    for group in list(c10d._world.pg_map):
        if group is not dist.GroupMember.NON_GROUP_MEMBER:
            c10d._set_pg_timeout(timedelta(seconds=timeout_s), group)


def default_store():
    """The rendezvous key-value store of the default process group (lives in rank 0's process)."""
    return c10d._get_default_store()


def expert_parallel_rank(group_name: str) -> int:
    """This process's rank inside DeepSpeed's expert-parallel group `group_name`."""
    return groups._get_expert_parallel_rank(group_name)


def expert_parallel_group_ranks(group_name: str) -> list[int]:
    """The global ranks of this process's expert-parallel group `group_name`: whom its all-to-alls reach."""
    return dist.get_process_group_ranks(groups._get_expert_parallel_group(group_name))


def optimizer_state_file(tag_dir: Path, expert_parallel_rank: int) -> Path:
    """Where DeepSpeed's engine saves the optimizer state of one expert-parallel rank of an MoE model
    (`DeepSpeedEngine._get_optimizer_ckpt_name`, model parallelism off)."""
    return tag_dir / f"expp_rank_{expert_parallel_rank}_mp_rank_00_optim_states.pt"


def use_checkpoint_loader(engine, load: Callable[..., Any]) -> None:
    """Make the engine read checkpoint files with `load` (DeepSpeed 0.19.8 calls torch.load with
    weights_only=False, which would run code pickled into a file)."""
    engine.checkpoint_engine.load = load


def skip_optimizer_step(engine) -> None:
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
