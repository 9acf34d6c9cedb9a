"""Model surgery for add-task: give a model a new task's pathway (and experts), freeze the rest.

Works on plain state dicts and modules, not on DeepSpeed; expert weights keyed by global id
(`routing.pathways.expert_key`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import nn

from pathways_mm.model.adapters import is_adapter
from pathways_mm.routing.experts import WEIGHT_NAMES
from pathways_mm.routing.pathways import expert_key


class Growth(NamedTuple):
    """What `grow` did to one checkpoint: the new task's id and the experts it was given."""

    task_id: int
    new_experts: list[int]  # global ids, the same in every MoE layer
    copied_from: dict[str, list[int]]  # MoE layer -> the old expert each new one started as


def grow(
    full: dict[str, torch.Tensor],
    layers: Iterable[str],
    num_experts: int,
    grow_by: int,
    task_id: int,
    closest: int,
    seed_experts: dict[str, list[int]],
    start: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[dict[str, torch.Tensor], Growth]:
    """Give a model a pathway for a new task, and optionally `grow_by` experts only it may use.

    full: the old model's state with global expert ids. The new task's task embedding starts as
    a copy of task `closest`'s; its pathway (prior row, allowed experts) as `start[layer]` where
    given (the experts its own data prefers), else as a copy of the closest task's. Each new
    expert j of a layer starts as a copy of old expert `seed_experts[layer][j]` (the experts the
    new task's tokens went to most), router row and prior included, so the new task begins where
    its data would route and then specialises.
    Old tasks may not route to new experts (allowed = False), so their outputs do not change.
    """
    new = dict(full)
    new_ids = list(range(num_experts, num_experts + grow_by))
    emb = new["decoder.task_embed.weight"].clone()
    emb[task_id] = emb[closest]
    new["decoder.task_embed.weight"] = emb
    copied: dict[str, list[int]] = {}
    for layer in layers:
        gate = f"{layer}.deepspeed_moe.gate"
        wg, prior, allowed = new[f"{gate}.wg.weight"], new[f"{gate}.pathway"], new[f"{gate}.allowed"]
        assert wg.shape[0] == num_experts, (layer, wg.shape, num_experts)
        seeds = list(seed_experts.get(layer, []))[:grow_by]
        seeds += [seeds[-1] if seeds else 0] * (grow_by - len(seeds))
        copied[layer] = seeds
        prior, allowed = prior.clone(), allowed.clone()
        prior[task_id], allowed[task_id] = (
            start[layer] if start and layer in start else (prior[closest], allowed[closest])
        )
        if grow_by:
            wg = torch.cat([wg, wg[seeds]])
            new_prior = torch.zeros(prior.shape[0], grow_by, dtype=prior.dtype)
            new_prior[task_id] = prior[task_id, seeds]
            prior = torch.cat([prior, new_prior], dim=1)
            new_allowed = torch.zeros(allowed.shape[0], grow_by, dtype=allowed.dtype)
            new_allowed[task_id] = True
            allowed = torch.cat([allowed, new_allowed], dim=1)
            for e, src in zip(new_ids, seeds):
                for name in WEIGHT_NAMES:
                    new[expert_key(layer, e, name)] = full[expert_key(layer, src, name)].clone()
        new[f"{gate}.wg.weight"], new[f"{gate}.pathway"], new[f"{gate}.allowed"] = wg, prior, allowed
    return new, Growth(task_id, new_ids, copied)


class Freeze(NamedTuple):
    """Which parameters train after `freeze_for_new_task`, and a copy of everything frozen."""

    trainable: int  # parameter elements that may change (this rank)
    frozen: dict[str, torch.Tensor]  # name -> value at freeze time
    masks: dict[str, torch.Tensor]  # name -> bool mask of the elements that may change


def _masked(p: nn.Parameter, mask: torch.Tensor) -> None:
    keep = mask.to(p.dtype)
    p.register_hook(lambda g: g * keep.to(g.device))


def with_adapters(full: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`full` plus the adapter weights of a model with one more slot: old slots from `full`, the
    new one from `fresh` (the new model's own initial weights; its B is zero, so it changes nothing)."""
    out = dict(full)
    for name, value in fresh.items():
        if not is_adapter(name):
            continue
        new = value.detach().clone()
        old = full.get(name)
        if old is not None:
            new[: old.shape[0]] = old
        out[name] = new
    return out


def freeze_for_new_task(
    model: nn.Module, task_id: int, new_experts: list[int], ep_rank: int, adapter_slot: int | None = None
) -> Freeze:
    """Freeze all but the new task's pathway: its task-embedding row and prior row, the new
    experts with their router rows (global ids `new_experts`; this rank holds some or none) and
    its adapter slot.

    Frozen whole tensors stop needing gradients; partly trainable ones (an embedding table, the
    prior matrix, stacked experts) get a gradient mask. With a zero gradient and no weight decay,
    Adam moves nothing: its moments stay 0 and the update is 0 / (sqrt(0) + eps) = 0.
    """
    masks: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        mask = torch.zeros_like(p, dtype=torch.bool)
        if name == "decoder.task_embed.weight" or name.endswith(".deepspeed_moe.gate.pathway"):
            mask[task_id] = True
        elif name.endswith(".deepspeed_moe.gate.wg.weight"):
            mask[new_experts] = True
        elif is_adapter(name):
            if adapter_slot is not None:
                mask[adapter_slot] = True
        elif ".deepspeed_moe.experts." in name:
            layer = model.get_submodule(name.split(".deepspeed_moe.")[0])
            n = layer.num_local_experts
            local = [e - ep_rank * n for e in new_experts if ep_rank * n <= e < (ep_rank + 1) * n]
            mask[local] = True
        if mask.any():
            masks[name] = mask
        else:
            p.requires_grad_(False)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        if name in masks:
            _masked(p, masks[name])
    return Freeze(sum(int(m.sum()) for m in masks.values()), frozen, masks)


def changed_frozen(model: nn.Module, freeze: Freeze) -> list[str]:
    """Names of parameters whose frozen elements moved (empty: nothing old changed)."""
    bad = []
    for name, p in model.named_parameters():
        before = freeze.frozen[name].to(p.device)
        now = p.detach()
        mask = freeze.masks.get(name)
        if mask is not None:
            mask = mask.to(p.device)
            before, now = before[~mask], now[~mask]
        if not torch.equal(before, now):
            bad.append(name)
    return bad
