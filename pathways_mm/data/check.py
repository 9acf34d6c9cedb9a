"""`pathways-mm data check CONFIG`: read every sample of every declared task, as training would
(read, decode, lay out), and list the bad ones without training.

Samples are read by `data.num_workers` background processes (a DataLoader over sample indices).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pathways_mm.config import ExperimentConfig, data_root
from pathways_mm.data.collate import collate
from pathways_mm.data.datasets import encode, load_split
from pathways_mm.data.taskset import resolve_tasks, whole_targets
from pathways_mm.encoders.text import TextTokenizer, load_tokenizer
from pathways_mm.errors import ConfigError
from pathways_mm.tasks import Task


class Bad(NamedTuple):
    task: str
    split: str
    message: str  # names the file and the line or key


class _Checks(Dataset):
    """Sample i -> None if training could use it, else what is wrong with it."""

    def __init__(self, task: Task, split: str, samples: Sequence[Any], cfg: ExperimentConfig, tok: TextTokenizer):
        self.task, self.split, self.samples, self.cfg, self.tok = task, split, samples, cfg, tok
        self.whole = whole_targets([task])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> str | None:
        try:
            sample = self.samples[i]
            ex = encode(self.task, sample, f"{self.split}[{i}]")
            cfg = self.cfg
            collate([ex], [0], self.tok, cfg.data.max_len, model_cfg=cfg.model, keys=[sample], whole_targets=self.whole)
        except ConfigError as e:
            return str(e)
        return None


def _as_is(item: str | None) -> str | None:
    return item


def check_data(cfg: ExperimentConfig, num_workers: int | None = None) -> list[Bad]:
    """Every bad sample of every split of every task `cfg` declares (printed as found); ConfigError if any."""
    if not cfg.declare:
        raise ConfigError(
            f"{cfg.source}: declares no tasks (a declare: section); data check reads declared tasks' files"
        )
    workers = cfg.data.num_workers if num_workers is None else num_workers
    tok = load_tokenizer()
    root = data_root(cfg)
    bad: list[Bad] = []
    counts = []
    total = 0
    for task in resolve_tasks(cfg, list(cfg.declare)):
        for split in task.splits:
            samples = load_split(task, split, root, cfg.data.seed)
            for damage in getattr(samples, "damage", []):
                bad.append(Bad(task.name, split, damage))
                print(f"bad: {task.name} {split}: {damage}")
            loader = DataLoader(
                _Checks(task, split, samples, cfg, tok), batch_size=None, num_workers=workers, collate_fn=_as_is
            )
            before = len(bad)
            total += len(samples)
            for msg in tqdm(loader, total=len(samples), desc=f"{task.name} {split}", unit="sample", file=sys.stderr):
                if msg is not None:
                    bad.append(Bad(task.name, split, msg))
                    tqdm.write(f"bad: {task.name} {split}: {msg}", file=sys.stdout)
            counts.append(f"{task.name} {split}: {len(samples)} samples, {len(bad) - before} bad")
    print("\n".join(counts))
    if bad:
        share = len(bad) / max(1, total)
        raise ConfigError(
            f"{len(bad)} bad samples of {total} ({share:.2%}, listed above); fix or remove them, or train with "
            f"data.on_bad_sample: skip, which stops a run once more than data.max_bad_fraction "
            f"(now {cfg.data.max_bad_fraction}) of the samples it reads are bad"
        )
    return bad
