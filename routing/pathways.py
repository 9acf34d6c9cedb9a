"""Pathways as state: grow a layer's experts, freeze what old tasks use, cut a task's sub-network.

These functions work on plain state dicts and modules, not on DeepSpeed: `pathways_mm.add_task`
and `pathways_mm.export` call them. Expert weights are keyed by global expert id here (the
layout of a one-process model), whatever ep_size the model runs at.
"""

from __future__ import annotations

import re
from typing import Iterable, NamedTuple

import torch
from torch import nn

from pathways_mm.decoder import is_adapter
from pathways_mm.routing.experts import WEIGHT_NAMES
from pathways_mm.routing.moe import PathwaysMoE

_EXPERT_KEY = re.compile(r"^(?P<layer>.*\.deepspeed_moe\.experts\.deepspeed_experts)\.(?P<id>\d+)\.(?P<rest>.+)$")


def moe_layers(model: nn.Module) -> list[tuple[str, PathwaysMoE]]:
    """(name, layer) of every PathwaysMoE, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PathwaysMoE)]


def expert_key(layer: str, expert: int, name: str) -> str:
    return f"{layer}.deepspeed_moe.experts.deepspeed_experts.{expert}.{name}.weight"


def split_expert_key(key: str) -> tuple[str, int, str] | None:
    """`...blocks.1.ffn.deepspeed_moe.experts.deepspeed_experts.7.w1.weight` -> (`...blocks.1.ffn`, 7, `w1.weight`)."""
    m = _EXPERT_KEY.match(key)
    if m is None:
        return None
    return m["layer"].removesuffix(".deepspeed_moe.experts.deepspeed_experts"), int(m["id"]), m["rest"]


def to_local(full: dict[str, torch.Tensor], model: nn.Module, ep_rank: int) -> dict[str, torch.Tensor]:
    """A global-id state dict -> the keys of this rank's model (its num_local_experts experts)."""
    local_of = {name: m.num_local_experts for name, m in moe_layers(model)}
    out = {}
    for key, value in full.items():
        parts = split_expert_key(key)
        if parts is None:
            out[key] = value
            continue
        layer, expert, rest = parts
        n = local_of.get(layer)
        if n is not None and ep_rank * n <= expert < (ep_rank + 1) * n:
            out[f"{layer}.deepspeed_moe.experts.deepspeed_experts.{expert - ep_rank * n}.{rest}"] = value
    return out


class Growth(NamedTuple):
    """What `grow` did to one checkpoint: the new task's id and the experts it was given."""

    task_id: int
    new_experts: list[int]  # global ids, the same in every MoE layer
    copied_from: dict[str, list[int]]  # MoE layer -> the old expert each new one started as


def grow(full: dict[str, torch.Tensor], layers: Iterable[str], num_experts: int, grow_by: int, task_id: int,
         closest: int, seed_experts: dict[str, list[int]]) -> tuple[dict[str, torch.Tensor], Growth]:
    """Give a model a pathway for a new task, and optionally `grow_by` experts only it may use.

    full: the old model's state with global expert ids. The new task's pathway starts as a
    copy of task `closest`'s: its prior row, its allowed experts, its task embedding. Each new
    expert j of a layer starts as a copy of old expert `seed_experts[layer][j]` (the experts
    the closest pathway sent the new task's tokens to most), router row and prior included,
    so the new task begins where the closest task's pathway would put it and then specialises.
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
        prior[task_id], allowed[task_id] = prior[closest], allowed[closest]
        if grow_by:
            wg = torch.cat([wg, wg[seeds]])
            new_prior = torch.zeros(prior.shape[0], grow_by, dtype=prior.dtype)
            new_prior[task_id] = prior[closest, seeds]
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


def freeze_for_new_task(model: nn.Module, task_id: int, new_experts: list[int], ep_rank: int,
                        adapter_slot: int | None = None) -> Freeze:
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


def restrict_experts(layer: PathwaysMoE, keep: list[int]) -> None:
    """Cut a (one-process) layer down to the experts `keep` (global ids, sorted).

    The router still scores every expert with the full weights, then keeps the kept experts'
    logits: a token whose top-k lay inside `keep` gets the same experts and the same combine
    weights as in the full layer, bit for bit. Only the expert FFN weights are dropped.
    """
    from pathways_mm.routing import telemetry
    from pathways_mm.routing.dispatch import CapacityDispatch, DroplessDispatch

    assert layer.ep_size == 1, "restrict_experts works on one-process models"
    if len(keep) < layer.top_k:
        raise ValueError(f"keep at least top_k={layer.top_k} experts, got {keep}")
    idx = torch.tensor(keep, dtype=torch.long, device=layer.router.wg.weight.device)
    ex = layer.experts
    for name in WEIGHT_NAMES:
        lin = getattr(ex, name)
        lin.weight = nn.Parameter(lin.weight.detach()[idx].clone(), requires_grad=lin.weight.requires_grad)
        lin.weight.allreduce, lin.weight.group_name = False, layer.expert_group_name
    ex.num_local_experts = layer.num_local_experts = layer.num_experts = len(keep)
    layer.router.register_buffer("kept", idx)
    if isinstance(layer.dispatcher, DroplessDispatch):
        layer.dispatcher = DroplessDispatch(len(keep), 1)
    else:
        d = layer.dispatcher
        layer.dispatcher = CapacityDispatch(len(keep), 1, d.capacity_factor, d.eval_capacity_factor, d.min_capacity)
    telemetry.enable(layer, on=False)
