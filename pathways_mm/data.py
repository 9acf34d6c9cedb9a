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
from pathways_mm.tasks.base import MultimodalExample, Task



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
        return _read_cache(path)
    samples = list(task.build_dataset(split, Path(root), seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            for s in samples:
                f.write(json.dumps(s, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # a half-written split is never read
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return samples


def _read_cache(path: Path) -> list[Any]:
    try:
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f]
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError: damaged after it was written
        raise ConfigError(f"{path}: damaged dataset cache ({type(e).__name__}); delete it and it is rebuilt") from None


def encode(task: Task, sample: Any) -> MultimodalExample:
    """`task.encode(sample)`, with a malformed sample reported as a ConfigError naming the task."""
    try:
        ex = task.encode(sample)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise ConfigError(
            f"task '{task.name}': cannot encode sample {str(sample)[:80]!r} ({type(e).__name__}: {e}); "
            f"if it came from the dataset cache under {task.name}/, delete that file to rebuild it"
        ) from None
    _check_example(ex, task.name)
    return ex


def _check_example(ex: Any, where: str) -> None:
    ok = (
        isinstance(ex, MultimodalExample)
        and isinstance(ex.target_text, str)
        and isinstance(ex.segments, (tuple, list))
        and all(isinstance(seg, (tuple, list)) and len(seg) == 2 and isinstance(seg[0], str) for seg in ex.segments)
    )
    if not ok:
        raise ConfigError(
            f"task '{where}': encode must return MultimodalExample(segments=((modality, raw), ...), target_text=str), "
            f"got {str(ex)[:120]}"
        )


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
