"""The configured tasks of a run, their training samples, and the batch at (step, micro-step, rank)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pathways_mm import dist
from pathways_mm.config import ExperimentConfig, data_root
from pathways_mm.data.collate import collate
from pathways_mm.data.datasets import encode, load_split
from pathways_mm.data.declared import declare_tasks
from pathways_mm.data.sampler import MixtureSampler
from pathways_mm.data.sources import Row
from pathways_mm.encoders.text import TextTokenizer
from pathways_mm.errors import ConfigError
from pathways_mm.model.batch import Batch, PackedBatch
from pathways_mm.tasks import Task, ensure_loaded, get_task


@dataclass
class TaskSet:
    """The configured tasks, their ids (the task table) and their training samples (a list, or a
    declared task's source: an index whose rows are read when asked for)."""

    tasks: list[Task]
    train: list[Sequence[Any]]

    @property
    def table(self) -> dict[str, int]:
        return {t.name: i for i, t in enumerate(self.tasks)}


def resolve_tasks(cfg: ExperimentConfig, names: Sequence[str] | None = None) -> list[Task]:
    """The tasks `names` (default: the config's), after loading plugins and declaring the config's tasks."""
    ensure_loaded(cfg.plugins)
    declare_tasks(cfg)
    return [get_task(name) for name in (cfg.tasks if names is None else names)]


def load_tasks(cfg: ExperimentConfig) -> TaskSet:
    """Build (rank 0 first, the others then read its cache) and load the configured tasks."""
    tasks = resolve_tasks(cfg)
    root = data_root(cfg)
    rank = dist.rank_world()[0]
    if rank != 0:
        dist.barrier()
    train = [load_split(t, "train", root, cfg.data.seed) for t in tasks]
    if rank == 0:
        dist.barrier()
    return TaskSet(tasks=tasks, train=train)


def make_sampler(cfg: ExperimentConfig, ts: TaskSet, world: int | None = None) -> MixtureSampler:
    """The run's sampler; the stream of samples it walks is laid out over `world` ranks (default:
    this process group's) and train.grad_accum micro-steps."""
    weights = [cfg.mixture.weights.get(t.name, 1.0) for t in ts.tasks]
    sizes = [len(s) for s in ts.train]
    world = world or dist.rank_world()[1]
    return MixtureSampler(
        sizes, cfg.mixture.temperature, cfg.seed, weights, micro_batches=cfg.train.grad_accum, world=world
    )


@dataclass
class LoadedBatch:
    """The micro-batch at (step, micro) and what went wrong reading it.

    `bad`: (task index, message) of each sample left out (data.on_bad_sample: skip); `error`:
    the first bad sample's message when bad samples stop the run (raised by the consumer, so a
    DataLoader worker does not wrap it in its own traceback).
    """

    step: int
    micro: int
    batch: Batch | PackedBatch | None  # packed while it travels from a DataLoader worker
    num_read: int
    bad: list[tuple[int, str]] = field(default_factory=list)
    error: str | None = None

    def pin_memory(self) -> LoadedBatch:  # called by the DataLoader's pinning thread
        return self if self.batch is None else dataclasses.replace(self, batch=self.batch.pin_memory())


def load_batch(
    cfg: ExperimentConfig, ts: TaskSet, sampler: MixtureSampler, tok: TextTokenizer, step: int, micro: int, rank: int
) -> LoadedBatch:
    """The training micro-batch at (step, micro, rank): a pure function of those, the seed and the data."""
    picks = sampler.draw(cfg.train.micro_batch_size, step, micro, rank)
    skip = cfg.data.on_bad_sample == "skip"
    examples, task_ids, keys, bad = [], [], [], []
    for t, i in picks:
        try:
            sample = ts.train[t][i]
            examples.append(encode(ts.tasks[t], sample, f"train[{i}]"))
        except ConfigError as e:  # a bad sample: BadSample from a source, or an encode error
            if not skip:
                return LoadedBatch(step, micro, None, len(picks), error=str(e))
            bad.append((t, str(e)))
            continue
        task_ids.append(t)
        keys.append(sample if isinstance(sample, Row) else f"train[{i}]")  # a Row names its file and line
    # augmentation comes from the batch key too: a resumed run redraws exactly the same batch
    rng = np.random.default_rng([cfg.seed, step, micro, rank, 1])
    on_bad = (lambda b, e: bad.append((task_ids[b], str(e)))) if skip else None
    try:
        batch = collate(
            examples,
            task_ids,
            tok,
            cfg.data.max_len,
            model_cfg=cfg.model,
            rng=rng,
            keys=keys,
            on_bad=on_bad,
            whole_targets=whole_targets(ts.tasks),
        )
    except ConfigError as e:
        where = f"step {step + 1}, micro-step {micro}, rank {rank}"
        msg = str(e) if not skip else f"every sample of the micro-batch at {where} was bad; the first: {bad[0][1]}"
        return LoadedBatch(step, micro, None, len(picks), bad, error=msg)
    return LoadedBatch(step, micro, batch, len(picks), bad)


def whole_targets(tasks: Sequence[Task]) -> set[str]:
    """The tasks whose targets are never cut to fit data.max_len: a declared task's row is one
    answer, which exact match could never score cut (a built-in LM chunk is text to learn from)."""
    return {t.name for t in tasks if getattr(t, "declared", False)}


def train_batch(
    cfg: ExperimentConfig, ts: TaskSet, sampler: MixtureSampler, tok: TextTokenizer, step: int, micro: int, rank: int
) -> Batch:
    """The training micro-batch at (step, micro, rank): a pure function of those and the seed."""
    loaded = load_batch(cfg, ts, sampler, tok, step, micro, rank)
    if loaded.error is not None:
        raise ConfigError(loaded.error)
    return loaded.batch
