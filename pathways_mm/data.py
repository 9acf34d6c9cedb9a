"""Datasets on disk, the multi-task mixture sampler and collation into model batches.

The batch at optimizer step s, micro-step m on rank r is a pure function of (seed, s, m, r):
no iterator state exists, so a resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from pathways_mm.encoders.text import TextTokenizer
from pathways_mm.errors import ConfigError
from pathways_mm.tasks.base import MultimodalExample, Task

IGNORE = -100


def split_path(task: Task, split: str, root: Path, seed: int) -> Path:
    version = getattr(task, "data_version", 1)
    return Path(root) / task.name / f"{split}-seed{seed}-v{version}.jsonl"


def load_split(task: Task, split: str, root: Path, seed: int) -> list[Any]:
    """Samples of one split, built once into `root` (atomically) and read back afterwards."""
    if split not in task.splits:
        raise ConfigError(f"task '{task.name}' has no split '{split}'; it has {list(task.splits)}")
    path = split_path(task, split, root, seed)
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
    """Temperature sampling over tasks: p_t ∝ (n_t * w_t) ** (1 / T), then a uniform sample."""

    def __init__(self, sizes: Sequence[int], temperature: float, seed: int, weights: Sequence[float] | None = None):
        sizes_arr = np.asarray(sizes, dtype=np.float64)
        if (sizes_arr <= 0).any():
            raise ConfigError(f"every task needs at least one training sample (sizes {list(sizes)})")
        w = np.ones_like(sizes_arr) if weights is None else np.asarray(weights, dtype=np.float64)
        p = (sizes_arr * w) ** (1.0 / temperature)
        self.probs = p / p.sum()
        self.sizes = [int(s) for s in sizes]
        self.seed = seed

    def draw(self, num: int, step: int, micro: int = 0, rank: int = 0) -> list[tuple[int, int]]:
        """`num` (task index, sample index) pairs for one micro-batch."""
        rng = np.random.default_rng([self.seed, step, micro, rank])
        tasks = rng.choice(len(self.sizes), size=num, p=self.probs)
        return [(int(t), int(rng.integers(self.sizes[t]))) for t in tasks]


@dataclass
class Batch:
    tokens: torch.Tensor  # [B, L] token ids; position 0 is the task slot
    task_ids: torch.Tensor  # [B]
    prefix_len: torch.Tensor  # [B] task token + prompt
    lengths: torch.Tensor  # [B] real length (the rest is padding)
    labels: torch.Tensor  # [B, L] next token at each position, IGNORE where no loss
    target_bytes: torch.Tensor  # [B] UTF-8 bytes of the target text that was kept

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(**{k: v.to(device) for k, v in self.__dict__.items()})

    def __len__(self) -> int:
        return self.tokens.shape[0]


def _prompt_text(ex: MultimodalExample) -> str:
    parts = []
    for modality, raw in ex.segments:
        if modality != "text":
            raise ConfigError(f"task '{ex.task}': modality '{modality}' needs its encoder; only text is built in so far")
        if not isinstance(raw, str):
            raise ConfigError(f"task '{ex.task}': a text segment must be a string, got {type(raw).__name__}")
        parts.append(raw)
    return " ".join(parts)


def collate(
    examples: Sequence[MultimodalExample],
    task_ids: Sequence[int],
    tokenizer: TextTokenizer,
    max_len: int,
    with_target: bool = True,
) -> Batch:
    """Tokenise, lay out `[task][prompt][target][eos]`, pad right. Targets are cut to fit max_len."""
    rows, prefixes, nbytes = [], [], []
    for ex in examples:
        _check_example(ex, getattr(ex, "task", "?"))
        prompt = tokenizer.encode(_prompt_text(ex))
        prefix = [tokenizer.bos_id] + prompt  # slot 0 is replaced by the task embedding
        if len(prefix) >= max_len:
            raise ConfigError(
                f"task '{ex.task}': a prompt of {len(prompt)} tokens does not fit data.max_len={max_len}; raise data.max_len"
            )
        target = tokenizer.encode(ex.target_text) if with_target else []
        room = max_len - len(prefix) - 1
        target = target[:room]
        rows.append(prefix + target + ([tokenizer.eos_id] if with_target else []))
        prefixes.append(len(prefix))
        nbytes.append(len(tokenizer.decode_bytes(target)))
    B, L = len(rows), max(len(r) for r in rows)
    tokens = torch.full((B, L), tokenizer.pad_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
        p = prefixes[i]
        labels[i, p - 1 : len(row) - 1] = torch.tensor(row[p:], dtype=torch.long)
    return Batch(
        tokens=tokens,
        task_ids=torch.tensor(list(task_ids), dtype=torch.long),
        prefix_len=torch.tensor(prefixes, dtype=torch.long),
        lengths=torch.tensor([len(r) for r in rows], dtype=torch.long),
        labels=labels,
        target_bytes=torch.tensor(nbytes, dtype=torch.long),
    )
