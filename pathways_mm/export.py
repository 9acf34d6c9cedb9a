"""Export one task's sub-network: only the experts on its pathway, checked against the full model.

    pathways-mm export --from CKPT --task NAME --out DIR [--max-samples N]

The pathway of a task in a layer is the set of experts its tokens reach; of the task adapters
(add-task's), only the task's own slot is kept. They are counted on
the task's evaluation data, teacher-forced and while greedy decoding, so every forward the
parity check makes stays inside the kept experts. The sub-network keeps every router in full
(a few numbers per expert) and cuts its logits to the kept experts, so a token's experts and
combine weights are those of the full model bit for bit; it also drops the encoders of
modalities the task does not read. DIR gets model.pt (weights only) and export.json (config,
kept experts, parameter counts, parity result); `load_export(DIR)` rebuilds the model.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch

from pathways_mm import engine as ds_engine
from pathways_mm.checkpoint import atomic_write_text
from pathways_mm.collate import collate, prompt_only
from pathways_mm.config import ExperimentConfig, config_from_dict, data_root, one_process
from pathways_mm.data import encode, load_split
from pathways_mm.decoder import is_adapter
from pathways_mm.encoders.text import load_tokenizer
from pathways_mm.errors import ConfigError
from pathways_mm.model import PathwaysModel, build_model
from pathways_mm.routing import pathways, telemetry
from pathways_mm.tasks import get_task

INFO = "export.json"
WEIGHTS = "model.pt"
ENCODERS = {"image": "vision", "audio": "audio"}


def cut(model: PathwaysModel, keep: dict[str, list[int]], drop: list[str]) -> PathwaysModel:
    """`model`, cut in place: each MoE layer to `keep[layer]`, the `drop` encoders removed."""
    for name, layer in pathways.moe_layers(model):
        pathways.restrict_experts(layer, keep[name])
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


def _data(task, cfg: ExperimentConfig, tok, max_samples: int):
    samples = list(load_split(task, cfg.eval.split, data_root(cfg), cfg.data.seed))
    return samples[:max_samples] if max_samples else samples


@torch.no_grad()
def run_task(model, task, tid: int, samples: list[Any], cfg: ExperimentConfig, tok) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Teacher-forced target logits and greedy outputs of `samples`, in eval batches."""
    from pathways_mm.add_task import target_logits
    from pathways_mm.evaluate import greedy_generate

    logits, gens = [], []
    bs = cfg.eval.batch_size
    for start in range(0, len(samples), bs):
        examples = [encode(task, s) for s in samples[start : start + bs]]
        batch = collate(examples, [tid] * len(examples), tok, cfg.data.max_len, model_cfg=cfg.model)
        logits.append(target_logits(model, batch))
        gens += greedy_generate(model, prompt_only(batch, tok.pad_id).to(ds_engine.device()),
                                task.generation.max_new_tokens, tok.eos_id, tok.pad_id)  # fmt: skip
    return logits, gens


def run_export(source: str, task_name: str, out: str, max_samples: int | None = None) -> dict[str, Any]:
    tag_dir = ds_engine.resolve_checkpoint(source)
    meta = ds_engine.read_meta(tag_dir)
    table = meta["task_table"]
    if task_name not in table:
        raise ConfigError(f"task '{task_name}' is not in {tag_dir} (it holds {', '.join(sorted(table, key=table.get))})")
    cfg = one_process(config_from_dict(meta["config"]))
    if not cfg.model.moe.num_experts:
        raise ConfigError(f"{tag_dir} is a dense model: there are no experts to cut (export needs MoE layers)")
    out_dir = Path(out)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"--out {out_dir} exists and is not empty; choose a new directory")
    tok = load_tokenizer()
    from pathways_mm.train import check_compatible

    check_compatible(meta, cfg, tok, where=str(tag_dir / ds_engine.META_FILE))
    task, tid = get_task(task_name), table[task_name]
    model = build_model(cfg.model, tok.vocab_size)
    try:
        model.load_state_dict(ds_engine.load_full_state(tag_dir))
    except RuntimeError as e:
        raise ConfigError(f"{tag_dir}: weights do not fit the model its metadata describes ({str(e).splitlines()[0]:.200})") from None
    model.to(ds_engine.device()).eval()
    limit = cfg.eval.max_samples if max_samples is None else max_samples
    samples = _data(task, cfg, tok, limit)
    telemetry.enable(model)
    full_logits, full_gens = run_task(model, task, tid, samples, cfg, tok)
    keep = {name: sorted(torch.nonzero(c.route_counts[0, tid].sum(0)).flatten().tolist())
            for (name, _), c in zip(pathways.moe_layers(model), telemetry.read(model))}  # fmt: skip
    telemetry.enable(model, on=False)
    top_k = cfg.model.moe.top_k
    for name, ids in keep.items():  # a layer no token reached (no data): keep the task's best-prior experts
        if len(ids) < top_k:
            prior = model.get_submodule(name).router.pathway[tid].detach()
            keep[name] = sorted(set(ids) | set(torch.argsort(prior, descending=True)[:top_k].tolist()))
    drop = [attr for modality, attr in ENCODERS.items() if modality not in task.modalities]
    sub_cfg = own_adapters_only(cfg, tid)
    sub = build_model(sub_cfg.model, tok.vocab_size)
    sub.load_state_dict(adapter_slice(model.state_dict(), cfg, tid))
    sub = cut(sub.to(ds_engine.device()).eval(), keep, drop)
    sub_logits, sub_gens = run_task(sub, task, tid, samples, cfg, tok)
    diff = max((float((a - b).abs().max()) for a, b in zip(full_logits, sub_logits) if a.numel()), default=0.0)
    parity = {
        "samples": len(samples),
        "logits_bit_identical": all(torch.equal(a, b) for a, b in zip(full_logits, sub_logits)),
        "max_abs_diff": diff,
        "generations_equal": full_gens == sub_gens,
    }
    n_full = sum(p.numel() for p in model.parameters())
    n_sub = sum(p.numel() for p in sub.parameters())
    experts_full = sum(m.num_experts for _, m in pathways.moe_layers(model))
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
        "experts_full": experts_full,
        "parity": parity,
    }
    if not (parity["logits_bit_identical"] and parity["generations_equal"]):
        raise RuntimeError(f"export of {task_name}: the sub-network's outputs differ from the full model's "
                           f"(max |diff| {diff:.3g}); nothing was written")  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(sub.state_dict(), out_dir / WEIGHTS)
    atomic_write_text(out_dir / INFO, json.dumps(info, indent=2))
    print(format_export(info), file=sys.stderr)
    print(f"pathways-mm: wrote {out_dir / WEIGHTS} and {out_dir / INFO}", file=sys.stderr)
    return info


def format_export(info: dict[str, Any]) -> str:
    p = info["parity"]
    per_layer = ", ".join(f"{name.split('blocks.')[-1].split('.')[0]}: {ids}" for name, ids in info["kept_experts"].items())
    return "\n".join([
        f"export {info['task']}: kept {info['experts_kept']} of {info['experts_full']} experts (block: ids) {per_layer}"
        + (f"; dropped encoders: {', '.join(info['dropped_encoders'])}" if info["dropped_encoders"] else ""),
        f"parameters: {info['params_export']:,} of {info['params_full']:,} ({info['reduction_pct']:.1f}% fewer)",
        f"parity on {p['samples']} {info['task']} samples: logits bit-identical {'yes' if p['logits_bit_identical'] else 'NO'}, "
        f"greedy outputs equal {'yes' if p['generations_equal'] else 'NO'}, max |diff| {p['max_abs_diff']:.3g}",
    ])  # fmt: skip


def load_export(path: str | Path) -> tuple[PathwaysModel, dict[str, Any]]:
    """The exported sub-network (on the CPU, eval mode) and its export.json."""
    d = Path(path)
    try:
        info = json.loads((d / INFO).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{d}: not a pathways-mm export ({INFO}: {e})") from None
    cfg = config_from_dict(info["config"])
    tok = load_tokenizer()
    if info.get("tokenizer_hash") != tok.hash:
        raise ConfigError(f"{d}: exported with tokenizer {info.get('tokenizer_hash')}, this install has {tok.hash}")
    sub = cut(build_model(cfg.model, tok.vocab_size), info["kept_experts"], info["dropped_encoders"])
    sub.load_state_dict(torch.load(d / WEIGHTS, map_location="cpu", weights_only=True))
    return sub.eval(), info
