"""Resuming at another world size or ep_size, with the optimizer state (Adam moments of experts included).

DeepSpeed saves one optimizer file per expert-parallel rank (dense parameters and that rank's
experts, stacked) and on resume reads the file of the rank's own expert-parallel rank. After an
ep_size change that file holds other experts' moments in tensors of another shape, and
DeepSpeed 0.19.8 loads it without a check: moments end up on the wrong experts, a rank finds no
file, or a broadcast makes a wrong step run. Here every saved file is mapped back to parameter
names with global expert ids (the names are recorded at save time, `layout()` in pmm_meta.json),
and each rank takes its own share.

Only a plain torch optimizer can be resharded: ZeRO stage 0 in float32 (configs/ds/cpu.json).
ZeRO-1/2 and DeepSpeed's bf16/fp16 optimizers keep flat fp32 partitions laid out by the
data-parallel world; they resume only at the layout they were saved with, anything else is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pathways_mm.errors import ConfigError
from pathways_mm.runtime import checkpoint as ckpt
from pathways_mm.runtime import compat


def _dtype(engine) -> str:
    return "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"


def _ep_size(module: torch.nn.Module) -> int:
    """The expert-parallel size of the model's MoE layers (1 for a dense model)."""
    return max((getattr(m, "ep_size", 1) for m in module.modules() if hasattr(m, "num_local_experts")), default=1)


def is_plain(engine) -> bool:
    """Whether DeepSpeed steps a plain torch optimizer whose state is keyed by the module's parameters."""
    return (
        engine.zero_optimization_stage() == 0
        and _dtype(engine) == "fp32"
        and isinstance(engine.optimizer, torch.optim.Optimizer)
    )


def named_state(engine) -> dict[str, dict[str, Any]] | None:
    """The optimizer's per-parameter state (Adam moments, step) by parameter name, as this rank
    holds it; None where the optimizer is not plain (`is_plain`)."""
    if engine.optimizer is None or not is_plain(engine):
        return None
    opt = engine.optimizer
    return {name: dict(opt.state[p]) for name, p in engine.module.named_parameters() if p in opt.state}


def set_named_state(engine, states: dict[str, dict[str, Any]]) -> bool:
    """Give the named parameters this optimizer state (tensors moved to each parameter's device);
    False, and nothing set, where the optimizer is not plain."""
    if engine.optimizer is None or not is_plain(engine):
        return False
    for name, p in engine.module.named_parameters():
        if name in states:
            engine.optimizer.state[p] = {
                k: v.to(p.device) if torch.is_tensor(v) else v for k, v in states[name].items()
            }
    return True


def layout(engine, world: int) -> dict[str, Any]:
    """How this run holds its optimizer state, for pmm_meta.json: processes, ep_size, ZeRO stage,
    precision and, for a plain optimizer, the parameter names of every optimizer group in order."""
    names = None
    if engine.optimizer is not None and is_plain(engine):
        by_id = {id(p): n for n, p in engine.module.named_parameters()}
        names = [[by_id[id(p)] for p in g["params"]] for g in engine.optimizer.param_groups]
    return {
        "world_size": world,
        "ep_size": _ep_size(engine.module),
        "zero_stage": engine.zero_optimization_stage(),
        "dtype": _dtype(engine),
        "optimizer_params": names,
    }


LAYOUT_TYPES = {"world_size": int, "ep_size": int, "zero_stage": int, "dtype": str}


def _describe(lay: dict[str, Any]) -> str:
    return f"{lay['world_size']} processes, ep_size {lay['ep_size']}, ZeRO stage {lay['zero_stage']}, {lay['dtype']}"


def how_to_resume(saved: Any, now: dict[str, Any], where: str) -> str:
    """'deepspeed' (DeepSpeed's own loading is right) or 'reshard'; ConfigError if it cannot be done.

    saved: the checkpoint's layout (None: a checkpoint from before layouts were recorded, whose
    ep_size the caller passes in `now["saved_ep_size"]`); now: this run's `layout()`.
    """
    if saved is None:
        if now["saved_ep_size"] != now["ep_size"]:
            raise ConfigError(
                f"{where}: saved at ep_size {now['saved_ep_size']} by a pathways-mm that did not record how its "
                f"optimizer state is laid out; resume it at model.moe.ep_size={now['saved_ep_size']}"
            )
        return "deepspeed"
    bad = [k for k, tp in LAYOUT_TYPES.items() if not isinstance(saved.get(k) if isinstance(saved, dict) else None, tp)]
    if bad:
        raise ConfigError(f"{where}: checkpoint layout lacks {', '.join(bad)} (not written by pathways-mm?)")
    keys = ("world_size", "ep_size", "zero_stage", "dtype")
    if all(saved[k] == now[k] for k in keys):
        return "deepspeed"
    plain_then = saved["zero_stage"] == 0 and saved["dtype"] == "fp32"
    plain_now = now["zero_stage"] == 0 and now["dtype"] == "fp32"
    if not (plain_then and plain_now):
        raise ConfigError(
            f"{where}: the optimizer state was saved with {_describe(saved)} and cannot be moved to {_describe(now)}: "
            "ZeRO-1/2 and bf16/fp16 optimizer states are flat partitions of the data-parallel world. Resume with the "
            "saved processes, ep_size and DeepSpeed config; only ZeRO stage 0 in float32 (configs/ds/cpu.json) reshards"
        )
    if saved["ep_size"] == now["ep_size"]:
        return "deepspeed"  # a file per expert-parallel rank, each replica's moments alike: any world size reads them
    names = saved.get("optimizer_params")
    if not isinstance(names, list) or not all(
        isinstance(g, list) and all(isinstance(n, str) for n in g) for g in names
    ):
        raise ConfigError(f"{where}: checkpoint layout records no optimizer parameter names; cannot reshard it")
    return "reshard"


def resume(engine, tag_dir: Path, meta: dict[str, Any], world: int) -> None:
    """Load a checkpoint for `--resume`: weights, LR schedule, step counters and optimizer state,
    resharded where this run's world size or ep_size differs from the saved one."""
    where = str(tag_dir / ckpt.META_FILE)
    now = layout(engine, world)
    now["saved_ep_size"] = meta["config"]["model"].get("moe", {}).get("ep_size", 1)
    if how_to_resume(meta.get("layout"), now, where) == "deepspeed":
        ckpt.load_checkpoint(engine, tag_dir, with_optimizer=True)
        return
    ckpt.load_checkpoint(engine, tag_dir, with_optimizer=True, with_moments=False)
    named, groups = saved_state(tag_dir, meta["layout"], where)
    engine.optimizer.load_state_dict(_state_for_this_rank(engine, now["ep_size"], named, groups, where))


def saved_state(tag_dir: Path, saved: dict[str, Any], where: str) -> tuple[dict[str, dict], list[dict]]:
    """Every parameter's optimizer state by name, experts stacked over all global experts, and the
    saved groups (their hyperparameters and parameter names)."""
    names = saved["optimizer_params"]
    per_rank = []
    for r in range(saved["ep_size"]):
        path = compat.optimizer_state_file(tag_dir, r)
        if not path.is_file():
            raise ConfigError(f"{path}: missing; the checkpoint has no optimizer state for expert-parallel rank {r}")
        sd = ckpt.weights_only_load(str(path), map_location="cpu")
        sd = sd.get("optimizer") if isinstance(sd, dict) else None
        if not isinstance(sd, dict) or [len(g["params"]) for g in sd["param_groups"]] != [len(g) for g in names]:
            raise ConfigError(f"{path}: optimizer groups do not match the parameter names recorded in {where}")
        per_rank.append(sd)
    groups, named = [], {}
    for gi, group_names in enumerate(names):
        saved_group = per_rank[0]["param_groups"][gi]
        groups.append({**saved_group, "params": group_names})
        for pi, name in enumerate(group_names):
            states = [sd["state"].get(sd["param_groups"][gi]["params"][pi]) for sd in per_rank]
            if not saved_group.get("moe"):
                if states[0] is not None:
                    named[name] = states[0]  # dense: every replica holds the same moments
                continue
            if all(s is None for s in states):
                continue
            if any(s is None for s in states) or len({float(s["step"]) for s in states}) != 1:
                raise ConfigError(f"{where}: {name} has optimizer state on some expert-parallel ranks only")
            named[name] = {
                k: torch.cat([s[k] for s in states]) if torch.is_tensor(v) and v.dim() else v
                for k, v in states[0].items()
            }
    return named, groups


def _state_for_this_rank(engine, ep_size: int, named: dict[str, dict], groups: list[dict], where: str) -> dict:
    """A torch optimizer state dict for this rank's parameters: dense moments whole, expert moments
    sliced to the experts this rank holds. Every group must hold the same parameters as a saved one."""
    by_id = {id(p): n for n, p in engine.module.named_parameters()}
    ep_rank = compat.expert_parallel_rank(f"ep_size_{ep_size}") if ep_size > 1 else 0
    saved_by_names = {frozenset(g["params"]): g for g in groups}
    state, out_groups, index = {}, [], 0
    for group in engine.optimizer.param_groups:
        names = [by_id[id(p)] for p in group["params"]]
        saved = saved_by_names.get(frozenset(names))
        if saved is None:
            raise ConfigError(
                f"{where}: the checkpoint's optimizer has no group of these parameters ({names[0]}, ...); "
                "it was trained with other trainable parameters"
            )
        hyper = {k: v for k, v in saved.items() if k not in ("params", "name", "moe")}
        out_groups.append({**group, **hyper, "params": list(range(index, index + len(names)))})
        for p, name in zip(group["params"], names):
            s = named.get(name)
            if s is not None:
                if group.get("moe"):
                    local = p.shape[0]
                    s = {
                        k: v[ep_rank * local : (ep_rank + 1) * local] if torch.is_tensor(v) and v.dim() else v
                        for k, v in s.items()
                    }
                bad = [k for k, v in s.items() if torch.is_tensor(v) and v.dim() and v.shape != p.shape]
                if bad:
                    raise ConfigError(f"{where}: optimizer state {bad[0]} of {name} does not fit its parameter")
                state[index] = s
            index += 1
    return {"state": state, "param_groups": out_groups}
