"""Routes files: route telemetry gathered over all ranks into one JSON document (docs/routes.md).

    routes.start(model); evaluate(...); doc = routes.finish(model, ...); routes.write(path, doc)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from pathways_mm.config import MOE_RUNTIME_KEYS, ExperimentConfig, to_dict
from pathways_mm.errors import ConfigError
from pathways_mm.tasks.base import MODALITIES

FORMAT = "pathways-mm-routes"
VERSION = 1


def start(model: torch.nn.Module) -> None:
    """Zeroed counters in every MoE layer: what runs from now on is counted."""
    from pathways_mm.routing import telemetry  # here, not at the top: drawing routes needs no DeepSpeed

    if not telemetry.enable(model):
        raise ConfigError("routes need an MoE model: this one has no MoE layer (set model.moe.num_experts > 0)")


def gather(model: torch.nn.Module) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """(block, route_counts, token_stats) per MoE layer, summed over every rank, on the CPU.

    Every rank saw other tokens (data parallelism), so counts add over the whole world, not just
    the expert-parallel group. One all-reduce for all layers; every rank must call it.
    """
    import torch.distributed as dist

    from pathways_mm.routing import telemetry

    layers = telemetry.read(model)
    if not layers:
        return []
    flat = torch.cat([t.reshape(-1) for c in layers for t in (c.route_counts, c.token_stats)])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flat)
    flat = flat.cpu()
    out, at = [], 0
    for c in layers:
        parts = []
        for t in (c.route_counts, c.token_stats):
            parts.append(flat[at : at + t.numel()].view(t.shape))
            at += t.numel()
        out.append((c.block, *parts))
    return out


def model_identity(cfg: ExperimentConfig) -> dict[str, Any]:
    """The model a routes file describes; `hash` ignores how MoE layers run (impl, ep_size, ...)."""
    model = to_dict(cfg.model)
    shape = {**model, "moe": {k: v for k, v in model["moe"].items() if k not in MOE_RUNTIME_KEYS}}
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]
    return {"name": cfg.name, "hash": digest, "num_blocks": cfg.model.n_layers, "config": model}


def document(gathered, cfg: ExperimentConfig, task_names: Sequence[str], checkpoint: dict[str, Any],
             data: dict[str, Any]) -> dict[str, Any]:
    """The routes JSON (schema in docs/routes.md) from `gather`'s output."""
    from pathways_mm.routing.telemetry import ENTROPY_SCALE

    n = len(task_names)
    layers = []
    for block, counts, stats in gathered:
        layers.append({
            "block": block,
            "num_experts": counts.shape[-1],
            "top_k": cfg.model.moe.top_k,
            "routes": counts[0, :n].tolist(),
            "dropped": counts[1, :n].tolist(),
            "tokens": stats[0, :n].tolist(),
            "entropy_sum": (stats[1, :n].double() / ENTROPY_SCALE).tolist(),
        })  # fmt: skip
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": model_identity(cfg),
        "checkpoint": checkpoint,
        "data": data,
        "tasks": list(task_names),
        "modalities": list(MODALITIES),
        "layers": layers,
    }


def finish(model: torch.nn.Module, cfg: ExperimentConfig, task_names: Sequence[str], checkpoint: dict[str, Any],
           data: dict[str, Any]) -> dict[str, Any]:
    """Gather the counters since `start` into a routes document and turn telemetry off."""
    from pathways_mm.routing import telemetry

    doc = document(gather(model), cfg, task_names, checkpoint, data)
    telemetry.enable(model, on=False)
    return doc


def write(path: str | os.PathLike, doc: dict[str, Any]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, p)  # a half-written routes file is never read
    return p


def _shape(x: Any) -> tuple[int, ...]:
    shape = []
    while isinstance(x, list):
        shape.append(len(x))
        x = x[0] if x else None
    return tuple(shape)


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a routes file; a user error names the file and what is wrong with it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"routes file not found: {p} (write one with `pathways-mm eval RUN --routes {p}`)")
    try:
        doc = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{p}: not a routes file (not JSON: {e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ConfigError(f"{p}: not a routes file (no \"format\": \"{FORMAT}\"; write one with `pathways-mm eval --routes`)")
    if doc.get("version") != VERSION:
        raise ConfigError(f"{p}: routes file version {doc.get('version')!r}; this pathways-mm reads version {VERSION}")
    try:
        n, m = len(doc["tasks"]), len(doc["modalities"])
        if not doc["layers"]:
            raise ValueError("no MoE layers")
        for layer in doc["layers"]:
            e = layer["num_experts"]
            for key, want in (("routes", (n, m, e)), ("dropped", (n, m, e)), ("tokens", (n, m)), ("entropy_sum", (n, m))):
                if _shape(layer[key]) != want:
                    raise ValueError(f"block {layer['block']} {key} has shape {_shape(layer[key])}, expected {want}")
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{p}: not a valid routes file ({type(e).__name__}: {e})") from None
    return doc


def check_comparable(a: dict[str, Any], b: dict[str, Any], name_a: str, name_b: str) -> None:
    """Two routes files can be compared layer by layer only with the same MoE layers and experts."""
    shape_a = [(layer["block"], layer["num_experts"]) for layer in a["layers"]]
    shape_b = [(layer["block"], layer["num_experts"]) for layer in b["layers"]]
    if shape_a != shape_b:
        raise ConfigError(
            f"cannot compare {name_a} and {name_b}: different MoE layers/experts "
            f"((block, experts) {shape_a} vs {shape_b}); compare routes of the same model shape"
        )
