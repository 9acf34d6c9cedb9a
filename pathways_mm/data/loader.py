"""Background input pipeline: a torch DataLoader whose items are whole micro-batches.

Item (step, micro) is `load_batch(...)` at that key, a pure function of it, so the batches do
not depend on how many workers make them or in which order they finish (the DataLoader hands
them out in key order): 0, 1 or 8 workers, and a resumed run, see the same batches. Workers
read, decode, augment and collate `data.prefetch_factor` micro-batches each ahead of the step;
with `data.pin_memory` on a GPU the batches arrive in page-locked memory. A worker hands a
batch over packed into one buffer per dtype (`Batch.packed`): receiving a tensor from another
process costs a shared-memory segment each, and a batch has up to 15 of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pathways_mm.config import ExperimentConfig
from pathways_mm.data.sampler import MixtureSampler
from pathways_mm.data.taskset import LoadedBatch, TaskSet, load_batch
from pathways_mm.encoders.text import TextTokenizer
from pathways_mm.model.batch import PackedBatch


class _MicroBatches(Dataset):
    """Micro-batch (step, micro) of one rank; `pack`: as a `PackedBatch` (made in a worker)."""

    def __init__(
        self, cfg: ExperimentConfig, ts: TaskSet, sampler: MixtureSampler, tok: TextTokenizer, rank: int, pack: bool
    ):
        self.cfg, self.ts, self.sampler, self.tok, self.rank, self.pack = cfg, ts, sampler, tok, rank, pack

    def __getitem__(self, key: tuple[int, int]) -> LoadedBatch:
        step, micro = key
        loaded = load_batch(self.cfg, self.ts, self.sampler, self.tok, step, micro, self.rank)
        if self.pack and loaded.batch is not None:
            return dataclasses.replace(loaded, batch=loaded.batch.packed())
        return loaded


class _Keys(Sampler):
    """(step, micro) for steps [start, stop), every micro-step of each."""

    def __init__(self, start: int, stop: int, micro_batches: int):
        self.start, self.stop, self.micro_batches = start, stop, micro_batches

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((s, m) for s in range(self.start, self.stop) for m in range(self.micro_batches))

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.micro_batches


def _as_is(item: LoadedBatch) -> LoadedBatch:
    return item


def _unpacked(loaded: LoadedBatch) -> LoadedBatch:
    if isinstance(loaded.batch, PackedBatch):
        return dataclasses.replace(loaded, batch=loaded.batch.unpacked())
    return loaded


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)  # a worker decodes one sample at a time; more threads only fight the step's


def micro_batches(
    cfg: ExperimentConfig,
    ts: TaskSet,
    sampler: MixtureSampler,
    tok: TextTokenizer,
    rank: int,
    start: int,
    stop: int | None = None,
    num_workers: int | None = None,
) -> Iterator[LoadedBatch]:
    """This rank's micro-batches of steps [start, stop) in order, made by `data.num_workers`
    background processes (or `num_workers`; 0 = in this process, when asked for)."""
    workers = cfg.data.num_workers if num_workers is None else num_workers
    keys = _Keys(start, cfg.train.steps if stop is None else stop, cfg.train.grad_accum)
    loader = DataLoader(
        _MicroBatches(cfg, ts, sampler, tok, rank, pack=workers > 0),
        batch_size=None,
        sampler=keys,
        num_workers=workers,
        collate_fn=_as_is,
        pin_memory=cfg.data.pin_memory and torch.cuda.is_available(),
        prefetch_factor=cfg.data.prefetch_factor if workers else None,
        worker_init_fn=_worker_init if workers else None,
    )
    return map(_unpacked, loader)
