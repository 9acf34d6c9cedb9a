"""Multi-task training on DeepSpeed, one process or many.

    pathways-mm train CONFIG [--set key=value ...] [--resume | --overwrite] [--stop-after STEP]
    deepspeed --num_gpus N --module pathways_mm.cli train CONFIG [--set ...] [--resume]

`run` reads as the loop itself: set up, then per step train, log, save, evaluate; finish.
Each piece is its own function over one `Run` (what the run holds).

Shape suffixes: B rows of a micro-batch, T tasks.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from pathways_mm import dist, routes_file
from pathways_mm.config import ExperimentConfig, check_range, to_dict
from pathways_mm.data.loader import micro_batches
from pathways_mm.data.sampler import MixtureSampler
from pathways_mm.data.taskset import LoadedBatch, TaskSet, load_tasks, make_sampler
from pathways_mm.encoders.text import TextTokenizer, load_tokenizer
from pathways_mm.errors import ConfigError, TrainingAborted
from pathways_mm.io import atomic_write_text, describe_os_error, output_dir
from pathways_mm.metrics import format_table
from pathways_mm.model.model import build_model, param_counts
from pathways_mm.runtime import checkpoint as ckpt
from pathways_mm.runtime import engine as ds_engine
from pathways_mm.runtime import faults, reshard
from pathways_mm.runtime.watchdog import CollectiveGuard
from pathways_mm.training import routes
from pathways_mm.training.bad_samples import BadSamples, TooManyBadSamples
from pathways_mm.training.evaluate import evaluate
from pathways_mm.training.logs import CSV, TENSORBOARD, Logs, open_logs
from pathways_mm.training.losses import forward_loss


class Hooks:
    """Where a caller that trains part of a model (`add-task`) steps into the training run.

    The defaults do nothing: plain training.
    """

    def model_built(self, model: torch.nn.Module, rank: int, world: int) -> None:
        """Before the engine exists: load weights, freeze parameters (frozen ones get no optimizer state)."""

    def engine_ready(self, engine, ts: TaskSet, tok: TextTokenizer) -> None:
        """The engine and its expert-parallel groups exist; training has not started."""

    def trained(self, engine) -> None:
        """The last step is done; nothing is saved yet (a check here can still stop the save)."""

    def meta(self) -> dict[str, Any]:
        """Extra checkpoint metadata."""
        return {}


class LossWindow:
    """Loss sums since the last log step, on the device: read (one all-reduce) only when logging."""

    def __init__(self, num_tasks: int, device: torch.device):
        self.num_tasks = num_tasks
        self.sums = torch.zeros(
            2 + 2 * num_tasks, dtype=torch.float64, device=device
        )  # loss, micro-steps, nll_T, tokens_T

    def add(
        self, lm_loss: torch.Tensor, task_ids: torch.Tensor, nll_B: torch.Tensor, num_tokens_B: torch.Tensor
    ) -> None:
        n = self.num_tasks
        self.sums[:2] += torch.stack([lm_loss.double(), lm_loss.new_ones((), dtype=torch.float64)])
        self.sums[2 : 2 + n].index_add_(0, task_ids, nll_B.double())
        self.sums[2 + n :].index_add_(0, task_ids, num_tokens_B.double())

    @property
    def empty(self) -> bool:
        return not bool(self.sums[1] > 0)

    def reduce(self, step: int, table: dict[str, int]) -> tuple[float, dict[str, float]]:
        """(mean loss, per-task loss) over every rank since the last call; then zero the sums."""
        stats = dist.all_reduce_(self.sums.clone()).cpu()
        self.sums.zero_()
        if not torch.isfinite(stats[0]):
            raise FloatingPointError(
                f"training loss is {stats[0].item()} at step {step}; lower train.lr or check the data"
            )
        n = self.num_tasks
        per_task = {
            t: round((stats[2 + i] / stats[2 + n + i]).item(), 4) for t, i in table.items() if stats[2 + n + i] > 0
        }
        return (stats[0] / stats[1]).item(), per_task


class StatsWindow:
    """The model's logged numbers (`LossOutput.stats`: each MoE layer's routing objectives, dropped
    routes, routed share) summed since the last log step, on the device; read as means per
    micro-batch (one all-reduce) only when logging."""

    def __init__(self):
        self.names: list[str] = []
        self.sums: torch.Tensor | None = None  # [names + 1]: the sums, then the micro-batches counted

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        if not stats:
            return
        if not self.names:
            self.names = sorted(stats)
        one = torch.ones((), dtype=torch.float64, device=next(iter(stats.values())).device)
        row = torch.stack([*(stats[n].double() for n in self.names), one])
        self.sums = row if self.sums is None else self.sums + row

    def reduce(self) -> dict[str, dict[str, float]]:
        """{"block3": {"balance": ..., "mi": ..., "dropped": ...}, ...} over every rank (every rank
        must call it); then the window is empty."""
        if self.sums is None:
            return {}
        stats = dist.all_reduce_(self.sums.clone()).cpu()
        self.sums = None
        out: dict[str, dict[str, float]] = {}
        for name, value in zip(self.names, (stats[:-1] / stats[-1]).tolist()):
            layer, key = name.split("/", 1)
            out.setdefault(layer, {})[key] = round(value, 6)
        return out


@dataclass
class Run:
    """Everything a training run holds between its steps."""

    cfg: ExperimentConfig
    rank: int
    world: int
    hooks: Hooks
    tok: TextTokenizer
    ts: TaskSet
    engine: Any
    sampler: MixtureSampler
    start: int
    window: LossWindow
    log: Logs | None  # rank 0 only
    stats: StatsWindow = field(default_factory=StatsWindow)  # routing objectives per MoE layer
    batches: Iterator[LoadedBatch] | None = None  # this rank's micro-batches from the DataLoader, in order
    bad: BadSamples | None = None  # samples read and skipped (data.on_bad_sample: skip)
    load: routes.LoadWindow | None = None  # expert load per task, for the loggers (TensorBoard)
    bar: tqdm | None = None
    bad_in_a_row: int = 0
    t0: float = field(default_factory=time.time)

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.train.out_dir)

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    def say(self, msg: str) -> None:
        if self.rank == 0:  # tqdm.write: a line of its own above the progress bar, not onto it
            tqdm.write(f"pathways-mm: {msg}", file=sys.stderr)


# What `train` writes into train.out_dir; a folder holding the first two holds a run, and
# `--overwrite` deletes all four (nothing else in the folder).
RUN_FILES = ("checkpoints", "metrics.jsonl", "config.yaml", "routes")


def run_files(out_dir: Path) -> list[str]:
    """The marks of a training run in `out_dir` (checkpoints/, metrics.jsonl); empty: no run there."""
    return [name for name in RUN_FILES[:2] if (out_dir / name).exists()]


def set_aside(out: Path) -> Path:
    """Move the files of a run that published no checkpoint (it holds no finished work) into
    `out/stopped-<UTC time>/`, so that the same command starts afresh and loses nothing."""
    aside = out / time.strftime("stopped-%Y%m%dT%H%M%SZ", time.gmtime())
    aside.mkdir()
    for name in (*RUN_FILES, CSV, TENSORBOARD):
        if (out / name).exists():
            (out / name).rename(aside / name)
    return aside


def claim_out_dir(cfg: ExperimentConfig, resume: bool, overwrite: bool) -> None:
    """Train into train.out_dir only if it holds no run, or with --resume (continue it) or
    --overwrite (delete the run's files first). Rank 0 decides; every rank gets its answer."""
    if resume and overwrite:
        raise ConfigError("--resume continues the run in train.out_dir and --overwrite deletes it; give one")
    out = Path(cfg.train.out_dir)
    problem = None
    if dist.rank_world()[0] == 0:
        try:
            output_dir(out, "train.out_dir")
            found = run_files(out)
            unsaved = found and not any(map(ckpt.is_published, ckpt.tag_dirs(out / "checkpoints")))
            if unsaved and not overwrite:
                aside = set_aside(out)
                print(
                    f"pathways-mm: {out} holds a run that stopped before its first checkpoint; starting afresh "
                    f"(its logs are kept in {aside})",
                    file=sys.stderr,
                )
            elif found and not resume and not overwrite:
                problem = (
                    f"train.out_dir {out} already holds a run ({', '.join(found)}); continue it with --resume, "
                    "or start over with --overwrite (deletes its checkpoints and metrics), or set another train.out_dir"
                )
            elif found and overwrite:
                for path in (out / name for name in RUN_FILES):
                    if path.is_dir():
                        shutil.rmtree(path)
                    else:
                        path.unlink(missing_ok=True)
                print(f"pathways-mm: --overwrite: deleted the run in {out}", file=sys.stderr)
        except ConfigError as e:
            problem = str(e)
        except OSError as e:
            problem = f"train.out_dir {out}: {describe_os_error(e)}"
    problem = dist.broadcast(problem)
    if problem:
        raise ConfigError(problem)


def run(
    cfg: ExperimentConfig,
    resume: bool = False,
    stop_after: int | None = None,
    hooks: Hooks | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train `cfg` to `train.steps` (or save and stop at `stop_after`); returns a summary.

    train.out_dir must hold no run unless `resume` (continue it) or `overwrite` (delete it first).
    A peer that stops answering ends the run with TrainingAborted naming the rank and the step.
    """
    check_range("train.steps", stop_after, "--stop-after")
    rank, world = ds_engine.init_distributed(cfg.train.threads)
    claim_out_dir(cfg, resume, overwrite)
    with CollectiveGuard(rank, world, cfg.train.collective_timeout_s) as guard:
        r = set_up(cfg, rank, world, resume, hooks or Hooks())
        try:
            for step in range(r.start, cfg.train.steps):
                guard.step = done = step + 1
                train_step(r, step)
                if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                    log_step(r, done)
                stopping = stop_after is not None and stop_after <= done < cfg.train.steps
                if stopping or (cfg.train.save_every and done % cfg.train.save_every == 0 and done != cfg.train.steps):
                    save(r, done)
                if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done != cfg.train.steps:
                    evaluate_mid_run(r, done)
                r.bar.update(1)
                if stopping:
                    return stop(r, done)
            return finish(r)
        finally:
            r.bar.close()  # a bar left open would put an error message on its line


def set_up(cfg: ExperimentConfig, rank: int, world: int, resume: bool, hooks: Hooks) -> Run:
    """Data, model, engine and (with `resume`) the newest intact checkpoint; the run's output folder."""
    torch.manual_seed(cfg.seed)
    ckpt_dir = Path(cfg.train.out_dir) / "checkpoints"
    tok = load_tokenizer()
    resume_from = (
        ckpt.newest_intact(ckpt_dir) if resume else None
    )  # skips unfinished saves, falls back past damaged ones
    if resume and resume_from is None and rank == 0:
        print(f"pathways-mm: no checkpoint under {ckpt_dir}; starting from step 0", file=sys.stderr)
    resume_meta = None
    if resume_from is not None:
        resume_meta = ckpt.read_meta(resume_from)
        ckpt.check_compatible(resume_meta, cfg, tok, where=str(resume_from / ckpt.META_FILE))
        if resume_meta["step"] > cfg.train.steps:
            raise ConfigError(
                f"{resume_from}: --resume from step {resume_meta['step']}, past train.steps={cfg.train.steps}; "
                "raise train.steps to continue that run, or start over with --overwrite"
            )
    ts = load_tasks(cfg)
    model = build_model(cfg.model, tok.vocab_size)
    hooks.model_built(model, rank, world)
    engine = ds_engine.initialize(model, cfg, world)
    start = 0
    if resume_from is not None:
        reshard.resume(engine, resume_from, resume_meta, world)
        start = resume_meta["step"]
    hooks.engine_ready(engine, ts, tok)
    r = Run(
        cfg,
        rank,
        world,
        hooks,
        tok,
        ts,
        engine,
        make_sampler(cfg, ts),
        start,
        LossWindow(len(ts.tasks), ds_engine.device()),
        log=None,
    )
    if rank == 0:
        r.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(r.out_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        r.log = open_logs(r.out_dir, cfg.train.log_to, start if resume_from is not None else None)
        n_total, n_active = param_counts(model)
        mixture = dict(zip(ts.table, r.sampler.probs.round(3).tolist()))
        peers = ds_engine.expert_peers(cfg)
        ep = f" (rank 0 exchanges tokens with ranks {peers})" if peers else ""
        r.say(
            f"{cfg.name}: {len(ts.tasks)} tasks ({', '.join(ts.table)}), {n_total / 1e6:.2f}M params "
            f"({n_active / 1e6:.2f}M active), {world} process(es){ep}, steps {start}->{cfg.train.steps}, mixture {mixture}"
        )
    if "tensorboard" in cfg.train.log_to and cfg.model.moe.num_experts:
        r.load = routes.LoadWindow(engine)
    r.bar = tqdm(total=cfg.train.steps, initial=start, desc="train", disable=rank != 0, dynamic_ncols=True)
    r.bad = BadSamples(cfg.data, list(ts.table), r.say, sum(map(len, ts.train)))
    r.batches = micro_batches(cfg, ts, r.sampler, tok, rank, start)
    engine.train()
    return r


def train_step(r: Run, step: int) -> None:
    """Forward and backward over the micro-batches of one step; then step, or skip if anything is
    non-finite on any rank (`train.max_bad_steps` in a row abort the run)."""
    done, dev = step + 1, ds_engine.device()
    faults.maybe_die("hang", done, r.rank)
    micro_stats = []
    for micro in range(r.cfg.train.grad_accum):
        loaded = next(r.batches)
        assert (loaded.step, loaded.micro) == (step, micro), ((loaded.step, loaded.micro), (step, micro))
        r.bad.add(loaded)
        batch = loaded.batch.to(dev)
        out = forward_loss(r.engine, batch, r.cfg.train.loss_norm)
        r.engine.backward(out.loss)
        if micro + 1 < r.cfg.train.grad_accum:
            r.engine.step()  # not a boundary: DeepSpeed only counts the micro-step
        micro_stats.append(((out.lm_loss.detach(), batch.task_ids, out.nll_B, out.num_tokens_B), out.stats))
    faults.maybe_die("kill", done, r.rank)
    if faults.hit("nan_grad", done, r.rank):
        ds_engine.inject_nan_grad(r.engine)
    # Every rank must agree, or one rank's update would leave the replicas out of sync. The one
    # host sync per step this costs is what DeepSpeed's fp16 overflow check costs too.
    if ds_engine.agree_all_finite(ds_engine.grads_finite(r.engine, out.loss)):
        r.engine.step()
        r.bad_in_a_row = 0
        for losses, stats in micro_stats:
            r.window.add(*losses)
            r.stats.add(stats)
        return
    ds_engine.skip_step(r.engine)
    r.bad_in_a_row += 1
    if r.log is not None:  # DeepSpeed keeps the count in its checkpoints, so it survives a resume
        r.log.write({"step": done, "skipped": "non-finite loss or gradient", "skipped_steps": r.engine.skipped_steps})
    r.say(f"step {done}: non-finite loss or gradient; step skipped")
    if r.bad_in_a_row >= r.cfg.train.max_bad_steps:
        raise TrainingAborted(
            f"{r.bad_in_a_row} steps in a row (up to step {done}) had a non-finite loss or gradient "
            f"(train.max_bad_steps={r.cfg.train.max_bad_steps}); lower train.lr or check the data, "
            "then continue from the last checkpoint with --resume"
        )


def log_step(r: Run, done: int) -> None:
    """Mean loss and per-task loss, each MoE layer's routing objectives (and expert load) since the
    last log step, over every rank, into the logs (with data.on_bad_sample: skip, the bad samples too)."""
    try:
        bad = r.bad.reduce(ds_engine.device()) if r.cfg.data.on_bad_sample == "skip" else {}
    except TooManyBadSamples as e:  # every rank raises at this step: save (together), then stop
        path = save(r, done)
        raise TooManyBadSamples(
            f"{e}; saved {path} first. List them with `pathways-mm data check CONFIG` and fix or remove them, "
            "or raise data.max_bad_fraction (--set data.max_bad_fraction=...) and continue with --resume"
        ) from None
    if r.window.empty:
        return
    loss, per_task = r.window.reduce(done, r.ts.table)
    routing = r.stats.reduce()
    load = r.load.reduce(r.ts.table) if r.load is not None else None
    if r.log is not None:
        lr = r.engine.get_lr()[0]
        record = {
            "step": done,
            "loss": loss,
            "task_loss": per_task,
            "lr": lr,
            "skipped_steps": r.engine.skipped_steps,
            "elapsed_s": round(time.time() - r.t0, 2),
            **bad,
        }
        r.log.write(record | ({"routing": routing} if routing else {}) | ({"expert_load": load} if load else {}))
        r.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")


def save(r: Run, done: int) -> Path:
    meta = {**ckpt.checkpoint_meta(r.cfg, r.ts.table, r.tok, done), **r.hooks.meta()}
    meta["layout"] = reshard.layout(r.engine, r.world)
    return ckpt.save_checkpoint(r.engine, r.ckpt_dir, done, meta, r.cfg.train.keep_checkpoints)


def evaluate_mid_run(r: Run, done: int) -> None:
    result = evaluate_and_route(r, done)
    r.engine.train()
    if r.log is not None:
        r.log.write({"step": done, "eval": result})


def evaluate_and_route(r: Run, step: int) -> dict[str, Any]:
    """`evaluate`; with `eval.routes`, also write where the evaluated tokens went to out_dir/routes/.

    The training steps' expert load is set aside first and counting restarts after: evaluated
    tokens are not training routes.
    """
    if r.load is not None:
        r.load.harvest()
    if r.cfg.eval.routes:
        routes.start(r.engine)
    results = evaluate(r.engine, r.cfg, r.ts.tasks, r.tok, train_sets=r.ts.train)
    if r.cfg.eval.routes:
        ckpt_id = {"path": None, "run_dir": str(r.out_dir.resolve()), "step": step, "tokenizer_hash": r.tok.hash}
        doc = routes_file.document(
            routes.finish(r.engine),
            r.cfg,
            [t.name for t in r.ts.tasks],
            ckpt_id,
            routes.routed_data(results, r.cfg.eval.split),
        )
        if r.rank == 0:
            routes_file.write(r.out_dir / "routes" / f"{ckpt.tag_for(step)}.json", doc)
    if r.load is not None:
        r.load.restart()
    return results


def stop(r: Run, done: int) -> dict[str, Any]:
    """`--stop-after`: the checkpoint is saved; say how to continue."""
    r.bar.close()
    r.batches = None  # ends the DataLoader's workers
    if r.log is not None:
        r.log.close()
    path = r.ckpt_dir / ckpt.tag_for(done)
    r.say(f"stopped after step {done}; checkpoint {path}; continue with --resume")
    return {"step": done, "checkpoint": str(path), "stopped": True}


def finish(r: Run) -> dict[str, Any]:
    """The last step is done: check the replicas agree, save, evaluate, print the summary."""
    steps = r.cfg.train.steps
    r.bar.close()
    r.batches = None  # ends the DataLoader's workers
    r.hooks.trained(r.engine)
    in_sync = ds_engine.weights_in_sync(r.engine, r.world)
    final = r.ckpt_dir / ckpt.tag_for(steps)
    if r.start < steps or not final.exists():
        final = save(r, steps)
    last_eval = evaluate_and_route(r, steps)
    passes = dict(zip(r.ts.table, (round(p, 4) for p in r.sampler.passes(steps, r.cfg.train.micro_batch_size))))
    summary = {
        "step": steps,
        "checkpoint": str(final),
        "eval": last_eval,
        "train_s": round(time.time() - r.t0, 1),
        "weights_in_sync": in_sync,
        "passes": passes,
    }
    if r.log is not None:
        r.log.write({"step": steps, "eval": last_eval, "weights_in_sync": in_sync, "passes": passes})
        r.log.close()
        print(format_table(last_eval), file=sys.stderr)
        r.say(
            "passes over each task's training data (1 = every sample once): "
            + ", ".join(f"{t} {p:.2f}" for t, p in passes.items())
        )
        if r.bad.bad_total:
            share = r.bad.bad_total / max(1, r.bad.read_total)
            r.say(f"skipped {r.bad.bad_total} bad samples of the {r.bad.read_total} read ({share:.2%})")
        r.say(f"done in {summary['train_s']}s; checkpoint {final}; metrics {r.out_dir / 'metrics.jsonl'}")
    return summary
