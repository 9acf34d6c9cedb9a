"""Pathways as layer state: expert keys by global id, a rank's share of them, cutting a layer.

Expert weights are keyed by global expert id here (the layout of a one-process model),
whatever ep_size the model runs at. Work on plain state dicts and modules, not on DeepSpeed.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from pathways_mm.routing import telemetry
from pathways_mm.routing.dispatch import CapacityDispatch, DroplessDispatch
from pathways_mm.routing.experts import WEIGHT_NAMES
from pathways_mm.routing.moe import PathwaysMoE, moe_layers

_EXPERT_KEY = re.compile(r"^(?P<layer>.*\.deepspeed_moe\.experts\.deepspeed_experts)\.(?P<id>\d+)\.(?P<rest>.+)$")


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


def restrict_experts(layer: PathwaysMoE, keep: list[int]) -> None:
    """Cut a (one-process) layer down to the experts `keep` (global ids, sorted).

    The router still scores every expert with the full weights, then keeps the kept experts'
    logits: a token whose top-k lay inside `keep` gets the same experts and the same combine
    weights as in the full layer, bit for bit. Only the expert FFN weights are dropped.
    """
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
