"""Datasets on disk and the multi-task mixture sampler (collation lives in pathways_mm.collate).

The batch at optimizer step s, micro-step m on rank r is a pure function of (seed, s, m, r):
no iterator state exists, so a resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pathways_mm.errors import ConfigError
from pathways_mm.tasks.base import Task



def split_path(task: Task, split: str, root: Path, seed: int) -> Path:
    version = getattr(task, "data_version", 1)
    return Path(root) / task.name / f"{split}-seed{seed}-v{version}.jsonl"


def load_split(task: Task, split: str, root: Path, seed: int) -> list[Any]:
    """Samples of one split, built once into `root` (atomically) and read back afterwards."""
    if split not in task.splits:
        raise ConfigError(f"task '{task.name}' has no split '{split}'; it has {list(task.splits)}")
    path = split_path(task, split, root, seed)
    task.bind(Path(root), seed)
    if path.is_file():
        with path.open() as f:
            return [json.loads(line) for line in f]
    samples = list(task.build_dataset(split, Path(root), seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        for s in samples:
            f.write(json.dumps(s, sort_keys=True) + "\n")
    os.replace(tmp, path)  # a half-written split is never read
    return samples


class MixtureSampler:
    """Temperature sampling over tasks: p_t ∝ n_t ** (1 / T) * w_t, then a uniform sample.

    The weights multiply after the temperature: with a large T (near-uniform over tasks) a weight
    of 2 still means twice the share, rather than vanishing into the T-th root.
    """

    def __init__(self, sizes: Sequence[int], temperature: float, seed: int, weights: Sequence[float] | None = None):
        sizes_arr = np.asarray(sizes, dtype=np.float64)
        if (sizes_arr <= 0).any():
            raise ConfigError(f"every task needs at least one training sample (sizes {list(sizes)})")
        w = np.ones_like(sizes_arr) if weights is None else np.asarray(weights, dtype=np.float64)
        p = sizes_arr ** (1.0 / temperature) * w
        self.probs = p / p.sum()
        self.sizes = [int(s) for s in sizes]
        self.seed = seed

    def draw(self, num: int, step: int, micro: int = 0, rank: int = 0) -> list[tuple[int, int]]:
        """`num` (task index, sample index) pairs for one micro-batch."""
        rng = np.random.default_rng([self.seed, step, micro, rank])
        tasks = rng.choice(len(self.sizes), size=num, p=self.probs)
        return [(int(t), int(rng.integers(self.sizes[t]))) for t in tasks]
