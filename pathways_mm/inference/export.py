"""Export a trained model as portable weights: a whole run, or one task's sub-network.

    pathways-mm export --from CKPT --out DIR                          # every task, every expert
    pathways-mm export --from CKPT --task NAME --out DIR [--max-samples N]

DIR gets model.safetensors (tensors only: loading it runs no code, unlike a pickle) and
export.json (the config, the task table, the tokenizer hash; for a task, what was kept). The
whole-run export is the checkpoint's weights as one process holds them (every expert), read back
and compared tensor by tensor before anything is written. `pathways_mm.load(DIR)` and
`load_export(DIR)` rebuild the model.

The pathway of a task in a layer is the set of experts its tokens reach; of the task adapters
(add-task's), only the task's own slot is kept. They are counted on the task's evaluation data,
teacher-forced and while greedy decoding, so every forward the parity check makes stays inside
the kept experts. The sub-network keeps every router in full (a few numbers per expert) and
cuts its logits to the kept experts, so a token's experts and combine weights are those of the
full model bit for bit; it also drops the encoders of modalities the task does not read; its
export.json also records the kept experts, the parameter counts and the parity result.

Shape suffixes: L MoE layers, T tasks, E experts.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError

from pathways_mm.config import ExperimentConfig, check_range, config_from_dict, data_root, one_process, to_dict
from pathways_mm.data.collate import collate, prompt_only
from pathways_mm.data.datasets import encode, load_split
from pathways_mm.data.declared import declare_tasks
from pathways_mm.encoders.text import TextTokenizer, load_tokenizer
from pathways_mm.errors import ConfigError
from pathways_mm.io import atomic_write_text, atomic_writer, load_json, output_dir
from pathways_mm.model.adapters import is_adapter
from pathways_mm.model.batch import Batch
from pathways_mm.model.generate import greedy_generate, target_logits
from pathways_mm.model.model import PathwaysModel, build_model
from pathways_mm.routing import moe_layers
from pathways_mm.routing.pathways import restrict_experts
from pathways_mm.runtime import checkpoint as ckpt
from pathways_mm.runtime import engine as ds_engine
from pathways_mm.runtime.timing import median_ms, time_round_robin
from pathways_mm.tasks import Task, ensure_loaded, get_task
from pathways_mm.training.routes import expert_counts

INFO = "export.json"
WEIGHTS = "model.safetensors"
FORMAT = 2  # 1: model.pt (a pickle), task exports only
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


def eval_batches(task: Task, tid: int, samples: list[Any], cfg: ExperimentConfig, tok: TextTokenizer) -> list[Batch]:
    """`samples` of task `tid` collated in eval batches (eval.batch_size), teacher-forced."""
    bs = cfg.eval.batch_size
    chunks = (samples[i : i + bs] for i in range(0, len(samples), bs))
    return [
        collate([encode(task, x) for x in chunk], [tid] * len(chunk), tok, cfg.data.max_len, model_cfg=cfg.model)
        for chunk in chunks
    ]


@torch.no_grad()
def run_task(
    model, task: Task, tid: int, samples: list[Any], cfg: ExperimentConfig, tok: TextTokenizer
) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Teacher-forced target logits and greedy outputs of `samples`, in eval batches."""
    logits, gens = [], []
    for batch in eval_batches(task, tid, samples, cfg, tok):
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
    source: str,
    task_name: str | None,
    out: str,
    max_samples: int | None = None,
    overrides: dict[str, Any] | None = None,
    time_rounds: int = 0,
) -> dict[str, Any]:
    """Export a checkpoint to DIR: the whole model (`task_name` None) or one task's sub-network
    (parity-checked); returns export.json.

    overrides: the user's --set values (nested), e.g. the plugins that register the task.
    time_rounds: with a task, also time greedy generation of the export against the full model.
    """
    check_range("eval.max_samples", max_samples, "--max-samples")
    if not 0 <= time_rounds <= 1000:
        raise ConfigError(f"--time-generation must be between 0 and 1000 rounds, got {time_rounds}")
    if time_rounds and task_name is None:
        raise ConfigError("--time-generation compares a task's export with the full model: give --task")
    out_dir = output_dir(out, "--out", empty=True)
    tok = load_tokenizer()
    opened = ckpt.open_checkpoint(source, tok, overrides)
    tag_dir, meta, cfg = opened
    cfg = one_process(cfg)
    table = meta["task_table"]
    if task_name is not None and task_name not in table:
        raise ConfigError(
            f"task '{task_name}' is not in {tag_dir} (it holds {', '.join(sorted(table, key=table.get))})"
        )
    if task_name is not None and not cfg.model.moe.num_experts:
        raise ConfigError(
            f"{tag_dir} is a dense model: there are no experts to cut (export it whole: leave out --task)"
        )
    ensure_loaded(cfg.plugins)  # the user's (--set plugins=[...]); a checkpoint never names them
    declare_tasks(cfg)  # data, not code: a checkpoint's declared tasks are safe to rebuild
    if task_name is not None:
        ckpt.checkpoint_tasks(opened, [task_name])  # registered, or which plugin to name
    model = build_model(cfg.model, tok.vocab_size)
    ckpt.load_weights(model, ckpt.load_full_state(tag_dir), tag_dir)
    head = {
        "format": FORMAT,
        "source": str(tag_dir),
        "step": meta["step"],
        "task_table": table,
        "tokenizer_hash": meta["tokenizer_hash"],
    }
    if task_name is None:
        info = head | {
            "kind": "run",
            "config": portable_config(cfg),
            "params": sum(p.numel() for p in model.parameters()),
        }
        save_export(out_dir, model.state_dict(), info)
        print(f"export: all {len(table)} tasks, {info['params']:,} parameters", file=sys.stderr)
    else:
        sub, info = cut_task(model, cfg, task_name, table[task_name], tok, max_samples, time_rounds)
        info = head | {"kind": "task", "config": portable_config(cfg) | {"model": info.pop("model")}} | info
        save_export(out_dir, sub.state_dict(), info)
        print(format_export(info), file=sys.stderr)
    print(f"pathways-mm: wrote {out_dir / WEIGHTS} and {out_dir / INFO}", file=sys.stderr)
    return info


def portable_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config as export.json keeps it: no path of the machine it was trained on."""
    data = to_dict(cfg)
    data.pop("source", None)
    return data


def cut_task(
    model: PathwaysModel,
    cfg: ExperimentConfig,
    task_name: str,
    tid: int,
    tok: TextTokenizer,
    max_samples: int | None,
    time_rounds: int = 0,
) -> tuple[PathwaysModel, dict[str, Any]]:
    """`task_name`'s sub-network of `model` and what export.json says of it; RuntimeError (nothing
    written) if its logits or greedy outputs differ from the full model's on the task's data."""
    task = get_task(task_name)
    model.to(ds_engine.device()).eval()
    limit = cfg.eval.max_samples if max_samples is None else max_samples
    samples = load_split(task, cfg.eval.split, data_root(cfg), cfg.data.seed)
    samples = list(samples[:limit] if limit else samples)
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
        "model": dataclasses.asdict(sub_cfg.model),
        "task": task_name,
        "task_id": tid,
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
    if time_rounds:
        info["generation"] = time_generation(model, sub, task, tid, samples, cfg, tok, time_rounds)
    return sub, info


def time_generation(
    full: PathwaysModel,
    sub: PathwaysModel,
    task: Task,
    tid: int,
    samples: list[Any],
    cfg: ExperimentConfig,
    tok: TextTokenizer,
    rounds: int,
) -> dict[str, Any]:
    """Greedy generation of `samples` (eval batches) by the full model and by the export, `rounds`
    times each after one untimed round, alternating which goes first: median ms per sample.

    Each token still runs top-k experts in both, so the compute per token is the same; what the
    export saves is weights (memory, cache) and the dispatch over fewer experts."""
    dev = ds_engine.device()
    prompts = [prompt_only(b, tok.pad_id).to(dev) for b in eval_batches(task, tid, samples, cfg, tok)]

    def generate(model: PathwaysModel) -> None:
        for batch in prompts:
            greedy_generate(model, batch, task.generation.max_new_tokens, tok.eos_id, tok.pad_id)

    with torch.no_grad():
        times = time_round_robin([lambda: generate(full), lambda: generate(sub)], dev, 1, rounds, alternate=True)
    full_ms, sub_ms = (ms / len(samples) for ms in median_ms(times))
    return {
        "samples": len(samples),
        "rounds": rounds,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "full_ms_per_sample": round(full_ms, 3),
        "export_ms_per_sample": round(sub_ms, 3),
        "speedup": round(full_ms / sub_ms, 3),
    }


def save_export(out_dir: Path, state: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """model.safetensors, checked by reading it back, then export.json (written last: a folder
    without it is not an export)."""
    # own copies: the experts' per-expert views share one stacked tensor, which safetensors refuses
    tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in state.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_writer(out_dir / WEIGHTS, "wb") as f:
        f.write(safetensors.torch.save(tensors, metadata={"format": "pt", "pathways_mm": f"export-v{FORMAT}"}))
    back = read_weights(out_dir / WEIGHTS)
    bad = [n for n, t in tensors.items() if n not in back or not torch.equal(back[n], t)]
    if bad or len(back) != len(tensors):
        raise RuntimeError(f"{out_dir / WEIGHTS}: read back differs from the model in {bad[:3]}; do not use it")
    atomic_write_text(out_dir / INFO, json.dumps(info, indent=2))


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except (OSError, SafetensorError) as e:
        raise ConfigError(f"{path}: unreadable weights ({e})") from None


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
            *(
                [
                    f"greedy generation ({g['samples']} samples, median of {g['rounds']} rounds, {g['device']}): "
                    f"{g['export_ms_per_sample']:.2f} ms/sample exported vs {g['full_ms_per_sample']:.2f} full "
                    f"({g['speedup']:.2f}x)"
                ]
                if (g := info.get("generation"))
                else []
            ),
        ]
    )


def load_export(path: str | Path) -> tuple[PathwaysModel, dict[str, Any]]:
    """The exported model (on the CPU, eval mode) and its export.json: the whole run, or one
    task's sub-network."""
    d = Path(path)
    info = load_json(d / INFO, "pathways-mm export description")
    if not isinstance(info, dict) or not isinstance(info.get("config"), dict):
        raise ConfigError(f"{d / INFO}: not a pathways-mm export (no config)")
    if info.get("format") != FORMAT:
        raise ConfigError(f"{d}: export format {info.get('format', 1)}, this pathways-mm reads {FORMAT}; export again")
    cfg = config_from_dict(info["config"])
    tok = load_tokenizer()
    if info.get("tokenizer_hash") != tok.hash:
        raise ConfigError(f"{d}: exported with tokenizer {info.get('tokenizer_hash')}, this install has {tok.hash}")
    model = build_model(cfg.model, tok.vocab_size)
    if info.get("kind") == "task":
        model = cut(model, info["kept_experts"], info["dropped_encoders"])
    ckpt.load_weights(model, read_weights(d / WEIGHTS), d)
    return model.eval(), info
