"""Export one task's sub-network: only the experts on its pathway, checked against the full model.

    pathways-mm export --from CKPT --task NAME --out DIR [--max-samples N]

The pathway of a task in a layer is the set of experts its tokens reach; of the task adapters
(add-task's), only the task's own slot is kept. They are counted on the task's evaluation data,
teacher-forced and while greedy decoding, so every forward the parity check makes stays inside
the kept experts. The sub-network keeps every router in full (a few numbers per expert) and
cuts its logits to the kept experts, so a token's experts and combine weights are those of the
full model bit for bit; it also drops the encoders of modalities the task does not read. DIR
gets model.pt (weights only) and export.json (config, kept experts, parameter counts, parity
result); `load_export(DIR)` rebuilds the model.

Shape suffixes: L MoE layers, T tasks, E experts.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch

from pathways_mm.config import ExperimentConfig, check_range, config_from_dict, data_root, one_process
from pathways_mm.data.collate import collate, prompt_only
from pathways_mm.data.datasets import encode, load_split
from pathways_mm.encoders.text import TextTokenizer, load_tokenizer
from pathways_mm.errors import ConfigError
from pathways_mm.io import atomic_write_text, atomic_writer, load_json, output_dir
from pathways_mm.model.adapters import is_adapter
from pathways_mm.model.generate import greedy_generate, target_logits
from pathways_mm.model.model import PathwaysModel, build_model
from pathways_mm.routing import moe_layers
from pathways_mm.routing.pathways import restrict_experts
from pathways_mm.runtime import checkpoint as ckpt
from pathways_mm.runtime import engine as ds_engine
from pathways_mm.tasks import Task, ensure_loaded
from pathways_mm.training.routes import expert_counts

INFO = "export.json"
WEIGHTS = "model.pt"
ENCODERS = {"image": "vision", "audio": "audio"}


def cut(model: PathwaysModel, keep: dict[str, list[int]], drop: list[str]) -> PathwaysModel:
    """`model`, cut in place: each MoE layer to `keep[layer]`, the `drop` encoders removed."""
    for name, layer in moe_layers(model):
        restrict_experts(layer, keep[name])
    for attr in drop:
        setattr(model, attr, None)
    return model


def own_adapters_only(cfg: ExperimentConfig, tid: int) -> ExperimentConfig:
    """The config with only task `tid`'s adapter slot (none if it has none): other tasks'
    adapters never touch this task's sequences."""
    m = cfg.model
    tasks = (tid,) if tid in m.adapter_tasks else ()
    model = dataclasses.replace(m, adapter_tasks=tasks, adapter_rank=m.adapter_rank if tasks else 0)
    return cfg.replace(model=model)


def adapter_slice(state: dict[str, torch.Tensor], cfg: ExperimentConfig, tid: int) -> dict[str, torch.Tensor]:
    """`state` with each adapter weight cut to task `tid`'s slot (dropped if it has none)."""
    slots = cfg.model.adapter_tasks
    out = {}
    for name, value in state.items():
        if not is_adapter(name):
            out[name] = value
        elif tid in slots:
            i = slots.index(tid)
            out[name] = value[i : i + 1]
    return out


@torch.no_grad()
def run_task(
    model, task: Task, tid: int, samples: list[Any], cfg: ExperimentConfig, tok: TextTokenizer
) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Teacher-forced target logits and greedy outputs of `samples`, in eval batches."""
    logits, gens = [], []
    bs = cfg.eval.batch_size
    for start in range(0, len(samples), bs):
        examples = [encode(task, s) for s in samples[start : start + bs]]
        batch = collate(examples, [tid] * len(examples), tok, cfg.data.max_len, model_cfg=cfg.model)
        logits.append(target_logits(model, batch))
        gens += greedy_generate(
            model,
            prompt_only(batch, tok.pad_id).to(ds_engine.device()),
            task.generation.max_new_tokens,
            tok.eos_id,
            tok.pad_id,
        )
    return logits, gens


def pathway_experts(model: PathwaysModel, tid: int, counts_LTE: torch.Tensor, top_k: int) -> dict[str, list[int]]:
    """Per MoE layer, the experts task `tid` reached; a layer no token reached (no data) keeps the
    task's best-prior experts."""
    keep = {}
    for i, (name, layer) in enumerate(moe_layers(model)):
        ids = torch.nonzero(counts_LTE[i, tid]).flatten().tolist()
        if len(ids) < top_k:
            prior = layer.router.pathway[tid].detach()
            ids = sorted(set(ids) | set(torch.argsort(prior, descending=True)[:top_k].tolist()))
        keep[name] = ids
    return keep


def _parity(full: tuple[list, list], sub: tuple[list, list], num_samples: int) -> dict[str, Any]:
    (full_logits, full_gens), (sub_logits, sub_gens) = full, sub
    diff = max((float((a - b).abs().max()) for a, b in zip(full_logits, sub_logits) if a.numel()), default=0.0)
    return {
        "samples": num_samples,
        "logits_bit_identical": all(torch.equal(a, b) for a, b in zip(full_logits, sub_logits)),
        "max_abs_diff": diff,
        "generations_equal": full_gens == sub_gens,
    }


def run_export(
    source: str, task_name: str, out: str, max_samples: int | None = None, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Cut `task_name`'s sub-network out of a checkpoint, check parity, write DIR; returns export.json.

    overrides: the user's --set values (nested), e.g. the plugins that register the task.
    """
    check_range("eval.max_samples", max_samples, "--max-samples")
    out_dir = output_dir(out, "--out", empty=True)
    tok = load_tokenizer()
    opened = ckpt.open_checkpoint(source, tok, overrides)
    tag_dir, meta, cfg = opened
    cfg = one_process(cfg)
    table = meta["task_table"]
    if task_name not in table:
        raise ConfigError(
            f"task '{task_name}' is not in {tag_dir} (it holds {', '.join(sorted(table, key=table.get))})"
        )
    if not cfg.model.moe.num_experts:
        raise ConfigError(f"{tag_dir} is a dense model: there are no experts to cut (export needs MoE layers)")
    ensure_loaded(cfg.plugins)  # the user's (--set plugins=[...]); a checkpoint never names them
    (task,), tid = ckpt.checkpoint_tasks(opened, [task_name]), table[task_name]
    model = build_model(cfg.model, tok.vocab_size)
    ckpt.load_weights(model, ckpt.load_full_state(tag_dir), tag_dir)
    model.to(ds_engine.device()).eval()
    limit = cfg.eval.max_samples if max_samples is None else max_samples
    samples = list(load_split(task, cfg.eval.split, data_root(cfg), cfg.data.seed))
    samples = samples[:limit] if limit else samples
    full_out: list = []
    counts = expert_counts(model, lambda: full_out.extend(run_task(model, task, tid, samples, cfg, tok)))
    keep = pathway_experts(model, tid, counts, cfg.model.moe.top_k)
    drop = [attr for modality, attr in ENCODERS.items() if modality not in task.modalities]
    sub_cfg = own_adapters_only(cfg, tid)
    sub = build_model(sub_cfg.model, tok.vocab_size)
    sub.load_state_dict(adapter_slice(model.state_dict(), cfg, tid))
    sub = cut(sub.to(ds_engine.device()).eval(), keep, drop)
    parity = _parity(tuple(full_out), run_task(sub, task, tid, samples, cfg, tok), len(samples))
    n_full, n_sub = (sum(p.numel() for p in m.parameters()) for m in (model, sub))
    info = {
        "source": str(tag_dir),
        "task": task_name,
        "task_id": tid,
        "config": meta["config"] | {"model": dataclasses.asdict(sub_cfg.model)},
        "tokenizer_hash": meta["tokenizer_hash"],
        "kept_experts": keep,
        "dropped_encoders": drop,
        "params_full": n_full,
        "params_export": n_sub,
        "reduction_pct": round(100.0 * (n_full - n_sub) / n_full, 2),
        "experts_kept": sum(len(v) for v in keep.values()),
        "experts_full": sum(m.num_experts for _, m in moe_layers(model)),
        "parity": parity,
    }
    if not (parity["logits_bit_identical"] and parity["generations_equal"]):
        raise RuntimeError(
            f"export of {task_name}: the sub-network's outputs differ from the full model's "
            f"(max |diff| {parity['max_abs_diff']:.3g}); nothing was written"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_writer(out_dir / WEIGHTS, "wb") as f:
        torch.save(sub.state_dict(), f)
    atomic_write_text(out_dir / INFO, json.dumps(info, indent=2))
    print(format_export(info), file=sys.stderr)
    print(f"pathways-mm: wrote {out_dir / WEIGHTS} and {out_dir / INFO}", file=sys.stderr)
    return info


def format_export(info: dict[str, Any]) -> str:
    p = info["parity"]
    per_layer = ", ".join(
        f"{name.split('blocks.')[-1].split('.')[0]}: {ids}" for name, ids in info["kept_experts"].items()
    )
    return "\n".join(
        [
            f"export {info['task']}: kept {info['experts_kept']} of {info['experts_full']} experts (block: ids) {per_layer}"
            + (f"; dropped encoders: {', '.join(info['dropped_encoders'])}" if info["dropped_encoders"] else ""),
            f"parameters: {info['params_export']:,} of {info['params_full']:,} ({info['reduction_pct']:.1f}% fewer)",
            f"parity on {p['samples']} {info['task']} samples: logits bit-identical {'yes' if p['logits_bit_identical'] else 'NO'}, "
            f"greedy outputs equal {'yes' if p['generations_equal'] else 'NO'}, max |diff| {p['max_abs_diff']:.3g}",
        ]
    )


def load_export(path: str | Path) -> tuple[PathwaysModel, dict[str, Any]]:
    """The exported sub-network (on the CPU, eval mode) and its export.json."""
    d = Path(path)
    info = load_json(d / INFO, "pathways-mm export description")
    if not isinstance(info, dict) or not isinstance(info.get("config"), dict):
        raise ConfigError(f"{d / INFO}: not a pathways-mm export (no config)")
    cfg = config_from_dict(info["config"])
    tok = load_tokenizer()
    if info.get("tokenizer_hash") != tok.hash:
        raise ConfigError(f"{d}: exported with tokenizer {info.get('tokenizer_hash')}, this install has {tok.hash}")
    sub = cut(build_model(cfg.model, tok.vocab_size), info["kept_experts"], info["dropped_encoders"])
    sub.load_state_dict(torch.load(d / WEIGHTS, map_location="cpu", weights_only=True))
    return sub.eval(), info
