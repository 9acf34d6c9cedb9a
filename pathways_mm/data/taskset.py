"""The configured tasks of a run, their training samples, and the batch at (step, micro-step, rank)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pathways_mm import dist
from pathways_mm.config import ExperimentConfig, data_root
from pathways_mm.data.collate import collate
from pathways_mm.data.datasets import encode, load_split
from pathways_mm.data.sampler import MixtureSampler
from pathways_mm.encoders.text import TextTokenizer
from pathways_mm.model.batch import Batch
from pathways_mm.tasks import Task, ensure_loaded, get_task


@dataclass
class TaskSet:
    """The configured tasks, their ids (the task table) and their training samples."""

    tasks: list[Task]
    train: list[list[Any]]

    @property
    def table(self) -> dict[str, int]:
        return {t.name: i for i, t in enumerate(self.tasks)}


def load_tasks(cfg: ExperimentConfig) -> TaskSet:
    """Build (rank 0 first, the others then read its cache) and load the configured tasks."""
    ensure_loaded(cfg.plugins)
    tasks = [get_task(name) for name in cfg.tasks]
    root = data_root(cfg)
    rank = dist.rank_world()[0]
    if rank != 0:
        dist.barrier()
    train = [load_split(t, "train", root, cfg.data.seed) for t in tasks]
    if rank == 0:
        dist.barrier()
    return TaskSet(tasks=tasks, train=train)


def make_sampler(cfg: ExperimentConfig, ts: TaskSet) -> MixtureSampler:
    """The run's sampler; the stream of samples it walks is laid out over this many ranks and micro-steps."""
    weights = [cfg.mixture.weights.get(t.name, 1.0) for t in ts.tasks]
    sizes = [len(s) for s in ts.train]
    world = dist.rank_world()[1]
    return MixtureSampler(
        sizes, cfg.mixture.temperature, cfg.seed, weights, micro_batches=cfg.train.grad_accum, world=world
    )


def train_batch(
    cfg: ExperimentConfig, ts: TaskSet, sampler: MixtureSampler, tok: TextTokenizer, step: int, micro: int, rank: int
) -> Batch:
    """The training micro-batch at (step, micro, rank): a pure function of those and the seed."""
    picks = sampler.draw(cfg.train.micro_batch_size, step, micro, rank)
    examples = [encode(ts.tasks[t], ts.train[t][i]) for t, i in picks]
    keys = [f"train[{i}]" for _, i in picks]
    # augmentation comes from the batch key too: a resumed run redraws exactly the same batch
    rng = np.random.default_rng([cfg.seed, step, micro, rank, 1])
    return collate(examples, [t for t, _ in picks], tok, cfg.data.max_len, model_cfg=cfg.model, rng=rng, keys=keys)
