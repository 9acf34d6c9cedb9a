"""Add a task to a trained model without touching what the old tasks use.

    pathways-mm add-task --from CKPT --task NAME [--grow-experts G] [--steps N] [--out-dir DIR]
    deepspeed --num_gpus N --module pathways_mm.add_task --from CKPT --task NAME ...

The new task gets its own pathway (task-embedding row and routing prior in every MoE layer),
started as a copy of the closest old task's: the old pathway under which the new task's
training samples have the lowest loss. With `--grow-experts G` every MoE layer gains G experts
that only the new task may route to, each starting as a copy of an expert the closest pathway
sent the new task's tokens to. Everything else is frozen (attention, norms, embeddings,
encoders, token router rows and experts of the old pathways), so the old tasks' outputs stay
bit-identical; the run checks that before it saves. A report (printed and add_task_report.json)
gives old-task metrics before and after, the new task's metrics, how much of its routing lands
on reused experts, and the parameters added.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from pathways_mm import engine as ds_engine
from pathways_mm.checkpoint import atomic_write_text
from pathways_mm.collate import IGNORE, collate
from pathways_mm.config import (ContinualConfig, ExperimentConfig, config_from_dict, data_root, load_config, merge_dicts,
                                one_process, parse_overrides, to_dict)
from pathways_mm.data import encode, load_split
from pathways_mm.encoders.text import TextTokenizer, load_tokenizer
from pathways_mm.errors import ConfigError
from pathways_mm.model import build_model, param_counts
from pathways_mm.routing import pathways, telemetry
from pathways_mm.tasks import get_task
from pathways_mm.train import Hooks, check_compatible

PROBES = 16  # samples per task in the bit-identity probe and the closest-pathway search
REPORT = "add_task_report.json"


def _probe_batch(task, tid: int, samples: list[Any], cfg: ExperimentConfig, tok: TextTokenizer):
    """A deterministic teacher-forced batch of `task` (no augmentation: no rng)."""
    examples = [encode(task, s) for s in samples]
    return collate(examples, [tid] * len(examples), tok, cfg.data.max_len, model_cfg=cfg.model)


@torch.no_grad()
def target_logits(model, batch) -> torch.Tensor:
    """Logits at the target positions, the outputs the old tasks' metrics are made of."""
    was = model.training
    model.eval()
    batch = batch.to(ds_engine.device())
    out = model(batch, logits_at_BL=batch.labels != IGNORE).logits
    model.train(was)
    return out.float().cpu()


def new_config(old: ExperimentConfig, task: str, grow: int, steps: int, out_dir: str, freeze: bool,
               adapter_rank: int = 0) -> ExperimentConfig:
    """The config of the grown model: one more task, G more experts, its adapters, only it sampled."""
    model = old.model
    if adapter_rank:
        model = dataclasses.replace(model, adapter_rank=adapter_rank, adapter_tasks=(*model.adapter_tasks, len(old.tasks)))
    moe = model.moe
    groups = dict(moe.expert_groups) or {"base": moe.num_experts}
    if grow:
        groups[task] = grow
        moe = dataclasses.replace(moe, num_experts=moe.num_experts + grow, expert_groups=groups)
    weights = {t: 0.0 for t in old.tasks} | {task: 1.0}
    # No weight decay: decay would shrink frozen weights too (they sit in the same tensors as trainable rows).
    train = dataclasses.replace(old.train, steps=steps, out_dir=out_dir, weight_decay=0.0, save_every=0, eval_every=0,
                                warmup_steps=min(old.train.warmup_steps, max(1, steps // 10)))
    return old.replace(name=f"{old.name}+{task}" if freeze else f"{old.name}+{task}(finetune)",
                       tasks=(*old.tasks, task), model=dataclasses.replace(model, moe=moe),
                       mixture=dataclasses.replace(old.mixture, weights=weights), train=train,
                       eval=dataclasses.replace(old.eval, routes=False), continual=ContinualConfig())  # fmt: skip


class AddTaskHooks(Hooks):
    """Loads and grows the source weights, freezes, checks the old outputs, measures reuse."""

    def __init__(self, tag_dir: Path, old_cfg: ExperimentConfig, cfg: ExperimentConfig, task: str, grow: int,
                 freeze: bool, tok: TextTokenizer, old_pathways: dict[str, Any] | None):
        self.tag_dir, self.old_cfg, self.cfg, self.task, self.grow, self.freeze = tag_dir, old_cfg, cfg, task, grow, freeze
        self.old_pathways = old_pathways  # the source checkpoint's per-task record, carried forward
        self.tok = tok
        self.old_tasks = [get_task(t) for t in old_cfg.tasks]
        self.new_tid = len(old_cfg.tasks)
        self.num_old_experts = old_cfg.model.moe.num_experts
        self.before: list[torch.Tensor] = []
        self.info: dict[str, Any] = {}

    def _probes(self) -> list[Any]:
        root = data_root(self.cfg)
        return [_probe_batch(t, i, list(load_split(t, self.cfg.eval.split, root, self.cfg.data.seed)[:PROBES]),
                             self.cfg, self.tok) for i, t in enumerate(self.old_tasks)]  # fmt: skip

    def _closest(self, full: dict[str, torch.Tensor]) -> tuple[int, dict[str, list[int]], dict[str, float]]:
        """The old pathway with the lowest loss on the new task's training samples, and per MoE
        layer the old experts it sends those tokens to, most used first (on a one-process copy)."""
        from pathways_mm.losses import forward_loss

        cfg = self.old_cfg
        model = build_model(one_process(cfg).model, self.tok.vocab_size)
        _load(model, full, self.tag_dir)
        model.to(ds_engine.device()).eval()
        task = get_task(self.task)
        samples = list(load_split(task, "train", data_root(self.cfg), self.cfg.data.seed)[: 4 * PROBES])
        losses, seeds = {}, {}
        with torch.no_grad():
            for tid, old in enumerate(cfg.tasks):
                batch = _probe_batch(task, tid, samples, self.cfg, self.tok).to(ds_engine.device())
                losses[old] = forward_loss(model, batch).lm_loss.item()
            closest = min(losses, key=losses.get)
            telemetry.enable(model)
            model(_probe_batch(task, cfg.tasks.index(closest), samples, self.cfg, self.tok).to(ds_engine.device()))
            for (name, _), counts in zip(pathways.moe_layers(model), telemetry.read(model)):
                per_expert = counts.route_counts[0].sum(dim=(0, 1))
                seeds[name] = torch.argsort(per_expert, descending=True, stable=True).tolist()
        return cfg.tasks.index(closest), seeds, losses

    def model_built(self, model, rank: int, world: int) -> None:
        import torch.distributed as dist

        full = ds_engine.load_full_state(self.tag_dir)
        closest, seeds, losses = self._closest(full)
        if world > 1:  # every rank must grow the same way
            box = [(closest, seeds, losses)]
            dist.broadcast_object_list(box, src=0)
            closest, seeds, losses = box[0]
        layers = [name for name, _ in pathways.moe_layers(model)]
        grown, growth = pathways.grow(full, layers, self.num_old_experts, self.grow, self.new_tid, closest, seeds)
        grown = pathways.with_adapters(grown, model.state_dict())
        self.ep_rank = rank % self.cfg.model.moe.ep_size
        _load(model, pathways.to_local(grown, model, self.ep_rank), self.tag_dir)
        self.growth = growth
        self.info.update(closest=self.old_cfg.tasks[closest], closest_losses={k: round(v, 4) for k, v in losses.items()},
                         new_experts=growth.new_experts, copied_from=growth.copied_from)  # fmt: skip
        slot = self.cfg.model.adapter_tasks.index(self.new_tid) if self.new_tid in self.cfg.model.adapter_tasks else None
        self.frozen = (pathways.freeze_for_new_task(model, self.new_tid, growth.new_experts, self.ep_rank, slot)
                       if self.freeze else None)  # fmt: skip
        self.trainable = self.frozen.trainable if self.frozen else sum(p.numel() for p in model.parameters())

    def engine_ready(self, engine, ts, tok) -> None:
        from deepspeed.utils import groups

        moe = [m for _, m in pathways.moe_layers(engine.module)]
        if moe and self.cfg.model.moe.ep_size > 1:
            assert groups._get_expert_parallel_rank(moe[0].expert_group_name) == self.ep_rank
        from pathways_mm.evaluate import evaluate

        self.probes = self._probes()
        self.before = [target_logits(engine, b) for b in self.probes]
        rank, world = ds_engine.rank_world()
        self.before_metrics = evaluate(engine, self.cfg, ts.tasks[:-1], tok, rank, world, train_sets=ts.train[:-1])

    def trained(self, engine) -> None:
        import torch.distributed as dist

        after = [target_logits(engine, b) for b in self.probes]
        same = [bool(torch.equal(a, b)) for a, b in zip(self.before, after)]
        moved = pathways.changed_frozen(engine.module, self.frozen) if self.frozen else []
        flag = torch.tensor([int(all(same) and not moved)], device=ds_engine.device())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        self.info["old_outputs_bit_identical"] = bool(flag.item())
        if self.freeze and not flag.item():
            raise RuntimeError(f"add-task changed frozen weights {moved[:3]} or old outputs "
                               f"{[t for t, s in zip(self.old_cfg.tasks, same) if not s]}; nothing was saved")  # fmt: skip
        self.info["reuse"] = self._reuse(engine)

    def _reuse(self, engine) -> dict[str, Any]:
        """Share of the new task's routes (test samples, teacher-forced) that land on old experts."""
        import torch.distributed as dist

        task = get_task(self.task)
        samples = list(load_split(task, self.cfg.eval.split, data_root(self.cfg), self.cfg.data.seed)[: 4 * PROBES])
        telemetry.enable(engine)
        target_logits(engine, _probe_batch(task, self.new_tid, samples, self.cfg, self.tok))
        counts = torch.stack([c.route_counts[0, self.new_tid].sum(0) for c in telemetry.read(engine)])  # [layers, E]
        telemetry.enable(engine, on=False)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)
        counts = counts.cpu().double()
        old = counts[:, : self.num_old_experts].sum(1) / counts.sum(1).clamp(min=1)
        return {"share_on_old_experts": round(float(old.mean()), 4), "per_layer": [round(float(v), 4) for v in old],
                "old_experts_used": int((counts[:, : self.num_old_experts] > 0).sum())}  # fmt: skip

    def meta(self) -> dict[str, Any]:
        return {"pathways": pathway_record(self.cfg, self.old_pathways, self.task, self.growth, self.freeze)}


def pathway_record(cfg: ExperimentConfig, old: dict[str, Any] | None, task: str, growth, freeze: bool) -> dict[str, Any]:
    """Per task: id, frozen, the experts it owns (the same ids in every MoE layer), where it came from."""
    rec = {name: dict(v) for name, v in (old or {}).items()}
    for i, name in enumerate(cfg.tasks[:-1]):
        rec.setdefault(name, {"id": i, "owns_experts": [], "added_by": "train"})
        rec[name]["frozen"] = freeze or rec[name].get("frozen", False)
    rec[task] = {"id": len(cfg.tasks) - 1, "owns_experts": growth.new_experts, "frozen": False,
                 "added_by": "add-task" if freeze else "finetune"}  # fmt: skip
    return rec


def _load(model, state: dict[str, torch.Tensor], tag_dir: Path) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ConfigError(f"{tag_dir}: weights do not fit the model its metadata describes "
                          f"({first[1].strip() if len(first) > 1 else first[0]:.200})") from None  # fmt: skip


def prepare(source: str, task: str, grow: int = 0, steps: int = 300, out_dir: str | None = None,
            config: str | None = None, overrides: Sequence[str] = (), freeze: bool = True, adapter_rank: int = 0):
    """Check the request and build the new run's config; ConfigError (exit 2) on bad input,
    before anything is written. Returns (source tag dir, its meta, old config, new config)."""
    tag_dir = ds_engine.resolve_checkpoint(source)
    meta = ds_engine.read_meta(tag_dir)
    src = meta["config"].get("source")
    try:
        old = config_from_dict(meta["config"], source=src if isinstance(src, str) else None)
    except ConfigError as e:
        raise ConfigError(f"{tag_dir}: checkpoint config is not valid here: {e}") from None
    tok = load_tokenizer()
    check_compatible(meta, old, tok, where=str(tag_dir / ds_engine.META_FILE))
    if config is not None:  # training settings from a file; its model must be the checkpoint's
        user = load_config(config, overrides)
        diff = sorted(k for k, v in to_dict(user.model).items() if k != "moe" and to_dict(old.model)[k] != v)
        um, om = to_dict(user.model.moe), to_dict(old.model.moe)
        diff += [f"moe.{k}" for k in ("num_experts", "top_k", "expert_d_ff", "moe_every") if um[k] != om[k]]
        if diff:
            raise ConfigError(f"{config}: model differs from the checkpoint's in model.{', model.'.join(diff)} "
                              f"(the checkpoint is a {old.model.size} model); use a config of the same model size")  # fmt: skip
        old = old.replace(data=user.data, eval=user.eval, train=user.train, seed=user.seed, plugins=user.plugins)
    elif overrides:
        user = parse_overrides(list(overrides))
        if "model" in user or "tasks" in user:
            raise ConfigError("--set may change train/data/eval settings, not the model or the task list")
        old = config_from_dict(merge_dicts(to_dict(old), user), source=old.source)
    table = meta["task_table"]
    if task in table:
        raise ConfigError(f"task '{task}' already exists in {tag_dir} (id {table[task]}); add a task it does not have")
    get_task(task)  # unknown task: ConfigError naming the registered ones
    moe = old.model.moe
    if not moe.num_experts:
        raise ConfigError(f"{tag_dir} is a dense model: add-task needs MoE layers (train with model.moe.num_experts > 0)")
    if grow < 0:
        raise ConfigError(f"--grow-experts must be >= 0, got {grow}")
    if (moe.num_experts + grow) % moe.ep_size:
        raise ConfigError(f"--grow-experts {grow}: {moe.num_experts} + {grow} experts do not split over ep_size="
                          f"{moe.ep_size}; use a multiple of {moe.ep_size}")  # fmt: skip
    if len(table) + 1 > old.model.max_tasks:
        raise ConfigError(f"{tag_dir} already holds model.max_tasks={old.model.max_tasks} tasks; no pathway is free")
    if steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {steps}")
    if adapter_rank < 0 or (adapter_rank and old.model.adapter_rank not in (0, adapter_rank)):
        raise ConfigError(f"--adapter-rank {adapter_rank}: the checkpoint's adapters have rank {old.model.adapter_rank}; "
                          f"use {old.model.adapter_rank} (or 0 for none)")  # fmt: skip
    run_dir = tag_dir.parent.parent
    out = Path(out_dir) if out_dir else run_dir.with_name(f"{run_dir.name}+{task}")
    if out.resolve() == run_dir.resolve() or run_dir.resolve() in out.resolve().parents:
        raise ConfigError(f"--out-dir {out} is inside the source run {run_dir}; write the new model elsewhere")
    if (out / "checkpoints").exists():
        raise ConfigError(f"--out-dir {out} already holds a run; choose another directory")
    return tag_dir, meta, old, new_config(old, task, grow, steps, str(out), freeze, adapter_rank)


def run_add_task(source: str, task: str, grow: int = 0, steps: int = 300, out_dir: str | None = None,
                 config: str | None = None, overrides: Sequence[str] = (), freeze: bool = True,
                 adapter_rank: int = 0) -> dict[str, Any]:
    """add-task end to end; returns the report (rank 0 also prints it and writes add_task_report.json).

    freeze=False is the whole-model fine-tuning baseline of the continual benchmark: the same
    new pathway, but every weight trains.
    """
    from pathways_mm.train import run

    tag_dir, meta, old, cfg = prepare(source, task, grow, steps, out_dir, config, overrides, freeze, adapter_rank)
    tok = load_tokenizer()
    old_pathways = meta.get("pathways") if isinstance(meta.get("pathways"), dict) else None
    hooks = AddTaskHooks(tag_dir, old, cfg, task, grow, freeze, tok, old_pathways)
    summary = run(cfg, hooks=hooks)
    rank, _ = ds_engine.rank_world()
    report = build_report(hooks, cfg, old, hooks.before_metrics, summary, source=str(tag_dir))
    if rank == 0:
        print(format_report(report), file=sys.stderr)
        path = Path(cfg.train.out_dir) / REPORT
        atomic_write_text(path, json.dumps(report, indent=2))
        print(f"pathways-mm: wrote {path}", file=sys.stderr)
    return report


def _added_params(cfg: ExperimentConfig, old: ExperimentConfig, vocab: int) -> tuple[int, int]:
    """(parameters added, total of the new model) over all ranks."""
    new_total, _ = param_counts(build_model(one_process(cfg).model, vocab))
    old_total, _ = param_counts(build_model(one_process(old).model, vocab))
    return new_total - old_total, new_total


def build_report(hooks: AddTaskHooks, cfg: ExperimentConfig, old: ExperimentConfig, before: dict[str, Any],
                 summary: dict[str, Any], source: str) -> dict[str, Any]:
    after = summary["eval"]
    old_rows = {}
    for name in old.tasks:
        metrics = [m for m in before[name]["chance"]]
        old_rows[name] = {m: {"before": before[name][m], "after": after[name][m], "change": after[name][m] - before[name][m]}
                          for m in metrics}  # fmt: skip
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


def format_report(r: dict[str, Any]) -> str:
    lines = [f"add-task {r['task']} ({r['mode']}, {r['steps']} steps, --grow-experts {r['grow_experts']}); "
             f"pathway started from '{r['closest_task']}'"]  # fmt: skip
    lines.append(f"{'old task':<20} {'metric':<16} {'before':>8} {'after':>8} {'change':>8}")
    for name, metrics in r["old_tasks"].items():
        for m, v in metrics.items():
            lines.append(f"{name:<20} {m:<16} {v['before']:>8.3f} {v['after']:>8.3f} {v['change']:>+8.3f}")
    for m, v in r["new_task"].items():
        if m not in ("chance", "n"):
            c = r["new_task"]["chance"].get(m)
            lines.append(f"new: {r['task']:<15} {m:<16} {v:>8.3f}  (chance {'-' if c is None else f'{c:.3f}'})")
    reuse = r["reuse"]["share_on_old_experts"]
    lines.append(f"routes of the new task on reused (old) experts: {reuse:.1%}; old outputs bit-identical: "
                 f"{'yes' if r['old_outputs_bit_identical'] else 'NO'}")  # fmt: skip
    lines.append(f"parameters added: {r['params_added']:,} ({r['params_added_pct']:.2f}% of {r['params_total']:,}); "
                 f"trained: {r['trainable_elements']:,}")  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m pathways_mm.add_task` (what the deepspeed launcher runs)."""
    from pathways_mm.cli import add_task_arguments, run_guarded

    p = argparse.ArgumentParser(prog="pathways_mm.add_task", description="add a task without forgetting")
    add_task_arguments(p)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    def go() -> None:
        run_add_task(args.source, args.task, args.grow_experts, args.steps, args.out_dir, args.config, args.overrides,
                     freeze=not args.train_all, adapter_rank=args.adapter_rank)
        ds_engine.shutdown()

    return run_guarded(go)


if __name__ == "__main__":
    sys.exit(main())
