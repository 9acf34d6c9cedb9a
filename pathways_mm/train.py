"""Multi-task training on DeepSpeed, one process or many.

    pathways-mm train CONFIG [--set key=value ...] [--resume]
    deepspeed --num_gpus N --module pathways_mm.train --config CONFIG [--set ...] [--resume]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import yaml
from tqdm import tqdm

from pathways_mm import engine as ds_engine
from pathways_mm import faults
from pathways_mm.checkpoint import atomic_write_text
from pathways_mm.collate import Batch, collate
from pathways_mm.config import MOE_RUNTIME_KEYS, ExperimentConfig, ModelConfig, MoEConfig, data_root, load_config, to_dict
from pathways_mm.data import MixtureSampler, encode, load_split
from pathways_mm.encoders.text import TextTokenizer, load_tokenizer
from pathways_mm.errors import ConfigError, TrainingAborted
from pathways_mm.losses import forward_loss
from pathways_mm.model import build_model, param_counts
from pathways_mm.tasks import Task, ensure_loaded, get_task


@dataclass
class TaskSet:
    """The configured tasks, their ids (the task table) and their training samples."""

    tasks: list[Task]
    train: list[list[Any]]

    @property
    def table(self) -> dict[str, int]:
        return {t.name: i for i, t in enumerate(self.tasks)}


def load_tasks(cfg: ExperimentConfig, rank: int = 0, splits: Sequence[str] = ("train",)) -> TaskSet:
    """Build (rank 0 first, others then read the cache) and load the configured tasks."""
    import torch.distributed as dist

    ensure_loaded(cfg.plugins)
    tasks = [get_task(name) for name in cfg.tasks]
    root = data_root(cfg)

    def load_all() -> list[list[Any]]:
        return [load_split(t, "train", root, cfg.data.seed) for t in tasks] if "train" in splits else []

    distributed = dist.is_available() and dist.is_initialized()
    if distributed and rank != 0:
        dist.barrier()
    train = load_all()
    if distributed and rank == 0:
        dist.barrier()
    return TaskSet(tasks=tasks, train=train)


def make_sampler(cfg: ExperimentConfig, ts: TaskSet) -> MixtureSampler:
    weights = [cfg.mixture.weights.get(t.name, 1.0) for t in ts.tasks]
    return MixtureSampler([len(s) for s in ts.train], cfg.mixture.temperature, cfg.seed, weights)


def train_batch(cfg, ts: TaskSet, sampler: MixtureSampler, tok: TextTokenizer, step: int, micro: int, rank: int) -> Batch:
    picks = sampler.draw(cfg.train.micro_batch_size, step, micro, rank)
    examples = [encode(ts.tasks[t], ts.train[t][i]) for t, i in picks]
    keys = [f"train[{i}]" for _, i in picks]
    # augmentation comes from the batch key too: a resumed run redraws exactly the same batch
    rng = np.random.default_rng([cfg.seed, step, micro, rank, 1])
    return collate(examples, [t for t, _ in picks], tok, cfg.data.max_len, model_cfg=cfg.model, rng=rng, keys=keys)


def checkpoint_meta(cfg: ExperimentConfig, ts: TaskSet, tok: TextTokenizer, step: int) -> dict[str, Any]:
    return {
        "format": 1,
        "step": step,
        "config": to_dict(cfg),
        "task_table": ts.table,
        # per task: the experts it owns (add-task's grown ones) and whether it is frozen; the
        # priors and allowed-expert masks themselves are weights (router.pathway / .allowed)
        "pathways": {name: {"id": i, "owns_experts": [], "frozen": False, "added_by": "train"} for name, i in ts.table.items()},
        "tokenizer_hash": tok.hash,
        "vocab_size": tok.vocab_size,
    }


class MetricsLog:
    """Append-only JSONL; on resume, records after the resumed step are dropped (they are redone).

    A record torn by a kill mid-write is dropped too; the rewrite is atomic, so a second kill
    cannot lose the records before it.
    """

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is None:
            atomic_write_text(path, "")
        elif path.exists():
            keep = []
            for line in path.read_text(errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and record.get("step", 0) <= resume_step:
                    keep.append(line)
            atomic_write_text(path, "".join(l + "\n" for l in keep))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class Hooks:
    """Where a caller that trains part of a model (`add-task`) steps into the training run.

    The defaults do nothing: plain training.
    """

    def model_built(self, model: torch.nn.Module, rank: int, world: int) -> None:
        """Before the engine exists: load weights, freeze parameters (frozen ones get no optimizer state)."""

    def engine_ready(self, engine, ts: "TaskSet", tok: TextTokenizer) -> None:
        """The engine and its expert-parallel groups exist; training has not started."""

    def trained(self, engine) -> None:
        """The last step is done; nothing is saved yet (a check here can still stop the save)."""

    def meta(self) -> dict[str, Any]:
        """Extra checkpoint metadata."""
        return {}


def run(cfg: ExperimentConfig, resume: bool = False, stop_after: int | None = None, hooks: Hooks | None = None,
        engine_out: list | None = None) -> dict[str, Any]:
    """Train `cfg` to `train.steps` (or save and stop at `stop_after`); returns a summary.

    A peer that stops answering ends the run with TrainingAborted naming the rank and the step.
    engine_out: if given, the engine is appended to it (callers that measure the trained model).
    """
    from pathways_mm.watchdog import CollectiveGuard

    rank, world = ds_engine.init_distributed(cfg.train.threads)
    with CollectiveGuard(rank, world, cfg.train.collective_timeout_s) as guard:
        return _run(cfg, rank, world, guard, resume, stop_after, hooks or Hooks(), engine_out)


def _run(cfg: ExperimentConfig, rank: int, world: int, guard, resume: bool, stop_after: int | None, hooks: Hooks,
         engine_out: list | None) -> dict[str, Any]:
    import torch.distributed as dist

    from pathways_mm.evaluate import format_table

    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.train.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    resume_from, resume_meta = None, None
    if resume:
        resume_from = ds_engine.newest_intact(ckpt_dir)  # skips unfinished saves, falls back past damaged ones
        if resume_from is None and rank == 0:
            print(f"pathways-mm: no checkpoint under {ckpt_dir}; starting from step 0", file=sys.stderr)
    tok = load_tokenizer()
    if resume_from is not None:
        resume_meta = ds_engine.read_meta(resume_from)
        check_compatible(resume_meta, cfg, tok, resume=True, where=str(resume_from / ds_engine.META_FILE))
    ts = load_tasks(cfg, rank)
    model = build_model(cfg.model, tok.vocab_size)
    hooks.model_built(model, rank, world)
    engine = ds_engine.initialize(model, cfg, world)
    if engine_out is not None:
        engine_out.append(engine)
    start = 0
    if resume_from is not None:
        ds_engine.load_checkpoint(engine, resume_from, with_optimizer=True)
        start = resume_meta["step"]
    hooks.engine_ready(engine, ts, tok)
    sampler = make_sampler(cfg, ts)
    dev = ds_engine.device()
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        log = MetricsLog(out_dir / "metrics.jsonl", start if resume_from is not None else None)
        n_total, n_active = param_counts(model)
        print(
            f"pathways-mm: {cfg.name}: {len(ts.tasks)} tasks ({', '.join(ts.table)}), "
            f"{n_total / 1e6:.2f}M params ({n_active / 1e6:.2f}M active), {world} process(es), "
            f"steps {start}->{cfg.train.steps}, mixture {dict(zip(ts.table, sampler.probs.round(3).tolist()))}",
            file=sys.stderr,
        )
    bar = tqdm(total=cfg.train.steps, initial=start, desc="train", disable=rank != 0, dynamic_ncols=True)
    window = torch.zeros(2, dtype=torch.float64, device=dev)  # summed loss, micro-steps (read at log steps only)
    task_nll = torch.zeros(len(ts.tasks), dtype=torch.float64, device=dev)
    task_tok = torch.zeros(len(ts.tasks), dtype=torch.float64, device=dev)
    bad_in_a_row = 0
    t0 = time.time()
    engine.train()
    for step in range(start, cfg.train.steps):
        guard.step = done = step + 1
        faults.maybe_die("hang", done, rank)
        micro_stats = []
        for micro in range(cfg.train.grad_accum):
            batch = train_batch(cfg, ts, sampler, tok, step, micro, rank).to(dev)
            out = forward_loss(engine, batch, cfg.train.loss_norm)
            engine.backward(out.loss)
            if micro + 1 < cfg.train.grad_accum:
                engine.step()  # not a boundary: DeepSpeed only counts the micro-step
            micro_stats.append((out.lm_loss.detach(), batch.task_ids, out.nll_B, out.num_tokens_B))
        faults.maybe_die("kill", done, rank)
        if faults.hit("nan_grad", done, rank):
            ds_engine.inject_nan_grad(engine)
        # Every rank must agree, or one rank's update would leave the replicas out of sync. The one
        # host sync per step this costs is what DeepSpeed's fp16 overflow check costs too.
        if ds_engine.agree_all_finite(ds_engine.grads_finite(engine, out.loss)):
            engine.step()
            bad_in_a_row = 0
            for lm_loss, task_ids, nll_B, num_tokens_B in micro_stats:
                window += torch.stack([lm_loss.double(), window.new_ones(())])
                task_nll.index_add_(0, task_ids, nll_B.double())
                task_tok.index_add_(0, task_ids, num_tokens_B.double())
        else:
            ds_engine.skip_step(engine)
            bad_in_a_row += 1
            if rank == 0:  # DeepSpeed keeps the count in its checkpoints, so it survives a resume
                log.write({"step": done, "skipped": "non-finite loss or gradient", "skipped_steps": engine.skipped_steps})
                print(f"pathways-mm: step {done}: non-finite loss or gradient; step skipped", file=sys.stderr)
            if bad_in_a_row >= cfg.train.max_bad_steps:
                raise TrainingAborted(
                    f"{bad_in_a_row} steps in a row (up to step {done}) had a non-finite loss or gradient "
                    f"(train.max_bad_steps={cfg.train.max_bad_steps}); lower train.lr or check the data, "
                    "then continue from the last checkpoint with --resume"
                )
        if (done % cfg.train.log_every == 0 or done == cfg.train.steps) and window[1] > 0:
            stats = torch.cat([window, task_nll, task_tok])
            dist.all_reduce(stats)
            stats = stats.cpu()
            if not torch.isfinite(stats[0]):
                raise FloatingPointError(f"training loss is {stats[0].item()} at step {done}; lower train.lr or check the data")
            loss = (stats[0] / stats[1]).item()
            n = len(ts.tasks)
            per_task = {t: round((stats[2 + i] / stats[2 + n + i]).item(), 4) for t, i in ts.table.items() if stats[2 + n + i] > 0}
            window.zero_()
            task_nll.zero_()
            task_tok.zero_()
            if rank == 0:
                lr = engine.get_lr()[0]
                log.write({"step": done, "loss": loss, "task_loss": per_task, "lr": lr, "skipped_steps": engine.skipped_steps,
                           "elapsed_s": round(time.time() - t0, 2)})
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
        stopping = stop_after is not None and stop_after <= done < cfg.train.steps
        if (cfg.train.save_every and done % cfg.train.save_every == 0 and done != cfg.train.steps) or stopping:
            meta = {**checkpoint_meta(cfg, ts, tok, done), **hooks.meta()}
            ds_engine.save_checkpoint(engine, ckpt_dir, done, meta, cfg.train.keep_checkpoints)
        if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done != cfg.train.steps:
            last_eval = evaluate_and_route(engine, cfg, ts, tok, rank, world, done)
            engine.train()
            if rank == 0:
                log.write({"step": done, "eval": last_eval})
        bar.update(1)
        if stopping:
            bar.close()
            path = ckpt_dir / ds_engine.tag_for(done)
            if rank == 0:
                print(f"pathways-mm: stopped after step {done}; checkpoint {path}; continue with --resume", file=sys.stderr)
            return {"step": done, "checkpoint": str(path), "stopped": True}
    bar.close()
    hooks.trained(engine)
    in_sync = weights_in_sync(engine, world)
    final = ckpt_dir / ds_engine.tag_for(cfg.train.steps)
    if start < cfg.train.steps or not final.exists():
        meta = {**checkpoint_meta(cfg, ts, tok, cfg.train.steps), **hooks.meta()}
        final = ds_engine.save_checkpoint(engine, ckpt_dir, cfg.train.steps, meta, cfg.train.keep_checkpoints)
    last_eval = evaluate_and_route(engine, cfg, ts, tok, rank, world, cfg.train.steps)
    summary = {"step": cfg.train.steps, "checkpoint": str(final), "eval": last_eval,
               "train_s": round(time.time() - t0, 1), "weights_in_sync": in_sync}
    if rank == 0:
        log.write({"step": cfg.train.steps, "eval": last_eval, "weights_in_sync": in_sync})
        print(format_table(last_eval), file=sys.stderr)
        print(
            f"pathways-mm: done in {summary['train_s']}s; checkpoint {final}; metrics {out_dir / 'metrics.jsonl'}",
            file=sys.stderr,
        )
    return summary


def evaluate_and_route(engine, cfg: ExperimentConfig, ts: TaskSet, tok: TextTokenizer, rank: int, world: int,
                       step: int) -> dict[str, Any]:
    """`evaluate`; with `eval.routes`, also write where the evaluated tokens went to out_dir/routes/."""
    from pathways_mm import routes
    from pathways_mm.evaluate import evaluate, routes_data

    if cfg.eval.routes:
        routes.start(engine)
    results = evaluate(engine, cfg, ts.tasks, tok, rank, world, train_sets=ts.train)
    if cfg.eval.routes:
        ckpt_id = {"path": None, "run_dir": str(Path(cfg.train.out_dir).resolve()), "step": step, "tokenizer_hash": tok.hash}
        doc = routes.finish(engine, cfg, [t.name for t in ts.tasks], ckpt_id, routes_data(results, cfg.eval.split))
        if rank == 0:
            routes.write(Path(cfg.train.out_dir) / "routes" / f"{ds_engine.tag_for(step)}.json", doc)
    return results


def weights_in_sync(engine, world: int) -> bool | None:
    """Data-parallel replicas must hold the same non-expert weights: compare checksums across ranks."""
    import torch.distributed as dist

    if world == 1:
        return None
    sums = [p.detach().double().sum() for p in engine.module.parameters() if getattr(p, "allreduce", True)]
    local = torch.stack(sums)  # on the device: nccl gathers only device tensors
    gathered = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    return all(torch.equal(g.cpu(), gathered[0].cpu()) for g in gathered)


def check_compatible(meta: dict[str, Any], cfg: ExperimentConfig, tok: TextTokenizer, resume: bool = False,
                     where: str = "checkpoint") -> None:
    """A checkpoint must match the model shape, the task table and the tokenizer of this run.

    Runtime choices of the MoE layers (impl, capacity, ep_size) may differ, since the weights
    are stored per expert; only a resume needs the same ep_size (the optimizer state is split
    by expert-parallel rank).
    `where` (the metadata file) starts every error message.
    """
    if meta.get("tokenizer_hash") != tok.hash:
        raise ConfigError(
            f"{where}: checkpoint tokenizer {meta.get('tokenizer_hash')!r} differs from this install's {tok.hash}; "
            "evaluate or resume with the tokenizer it was trained with"
        )
    old, new = meta["config"]["model"], to_dict(cfg.model)
    defaults = to_dict(ModelConfig())  # a key the checkpoint's pathways-mm did not have yet holds its default there
    diff = [f"model.{k}" for k in new if k != "moe" and old.get(k, defaults[k]) != new[k]]
    old_moe = old.get("moe") if isinstance(old.get("moe"), dict) else {}
    old_moe = {**to_dict(MoEConfig()), **old_moe}
    diff += [f"model.moe.{k}" for k in new["moe"] if k not in MOE_RUNTIME_KEYS and old_moe.get(k) != new["moe"][k]]
    if resume and old_moe.get("ep_size") != new["moe"]["ep_size"]:
        diff.append("model.moe.ep_size")
    if diff:
        raise ConfigError(f"{where}: checkpoint model differs from the config in {', '.join(diff)}")
    table = {name: i for i, name in enumerate(cfg.tasks)}
    if meta["task_table"] != table:
        raise ConfigError(f"{where}: checkpoint task table {meta['task_table']} differs from the config's {table}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m pathways_mm.train` (what the deepspeed launcher runs)."""
    from pathways_mm.cli import run_guarded

    p = argparse.ArgumentParser(prog="pathways_mm.train", description="multi-task training (launcher entry point)")
    p.add_argument("--config", required=True, help="experiment YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.out_dir")
    p.add_argument("--stop-after", type=int, default=None, metavar="STEP", help="save and stop at this step")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    def go() -> None:
        run(load_config(args.config, args.overrides), resume=args.resume, stop_after=args.stop_after)
        ds_engine.shutdown()  # not on failure: a barrier there could wait for a rank that died

    return run_guarded(go)


if __name__ == "__main__":
    sys.exit(main())
