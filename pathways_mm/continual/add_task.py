"""Add a task to a trained model without touching what the old tasks use.

    pathways-mm add-task --from CKPT --task NAME [--grow-experts G] [--steps N] [--out-dir DIR] [--resume]
    deepspeed --num_gpus N --module pathways_mm.cli add-task --from CKPT --task NAME ...

The new task gets its own pathway (task-embedding row and routing prior in every MoE layer),
started as a copy of the closest old task's: the old pathway under which the new task's
training samples have the lowest loss. With `--grow-experts G` every MoE layer gains G experts
that only the new task may route to, each starting as a copy of an expert the closest pathway
sent the new task's tokens to. Everything else is frozen (attention, norms, embeddings,
encoders, token router rows and experts of the old pathways), so the old tasks' outputs stay
bit-identical; the run checks that before it saves. With `--set train.save_every=N` it saves
every N steps, and `--resume` continues a killed add-task from its newest checkpoint (give the
same source and flags: the grown model is rebuilt, then the checkpoint's weights and optimizer
state are loaded into it). A report (printed and add_task_report.json) gives old-task metrics
before and after, the new task's metrics, how much of its routing lands on reused experts, and
the parameters added.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from pathways_mm import dist
from pathways_mm.config import (
    ContinualConfig,
    ExperimentConfig,
    check_range,
    data_root,
    load_config,
    model_differences,
    one_process,
    to_dict,
)
from pathways_mm.continual import surgery
from pathways_mm.data.collate import collate
from pathways_mm.data.datasets import encode, load_split
from pathways_mm.data.declared import declare_tasks
from pathways_mm.encoders.text import TextTokenizer, load_tokenizer
from pathways_mm.errors import ConfigError
from pathways_mm.io import atomic_write_text, output_dir
from pathways_mm.model.batch import Batch
from pathways_mm.model.generate import target_logits
from pathways_mm.model.model import build_model, param_counts
from pathways_mm.routing import moe_layers
from pathways_mm.routing.pathways import to_local
from pathways_mm.routing.router import fewest_covering
from pathways_mm.runtime import checkpoint as ckpt
from pathways_mm.runtime import compat
from pathways_mm.runtime import engine as ds_engine
from pathways_mm.tasks import Task, ensure_loaded, get_task
from pathways_mm.training.evaluate import evaluate
from pathways_mm.training.loop import Hooks, run, run_files
from pathways_mm.training.losses import forward_loss
from pathways_mm.training.routes import expert_counts

PROBES = 16  # samples per task in the bit-identity probe and the closest-pathway search
REPORT = "add_task_report.json"


@dataclass(frozen=True, kw_only=True)
class AddTaskOptions:
    """What `pathways-mm add-task` asks for (its flags)."""

    task: str
    grow_experts: int = 0
    steps: int = 300
    out_dir: str | None = None  # default: RUN+TASK next to the source run
    config: str | None = None  # a YAML whose train/data/eval settings replace the checkpoint's
    overrides: dict[str, Any] = field(default_factory=dict)  # --set values, parsed
    freeze: bool = True  # False: --train-all, the fine-tuning baseline
    adapter_rank: int = 0
    resume: bool = False  # continue a killed add-task in out_dir from its newest checkpoint
    start_from: str | None = None  # the old task whose pathway the new one starts from (None: the closest)


class Request(NamedTuple):
    """A checked add-task request: the source checkpoint and the configs before and after."""

    tag_dir: Path
    meta: dict[str, Any]
    old: ExperimentConfig  # the source run's config (with the user's train/data/eval settings)
    new: ExperimentConfig  # the grown model's run


def probe_batch(task: Task, tid: int, samples: list[Any], cfg: ExperimentConfig, tok: TextTokenizer) -> Batch:
    """A deterministic teacher-forced batch of `task` (no augmentation: no rng)."""
    examples = [encode(task, s) for s in samples]
    return collate(examples, [tid] * len(examples), tok, cfg.data.max_len, model_cfg=cfg.model)


def new_config(old: ExperimentConfig, opts: AddTaskOptions, out_dir: str) -> ExperimentConfig:
    """The config of the grown model: one more task, G more experts, its adapters, only it sampled."""
    task, grow, steps = opts.task, opts.grow_experts, opts.steps
    model = old.model
    if opts.adapter_rank:
        tasks = (*model.adapter_tasks, len(old.tasks))
        model = dataclasses.replace(model, adapter_rank=opts.adapter_rank, adapter_tasks=tasks)
    moe = model.moe
    groups = dict(moe.expert_groups) or {"base": moe.num_experts}
    if grow:
        groups[task] = grow
        moe = dataclasses.replace(moe, num_experts=moe.num_experts + grow, expert_groups=groups)
    weights = {t: 0.0 for t in old.tasks} | {task: 1.0}
    # No weight decay: decay would shrink frozen weights too (they sit in the same tensors as trainable rows).
    warmup = min(old.train.warmup_steps, max(1, steps // 10))
    train = dataclasses.replace(old.train, steps=steps, out_dir=out_dir, weight_decay=0.0, warmup_steps=warmup)
    train = dataclasses.replace(train, eval_every=0)  # save_every stays: the points --resume continues from
    return old.replace(
        name=f"{old.name}+{task}" if opts.freeze else f"{old.name}+{task}(finetune)",
        tasks=(*old.tasks, task),
        model=dataclasses.replace(model, moe=moe),
        mixture=dataclasses.replace(old.mixture, weights=weights),
        train=train,
        eval=dataclasses.replace(old.eval, routes=False),
        continual=ContinualConfig(),
    )


class AddTaskHooks(Hooks):
    """Loads and grows the source weights, freezes, checks the old outputs, measures reuse."""

    def __init__(self, req: Request, opts: AddTaskOptions, tok: TextTokenizer):
        self.tag_dir, self.old_cfg, self.cfg = req.tag_dir, req.old, req.new
        self.task, self.grow, self.freeze, self.tok = opts.task, opts.grow_experts, opts.freeze, tok
        self.start_from = opts.start_from
        pathways = req.meta.get("pathways")
        self.old_pathways = pathways if isinstance(pathways, dict) else None  # carried forward into the new record
        self.old_tasks = [get_task(t) for t in self.old_cfg.tasks]
        self.new_tid = len(self.old_cfg.tasks)
        self.num_old_experts = self.old_cfg.model.moe.num_experts
        self.info: dict[str, Any] = {}

    def _samples(self, task: Task, split: str, n: int) -> list[Any]:
        return list(load_split(task, split, data_root(self.cfg), self.cfg.data.seed)[:n])

    def _closest(self, full: dict[str, torch.Tensor]) -> tuple[int, dict, dict[str, float], dict]:
        """On a one-process copy: the old task under whose embedding the new task's training samples
        have the lowest loss, and per MoE layer the experts those samples prefer (`_preferred`)."""
        model = build_model(one_process(self.old_cfg).model, self.tok.vocab_size)
        ckpt.load_weights(model, full, self.tag_dir)
        model.to(ds_engine.device()).eval()
        task = get_task(self.task)
        samples = self._samples(task, "train", 4 * PROBES)
        losses = {}
        with torch.no_grad():
            for tid, old in enumerate(self.old_cfg.tasks):
                batch = probe_batch(task, tid, samples, self.cfg, self.tok).to(ds_engine.device())
                losses[old] = forward_loss(model, batch).lm_loss.item()
        closest = self.old_cfg.tasks.index(self.start_from or min(losses, key=losses.get))
        seeds, start = self._preferred(model, probe_batch(task, closest, samples, self.cfg, self.tok), closest)
        return closest, seeds, losses, start

    def _preferred(self, model, batch, closest: int) -> tuple[dict[str, list[int]], dict]:
        """Where the new task's tokens go under plain token routing (the closest task's embedding,
        no prior, every old expert allowed): per layer the experts by use, and the new pathway's
        start: a prior of centred log route shares and, if the model keeps hard pathways
        (mask_mass > 0), only the fewest experts carrying mask_mass of those routes."""
        layers = moe_layers(model)
        with torch.no_grad():
            for _, layer in layers:  # `model` is a scratch copy: the closest task's row may change
                layer.router.pathway[closest] = 0.0
                layer.router.allowed[closest] = True
            counts_LE = expert_counts(model, lambda: model(batch.to(ds_engine.device())))[:, closest].double()
        moe = self.old_cfg.model.moe
        seeds, start = {}, {}
        for i, (name, _) in enumerate(layers):
            share_E = (counts_LE[i] + 1) / (counts_LE[i].sum() + counts_LE.shape[1])
            prior_E = (share_E.log() - share_E.log().mean()).float()
            allowed_E = torch.ones(counts_LE.shape[1], dtype=torch.bool)
            if moe.mask_mass > 0:
                most = moe.num_experts // 2 if moe.mask_max_experts is None else moe.mask_max_experts
                allowed_E = fewest_covering(counts_LE[i][None], allowed_E[None], moe.mask_mass, moe.top_k, most)[0]
            seeds[name] = torch.argsort(counts_LE[i], descending=True, stable=True).tolist()
            start[name] = (prior_E, allowed_E)
        return seeds, start

    def model_built(self, model, rank: int, world: int) -> None:
        full = ckpt.load_full_state(self.tag_dir)
        closest, seeds, losses, start = dist.broadcast(self._closest(full))  # every rank must grow the same way
        layers = [name for name, _ in moe_layers(model)]
        grown, growth = surgery.grow(full, layers, self.num_old_experts, self.grow, self.new_tid, closest, seeds, start)
        grown = surgery.with_adapters(grown, model.state_dict())
        self.ep_rank = rank % self.cfg.model.moe.ep_size
        ckpt.load_weights(model, to_local(grown, model, self.ep_rank), self.tag_dir)
        self.growth = growth
        self.info.update(
            closest=self.old_cfg.tasks[closest],
            closest_losses={k: round(v, 4) for k, v in losses.items()},
            new_experts=growth.new_experts,
            copied_from=growth.copied_from,
            start_experts={name: torch.nonzero(allowed).flatten().tolist() for name, (_, allowed) in start.items()},
        )
        adapters = self.cfg.model.adapter_tasks
        slot = adapters.index(self.new_tid) if self.new_tid in adapters else None
        self.frozen = (
            surgery.freeze_for_new_task(model, self.new_tid, growth.new_experts, self.ep_rank, slot)
            if self.freeze
            else None
        )
        self.trainable = self.frozen.trainable if self.frozen else sum(p.numel() for p in model.parameters())

    def engine_ready(self, engine, ts, tok) -> None:
        layers = moe_layers(engine.module)
        if layers and self.cfg.model.moe.ep_size > 1:
            assert compat.expert_parallel_rank(layers[0][1].expert_group_name) == self.ep_rank
        self.probes = [
            probe_batch(t, i, self._samples(t, self.cfg.eval.split, PROBES), self.cfg, self.tok)
            for i, t in enumerate(self.old_tasks)
        ]
        self.before = [target_logits(engine, b) for b in self.probes]
        self.before_metrics = evaluate(engine, self.cfg, ts.tasks[:-1], tok, train_sets=ts.train[:-1])

    def trained(self, engine) -> None:
        after = [target_logits(engine, b) for b in self.probes]
        same = [bool(torch.equal(a, b)) for a, b in zip(self.before, after)]
        moved = surgery.changed_frozen(engine.module, self.frozen) if self.frozen else []
        flag = dist.all_reduce_(torch.tensor([int(all(same) and not moved)], device=ds_engine.device()), op="min")
        self.info["old_outputs_bit_identical"] = bool(flag.item())
        if self.freeze and not flag.item():
            raise RuntimeError(
                f"add-task changed frozen weights {moved[:3]} or old outputs "
                f"{[t for t, s in zip(self.old_cfg.tasks, same) if not s]}; nothing was saved"
            )
        self.info["reuse"] = self._reuse(engine)

    def _reuse(self, engine) -> dict[str, Any]:
        """Share of the new task's routes (test samples, teacher-forced) that land on old experts."""
        task = get_task(self.task)
        batch = probe_batch(
            task, self.new_tid, self._samples(task, self.cfg.eval.split, 4 * PROBES), self.cfg, self.tok
        )
        counts = expert_counts(engine, lambda: target_logits(engine, batch), all_ranks=True)[:, self.new_tid].double()
        old = counts[:, : self.num_old_experts].sum(1) / counts.sum(1).clamp(min=1)
        return {
            "share_on_old_experts": round(float(old.mean()), 4),
            "per_layer": [round(float(v), 4) for v in old],
            "old_experts_used": int((counts[:, : self.num_old_experts] > 0).sum()),
        }

    def meta(self) -> dict[str, Any]:
        return {"pathways": pathway_record(self.cfg, self.old_pathways, self.task, self.growth, self.freeze)}


def pathway_record(
    cfg: ExperimentConfig, old: dict[str, Any] | None, task: str, growth, freeze: bool
) -> dict[str, Any]:
    """Per task: id, frozen, the experts it owns (the same ids in every MoE layer), where it came from."""
    rec = {name: dict(v) for name, v in (old or {}).items()}
    for i, name in enumerate(cfg.tasks[:-1]):
        rec.setdefault(name, {"id": i, "owns_experts": [], "added_by": "train"})
        rec[name]["frozen"] = freeze or rec[name].get("frozen", False)
    rec[task] = {
        "id": len(cfg.tasks) - 1,
        "owns_experts": growth.new_experts,
        "frozen": False,
        "added_by": "add-task" if freeze else "finetune",
    }
    return rec


def _with_user_settings(old: ExperimentConfig, config: str | None, overrides: dict[str, Any]) -> ExperimentConfig:
    """The source config with the user's train/data/eval settings (from `--config` or `--set`)."""
    if config is not None:  # training settings from a file; its model must be the checkpoint's
        user = load_config(config, overrides)
        diff = model_differences(to_dict(old.model), user.model)
        if diff:
            raise ConfigError(
                f"{config}: model differs from the checkpoint's in {', '.join(diff)} "
                f"(the checkpoint is a {old.model.size} model); use a config of the same model size"
            )
        declare = {**old.declare, **user.declare}  # the new task may be one the user's config declares
        return old.replace(
            data=user.data,
            eval=user.eval,
            train=user.train,
            seed=user.seed,
            plugins=user.plugins,
            declare=declare,
            source=user.source,
        )
    return old


def _check_request(old: ExperimentConfig, tag_dir: Path, table: dict[str, int], opts: AddTaskOptions) -> None:
    task, grow, adapter_rank = opts.task, opts.grow_experts, opts.adapter_rank
    if task in table:
        raise ConfigError(f"task '{task}' already exists in {tag_dir} (id {table[task]}); add a task it does not have")
    get_task(task)  # unknown task: ConfigError naming the registered ones
    moe = old.model.moe
    if not moe.num_experts:
        raise ConfigError(
            f"{tag_dir} is a dense model: add-task needs MoE layers (train with model.moe.num_experts > 0)"
        )
    if (moe.num_experts + grow) % moe.ep_size:
        raise ConfigError(
            f"--grow-experts {grow}: {moe.num_experts} + {grow} experts do not split over ep_size="
            f"{moe.ep_size}; use a multiple of {moe.ep_size}"
        )
    if len(table) + 1 > old.model.max_tasks:
        raise ConfigError(f"{tag_dir} already holds model.max_tasks={old.model.max_tasks} tasks; no pathway is free")
    if opts.start_from is not None and opts.start_from not in old.tasks:
        raise ConfigError(f"--start-from {opts.start_from}: not a task of {tag_dir}; it has {', '.join(old.tasks)}")
    if adapter_rank and old.model.adapter_rank not in (0, adapter_rank):
        raise ConfigError(
            f"--adapter-rank {adapter_rank}: the checkpoint's adapters have rank {old.model.adapter_rank}; "
            f"use {old.model.adapter_rank} (or 0 for none)"
        )


def _out_dir(tag_dir: Path, task: str, out_dir: str | None, resume: bool) -> Path:
    run_dir = tag_dir.parent.parent
    out = Path(out_dir) if out_dir else run_dir.with_name(f"{run_dir.name}+{task}")
    if out.resolve() == run_dir.resolve() or run_dir.resolve() in out.resolve().parents:
        raise ConfigError(f"--out-dir {out} is inside the source run {run_dir}; write the new model elsewhere")
    output_dir(out, "--out-dir")
    found = run_files(out)
    if found and not resume:
        raise ConfigError(
            f"--out-dir {out} already holds a run ({', '.join(found)}); continue it with --resume, "
            "or choose another directory"
        )
    return out


def prepare(source: str, opts: AddTaskOptions) -> Request:
    """Check the request and build the new run's config; ConfigError (exit 2) on bad input,
    before anything is written."""
    overrides, config = opts.overrides, opts.config
    if config is None and ("model" in overrides or "tasks" in overrides):
        raise ConfigError("--set may change train/data/eval settings, not the model or the task list")
    check_range("train.steps", opts.steps, "--steps")
    check_range("continual.grow_experts", opts.grow_experts, "--grow-experts")
    check_range("continual.adapter_rank", opts.adapter_rank, "--adapter-rank")
    # --set applies on top of --config when both are given, else on top of the checkpoint's config
    opened = ckpt.open_checkpoint(source, load_tokenizer(), overrides if config is None else None)
    tag_dir, meta, old = opened
    old = _with_user_settings(old, config, overrides)
    ensure_loaded(old.plugins)  # the user's (--set plugins=[...] or --config); never the checkpoint's
    declare_tasks(old)  # a declared new task (from --config) can be looked up; data, not code
    ckpt.checkpoint_tasks(opened._replace(cfg=old))  # every old task registered, or which plugin to name
    _check_request(old, tag_dir, meta["task_table"], opts)
    out = _out_dir(tag_dir, opts.task, opts.out_dir, opts.resume)
    return Request(tag_dir, meta, old, new_config(old, opts, str(out)))


def run_add_task(source: str, opts: AddTaskOptions) -> dict[str, Any]:
    """add-task end to end; returns the report (rank 0 also prints it and writes add_task_report.json).

    opts.freeze=False is the whole-model fine-tuning baseline of the continual benchmark: the same
    new pathway, but every weight trains.
    """
    req = prepare(source, opts)
    hooks = AddTaskHooks(req, opts, load_tokenizer())
    summary = run(req.new, resume=opts.resume, hooks=hooks)
    report = build_report(hooks, req.new, req.old, hooks.before_metrics, summary, source=str(req.tag_dir))
    if dist.rank_world()[0] == 0:
        print(format_report(report), file=sys.stderr)
        path = Path(req.new.train.out_dir) / REPORT
        atomic_write_text(path, json.dumps(report, indent=2))
        print(f"pathways-mm: wrote {path}", file=sys.stderr)
    return report


def _added_params(cfg: ExperimentConfig, old: ExperimentConfig, vocab: int) -> tuple[int, int]:
    """(parameters added, total of the new model) over all ranks."""
    new_total, _ = param_counts(build_model(one_process(cfg).model, vocab))
    old_total, _ = param_counts(build_model(one_process(old).model, vocab))
    return new_total - old_total, new_total


def build_report(
    hooks: AddTaskHooks,
    cfg: ExperimentConfig,
    old: ExperimentConfig,
    before: dict[str, Any],
    summary: dict[str, Any],
    source: str,
) -> dict[str, Any]:
    after = summary["eval"]
    old_rows = {}
    for name in old.tasks:
        metrics = [m for m in before[name]["chance"]]
        old_rows[name] = {
            m: {"before": before[name][m], "after": after[name][m], "change": after[name][m] - before[name][m]}
            for m in metrics
        }
    added, total = _added_params(cfg, old, hooks.tok.vocab_size)
    new = after[hooks.task]
    trainable = hooks.trainable
    return {
        "source": source,
        "checkpoint": summary["checkpoint"],
        "task": hooks.task,
        "mode": "add-task" if hooks.freeze else "finetune",
        "steps": cfg.train.steps,
        "grow_experts": hooks.grow,
        "adapter_rank": cfg.model.adapter_rank if hooks.new_tid in cfg.model.adapter_tasks else 0,
        "closest_task": hooks.info["closest"],
        "closest_losses": hooks.info["closest_losses"],
        "new_experts": hooks.info["new_experts"],
        "start_experts": hooks.info["start_experts"],
        "old_outputs_bit_identical": hooks.info["old_outputs_bit_identical"],
        "old_tasks": old_rows,
        "new_task": {m: new[m] for m in new["chance"]} | {"chance": new["chance"], "n": new["n"]},
        "reuse": hooks.info["reuse"],
        "params_added": added,
        "params_added_pct": round(100.0 * added / total, 3),
        "params_total": total,
        "trainable_elements": trainable,
        "train_s": summary.get("train_s"),
    }


def _block(layer: str) -> str:
    """`decoder.blocks.3.ffn` -> `3`."""
    return layer.split("blocks.")[-1].split(".")[0]


def format_report(r: dict[str, Any]) -> str:
    start = "; ".join(f"block {_block(n)}: {e}" for n, e in r.get("start_experts", {}).items())
    lines = [
        f"add-task {r['task']} ({r['mode']}, {r['steps']} steps, --grow-experts {r['grow_experts']}); "
        f"task embedding from '{r['closest_task']}', pathway from the experts its data prefers ({start})"
    ]
    lines.append(f"{'old task':<20} {'metric':<16} {'before':>8} {'after':>8} {'change':>8}")
    for name, metrics in r["old_tasks"].items():
        for m, v in metrics.items():
            lines.append(f"{name:<20} {m:<16} {v['before']:>8.3f} {v['after']:>8.3f} {v['change']:>+8.3f}")
    for m, v in r["new_task"].items():
        if m not in ("chance", "n"):
            c = r["new_task"]["chance"].get(m)
            lines.append(f"new: {r['task']:<15} {m:<16} {v:>8.3f}  (chance {'-' if c is None else f'{c:.3f}'})")
    reuse = r["reuse"]["share_on_old_experts"]
    lines.append(
        f"routes of the new task on reused (old) experts: {reuse:.1%}; old outputs bit-identical: "
        f"{'yes' if r['old_outputs_bit_identical'] else 'NO'}"
    )
    lines.append(
        f"parameters added: {r['params_added']:,} ({r['params_added_pct']:.2f}% of {r['params_total']:,}); "
        f"trained: {r['trainable_elements']:,}"
    )
    return "\n".join(lines)
