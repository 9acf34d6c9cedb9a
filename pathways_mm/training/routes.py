"""Route telemetry of a run gathered over every rank into a routes file (`pathways_mm.routes_file`).

routes.start(model); evaluate(...); doc = routes.finish(model, ...); routes_file.write(path, doc)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from pathways_mm import dist
from pathways_mm.errors import ConfigError
from pathways_mm.routing import telemetry


def start(model: torch.nn.Module) -> None:
    """Zeroed counters in every MoE layer: what runs from now on is counted."""
    if not telemetry.enable(model):
        raise ConfigError("routes need an MoE model: this one has no MoE layer (set model.moe.num_experts > 0)")


def gather(model: torch.nn.Module) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """(block, route_counts, token_stats) per MoE layer, summed over every rank, on the CPU.

    Every rank saw other tokens (data parallelism), so counts add over the whole world, not just
    the expert-parallel group. One all-reduce for all layers; every rank must call it.
    """
    layers = telemetry.read(model)
    if not layers:
        return []
    flat = torch.cat([t.reshape(-1) for c in layers for t in (c.route_counts, c.token_stats)])
    flat = dist.all_reduce_(flat).cpu()
    out, at = [], 0
    for c in layers:
        parts = []
        for t in (c.route_counts, c.token_stats):
            parts.append(flat[at : at + t.numel()].view(t.shape))
            at += t.numel()
        out.append((c.block, *parts))
    return out


def finish(model: torch.nn.Module) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """The counters since `start`, gathered over every rank (as `gather`); telemetry off again."""
    layers = gather(model)
    telemetry.enable(model, on=False)
    return layers


def routed_data(results: dict[str, Any], split: str) -> dict[str, Any]:
    """What a routes file counted: the evaluated samples (teacher-forced; generation not counted)."""
    return {"split": split, "samples": {name: res["n"] for name, res in results.items()}}


def expert_counts(model: torch.nn.Module, run: Callable[[], Any], all_ranks: bool = False) -> torch.Tensor:
    """Routes per (MoE layer, task, expert) made while `run()` runs: [layers, max_tasks, experts], CPU int64.

    Telemetry is switched on for the call and off after it; `all_ranks` sums over every rank
    (every rank must call it then).
    """
    telemetry.enable(model)
    try:
        run()
        counts = torch.stack([c.route_counts[0].sum(1) for c in telemetry.read(model)])
    finally:
        telemetry.enable(model, on=False)
    return (dist.all_reduce_(counts) if all_ranks else counts).cpu()


class LoadWindow:
    """Routes per (MoE layer, task, expert) of the training steps since the last log step, kept on
    the device: read (one all-reduce) only when logging, as the loss is.

    Telemetry stays on while training; an evaluation in between may count its own tokens or switch
    it off, so `harvest` before it and `restart` after it.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.sums: torch.Tensor | None = None  # [layers, max_tasks, experts]
        self.blocks = [c.block for c in telemetry.read(model)] if telemetry.enable(model) else []

    def harvest(self) -> None:
        """Move the layers' counters into the window and zero them (no host sync)."""
        layers = telemetry.read(self.model)
        if not layers:
            return
        counts = torch.stack([c.route_counts[0].sum(1) for c in layers])
        self.sums = counts if self.sums is None else self.sums + counts
        for c in layers:
            c.route_counts.zero_()
            c.token_stats.zero_()

    def restart(self) -> None:
        telemetry.enable(self.model)

    def reduce(self, table: dict[str, int]) -> dict[str, dict[str, dict[str, float]]]:
        """Per MoE layer and task, the share of the task's routes each expert took since the last
        call, over every rank (every rank must call it); then the window is empty."""
        self.harvest()
        if self.sums is None:
            return {}
        counts = dist.all_reduce_(self.sums).cpu().double()
        self.sums = None
        out: dict[str, dict[str, dict[str, float]]] = {}
        for block, per_task in zip(self.blocks, counts):
            shares = {}
            for name, tid in table.items():
                total = per_task[tid].sum()
                if total > 0:
                    shares[name] = {f"e{e}": round(float(v / total), 4) for e, v in enumerate(per_task[tid])}
            out[f"block{block}"] = shares
        return out
