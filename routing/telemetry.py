"""Route telemetry: where each MoE layer sends the tokens of every (task, modality), on the device.

While telemetry is on, every PathwaysMoE holds two int64 buffers (non-persistent: never in a
checkpoint) that its forward adds to with scatter-adds only, so nothing syncs with the host:

  route_counts [3, max_tasks, modalities, experts]: [0] routes (token, chosen expert) assigned,
               [1] the subset dropped over capacity (always 0 on the dropless path),
               [2] tokens by their top-1 expert (the first of their k)
  token_stats  [2, max_tasks, modalities]: [0] tokens, [1] gate entropy summed over those
               tokens, in micro-nats

Integers, not floats: DeepSpeed's bf16/fp16 casts leave them alone, and sums over ranks are
exact, so one process and many give the same numbers. Padding (modality id -1) is not counted.

Shape suffixes: T tokens, K routes per token, E experts, N routes (T*K).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn

from pathways_mm.routes_file import ENTROPY_SCALE  # micro-nats: ln(experts) < 10 nats, so int64 holds 9e11 tokens
from pathways_mm.tasks.base import MODALITIES

NUM_MODALITIES = len(MODALITIES)
_ON = "_route_telemetry_on"


class LayerCounts(NamedTuple):
    """One MoE layer's counters (device tensors, int64)."""

    block: int  # index of the decoder block whose FFN this is
    route_counts: torch.Tensor  # [3, max_tasks, modalities, experts]: assigned, dropped, top-1
    token_stats: torch.Tensor  # [2, max_tasks, modalities]: tokens, entropy micro-nats


def is_tracked(module: nn.Module) -> bool:
    """Whether `module` is an MoE layer that keeps route telemetry."""
    return hasattr(module, _ON)


def _layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    return ((name, m) for name, m in model.named_modules() if is_tracked(m))


def enable(model: nn.Module, on: bool = True) -> int:
    """Turn telemetry on (fresh zero counters on each layer's device) or off (counters freed).

    Call it after the model is on its device (after deepspeed.initialize). Returns how many
    MoE layers are tracked.
    """
    n = 0
    for _, m in _layers(model):
        setattr(m, _ON, on)
        if on:
            dev = m.router.wg.weight.device
            tasks, experts = m.router.max_tasks, m.num_experts
            m.route_counts = torch.zeros(3, tasks, NUM_MODALITIES, experts, dtype=torch.long, device=dev)
            m.token_stats = torch.zeros(2, tasks, NUM_MODALITIES, dtype=torch.long, device=dev)
        else:
            m.route_counts = m.token_stats = None
        n += 1
    return n


@contextmanager
def paused(model: nn.Module) -> Iterator[None]:
    """Count nothing inside the block (e.g. greedy decoding re-reads the same prefix each step)."""
    layers = [m for _, m in _layers(model)]
    was = [getattr(m, _ON) for m in layers]
    for m in layers:
        setattr(m, _ON, False)
    try:
        yield
    finally:
        for m, w in zip(layers, was):
            setattr(m, _ON, w)


def read(model: nn.Module) -> list[LayerCounts]:
    """The counters of every tracked layer, in block order (empty if telemetry is off)."""
    out = []
    for name, m in _layers(model):
        if m.route_counts is None:
            continue
        block = int(name.split("blocks.")[-1].split(".")[0]) if "blocks." in name else len(out)
        out.append(LayerCounts(block, m.route_counts, m.token_stats))
    return sorted(out, key=lambda c: c.block)


def register(layer: nn.Module) -> None:
    """Give an MoE layer its (empty, off) telemetry slots; called by the layer's __init__."""
    setattr(layer, _ON, False)
    layer.register_buffer("route_counts", None, persistent=False)
    layer.register_buffer("token_stats", None, persistent=False)


@torch.no_grad()
def record(
    layer: nn.Module,
    indices_TK: torch.Tensor,
    probs_TE: torch.Tensor,
    task_T: torch.Tensor,
    modality_T: torch.Tensor | None,
    dropped_TK: torch.Tensor | None = None,
) -> None:
    """Add one forward's routes to `layer`'s counters (a no-op while telemetry is off or paused)."""
    if not getattr(layer, _ON, False):
        return
    if modality_T is None:
        modality_T = torch.zeros_like(task_T)  # no modality ids: every position is text
    E, k = layer.route_counts.shape[-1], indices_TK.shape[1]
    valid_T = (modality_T >= 0).long()
    cell_T = task_T * NUM_MODALITIES + modality_T.clamp(min=0)  # (task, modality) row
    flat_N = (cell_T[:, None] * E + indices_TK).reshape(-1)
    valid_N = valid_T[:, None].expand(-1, k).reshape(-1)  # not repeat_interleave: no doubt about a host sync
    layer.route_counts[0].view(-1).index_add_(0, flat_N, valid_N)
    if dropped_TK is not None:
        layer.route_counts[1].view(-1).index_add_(0, flat_N, valid_N * dropped_TK.reshape(-1).long())
    layer.route_counts[2].view(-1).index_add_(0, cell_T * E + indices_TK[:, 0], valid_T)
    # entr(0) = 0: experts masked off for a task (probability 0) add nothing.
    entropy_T = torch.special.entr(probs_TE.float()).sum(-1).double()
    micro_T = (entropy_T * ENTROPY_SCALE).round().long() * valid_T
    per_cell = layer.token_stats.view(2, -1)
    per_cell[0].index_add_(0, cell_T, valid_T)
    per_cell[1].index_add_(0, cell_T, micro_T)
