"""The multi-task mixture: which (task, sample) pairs make the batch at a given step.

The batch at optimizer step s, micro-step m on rank r is a pure function of (seed, s, m, r):
no iterator state exists, so a resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pathways_mm.errors import ConfigError


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
