"""Routes files: where each task's tokens went in every MoE layer, as one JSON document.

The schema (docs/routes.md): format/version, the model's identity, the checkpoint, the data
that was counted, task and modality names, and per MoE layer the counts of routes (task,
modality, expert), dropped routes, tokens by their top-1 expert ("top1"; files written before it
lack it and still load), tokens and summed gate entropy. `training.routes` writes
them from route telemetry; `viz` reads them. No torch here: drawing needs none.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pathways_mm.config import MOE_RUNTIME_KEYS, ExperimentConfig, to_dict
from pathways_mm.errors import ConfigError, shorten
from pathways_mm.io import atomic_write_text, existing, load_json
from pathways_mm.tasks.base import MODALITIES

FORMAT = "pathways-mm-routes"
VERSION = 1
ENTROPY_SCALE = 1_000_000  # route telemetry counts gate entropy in micro-nats (integers sum exactly)
# Model keys added after routes files were first written, at the value that gives the older model:
# left out of the hash there, so a model that does not use them keeps the hash it always had.
_LATER_KEYS = {"shared_d_ff": 0}


def model_identity(cfg: ExperimentConfig) -> dict[str, Any]:
    """The model a routes file describes; `hash` ignores how MoE layers run (impl, ep_size, ...)."""
    model = to_dict(cfg.model)
    later_at_default = {k for k, v in _LATER_KEYS.items() if model["moe"].get(k) == v}
    moe = {k: v for k, v in model["moe"].items() if k not in MOE_RUNTIME_KEYS and k not in later_at_default}
    shape = {**model, "moe": moe}
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]
    return {"name": cfg.name, "hash": digest, "num_blocks": cfg.model.n_layers, "config": model}


def document(
    layers: Sequence[tuple[int, Any, Any]],
    cfg: ExperimentConfig,
    task_names: Sequence[str],
    checkpoint: dict[str, Any],
    data: dict[str, Any],
) -> dict[str, Any]:
    """The routes JSON from (block, route_counts [2 or 3, tasks, modalities, experts]: routes,
    dropped, top-1; token_stats [2, tasks, modalities]) per MoE layer: nested lists or anything
    with `.tolist()`."""
    n = len(task_names)
    out = []
    for block, counts, stats in layers:
        counts, stats = _as_list(counts), _as_list(stats)
        out.append(
            {
                "block": block,
                "num_experts": len(counts[0][0][0]),
                "top_k": cfg.model.moe.top_k,
                "routes": counts[0][:n],
                "dropped": counts[1][:n],
                "tokens": stats[0][:n],
                "entropy_sum": [[v / ENTROPY_SCALE for v in row] for row in stats[1][:n]],
            }
        )
        if len(counts) > 2:
            out[-1]["top1"] = counts[2][:n]
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": model_identity(cfg),
        "checkpoint": checkpoint,
        "data": data,
        "tasks": list(task_names),
        "modalities": list(MODALITIES),
        "layers": out,
    }


def _as_list(x: Any) -> list:
    return x.tolist() if hasattr(x, "tolist") else x


def write(path: str | os.PathLike, doc: dict[str, Any]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(p, json.dumps(doc, indent=1))
    return p


def _shape(x: Any) -> tuple[int, ...]:
    shape = []
    while isinstance(x, list) and len(shape) < 8:
        shape.append(len(x))
        x = x[0] if x else None
    return tuple(shape)


def _grid(x: Any, shape: tuple[int, ...], what: str) -> None:
    """`x` is a nested list of exactly `shape` whose every cell is a finite number >= 0."""
    if not shape:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
            raise ValueError(f"{what} is {shorten(x)}, not a count")
        return
    if not isinstance(x, list) or len(x) != shape[0]:
        raise ValueError(f"{what} has shape {_shape(x)}, expected {shape}")
    for i, row in enumerate(x):
        _grid(row, shape[1:], f"{what}[{i}]")


def _names(x: Any, what: str) -> list[str]:
    if not isinstance(x, list) or not x or not all(isinstance(n, str) and n for n in x) or len(set(x)) != len(x):
        raise ValueError(f"{what} must be a list of distinct names, got {shorten(x)}")
    return x


def _count(layer: dict[str, Any], key: str, lowest: int) -> int:
    value = layer.get(key)
    if type(value) is not int or value < lowest:
        raise ValueError(f"a layer's {key!r} must be an integer >= {lowest}, got {shorten(value)}")
    return value


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a routes file, every cell of it; a user error names the file and what is wrong."""
    p = existing(path, "routes file", f"write one with `pathways-mm eval RUN --routes {path}`")
    doc = load_json(p, "routes file")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ConfigError(
            f'{p}: not a routes file (no "format": "{FORMAT}"; write one with `pathways-mm eval --routes`)'
        )
    if doc.get("version") != VERSION:
        raise ConfigError(
            f"{p}: routes file version {shorten(doc.get('version'))}; this pathways-mm reads version {VERSION}"
        )
    try:
        n, m = len(_names(doc.get("tasks"), "tasks")), len(_names(doc.get("modalities"), "modalities"))
        if not isinstance(doc.get("model"), dict):
            raise ValueError("no model section")
        if not isinstance(doc.get("checkpoint"), (dict, type(None))) or not isinstance(doc.get("data", {}), dict):
            raise ValueError("checkpoint and data must be objects")
        layers = doc.get("layers")
        if not isinstance(layers, list) or not layers or not all(isinstance(layer, dict) for layer in layers):
            raise ValueError("layers must be a non-empty list of MoE layers")
        blocks = [_count(layer, "block", 0) for layer in layers]
        if len(set(blocks)) != len(blocks):
            raise ValueError(f"a block appears twice in {blocks}")
        for layer, block in zip(layers, blocks):
            e = _count(layer, "num_experts", 1)
            for key, want in (
                ("routes", (n, m, e)),
                ("dropped", (n, m, e)),
                ("tokens", (n, m)),
                ("entropy_sum", (n, m)),
            ):
                _grid(layer.get(key), want, f"block {block} {key}")
            if "top1" in layer:  # optional: older files have no top-1 counts
                _grid(layer["top1"], (n, m, e), f"block {block} top1")
    except ValueError as e:
        raise ConfigError(f"{p}: not a valid routes file ({e})") from None
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
