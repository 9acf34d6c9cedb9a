"""The round-robin timing loop every speed figure uses (benchmarks, `export --time-generation`).

Rows timed in the same run, iterations round-robin over them, so load on a shared host hits
every row alike: quote their ratios.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round_robin(
    steps: Sequence[Callable[[], None]],
    device: torch.device,
    warmup: int,
    iters: int,
    setup: Sequence[Callable[[], None]] | None = None,
    alternate: bool = False,
) -> list[list[float]]:
    """Milliseconds of every iteration of each step, iterations round-robin over the steps.

    `setup[i]` runs before each call of step i, outside the timed region; `alternate` reverses
    the order of the steps every other iteration (for two rows that share caches).
    """
    order = list(range(len(steps)))
    times: list[list[float]] = [[] for _ in steps]
    for it in range(warmup + iters):
        for i in order if not alternate or it % 2 == 0 else order[::-1]:
            if setup is not None:
                setup[i]()
            sync(device)
            t0 = time.perf_counter()
            steps[i]()
            sync(device)
            if it >= warmup:
                times[i].append((time.perf_counter() - t0) * 1e3)
    return times


def median_ms(times: list[list[float]]) -> list[float]:
    return [statistics.median(ts) for ts in times]
