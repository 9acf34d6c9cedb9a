"""Bad samples a run skipped (`data.on_bad_sample: skip`): counted per task, logged to
metrics.jsonl, and the run stopped once too many of the samples read were bad.

The share is judged only once it can be: after as many samples as the training data holds, or
as make ten bad ones expected at `data.max_bad_fraction`, whichever comes first; before that,
only a count far above the limit (three standard deviations and one more) stops the run. So a
few bad rows that happen to come early do not end a run whose data is within the limit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from pathways_mm import dist
from pathways_mm.config import DataConfig
from pathways_mm.data.taskset import LoadedBatch
from pathways_mm.errors import ConfigError

SHOWN = 5  # bad samples named on stderr (each rank's own); the counts cover all
EXPECTED_BAD = 10  # bad samples expected at the limit before the share alone is judged


class TooManyBadSamples(ConfigError):
    """More than data.max_bad_fraction of the samples read were bad (the run saves, then stops)."""


def judge_after(cfg: DataConfig, num_rows: int) -> int:
    """Samples to read before the share of bad ones is judged: the whole training data, or enough
    that EXPECTED_BAD bad ones are expected at the limit, whichever is fewer."""
    if cfg.max_bad_fraction <= 0:
        return 0
    return min(num_rows, math.ceil(EXPECTED_BAD / cfg.max_bad_fraction))


def clearly_over(bad: int, read: int, limit: float) -> bool:
    """`bad` of `read` is far above `limit`: past its mean by three standard deviations and one."""
    expected = limit * read
    return bad > expected + 3 * math.sqrt(expected) + 1


class BadSamples:
    """Samples read and skipped on this rank since the last log step, and over every rank since the run (re)started."""

    def __init__(self, cfg: DataConfig, tasks: list[str], say: Callable[[str], None], num_rows: int):
        """num_rows: the training samples of every task together (`judge_after`)."""
        self.cfg, self.tasks, self.say = cfg, tasks, say
        self.judge_after = judge_after(cfg, num_rows)
        self.window = torch.zeros(1 + len(tasks), dtype=torch.float64)  # read, bad per task
        self.read_total = 0
        self.bad_total = 0
        self.shown = 0

    def add(self, loaded: LoadedBatch) -> None:
        """Count a micro-batch's samples; its error (on_bad_sample: error) stops the run."""
        if loaded.error is not None:
            raise ConfigError(f"{loaded.error} (data.on_bad_sample: skip would leave it out)")
        self.window[0] += loaded.num_read
        for t, msg in loaded.bad:
            self.window[1 + t] += 1
            if self.shown < SHOWN:
                self.shown += 1
                self.say(f"skipped a bad sample of {self.tasks[t]}: {msg}")

    def reduce(self, device: torch.device) -> dict[str, Any]:
        """Every rank's counts since the last call, for metrics.jsonl; TooManyBadSamples past data.max_bad_fraction."""
        window = dist.all_reduce_(self.window.to(device, copy=True)).cpu()
        self.window.zero_()
        self.read_total += int(window[0])
        self.bad_total += int(window[1:].sum())
        fraction = self.bad_total / max(1, self.read_total)
        limit = self.cfg.max_bad_fraction
        judged = self.read_total >= self.judge_after or clearly_over(self.bad_total, self.read_total, limit)
        if judged and fraction > limit:
            raise TooManyBadSamples(
                f"{self.bad_total} of the {self.read_total} samples read were bad ({fraction:.2%}), more than "
                f"data.max_bad_fraction={limit}"
            )
        per_task = {t: int(n) for t, n in zip(self.tasks, window[1:].tolist()) if n}
        return {"bad_samples": per_task, "bad_total": self.bad_total, "read_total": self.read_total}
