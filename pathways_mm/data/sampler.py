"""The multi-task mixture: which (task, sample) pairs make the batch at a given step.

The batch at optimizer step s, micro-step m on rank r is a pure function of (seed, s, m, r):
no iterator state exists, so a resumed run sees exactly the batches an uninterrupted run would.

Training reads one stream of slots, ordered by (step, micro-step, rank, row). Two closed forms
make every slot's sample computable from its position alone:

- *Which task.* The first g slots hold `counts(g)[t]` draws of task t, a nested rounding of
  g * p_t (task 0 takes round(g * p_0) slots, task 1 its share of the rest, ...). Each count grows
  by at most one per slot and the counts always sum to g, so a micro-batch's tasks are the
  difference of two calls, shuffled within the micro-batch by its key. Over any stretch of the
  stream every task gets its temperature-weighted share, to within one sample per task.
- *Which sample (one pass without repeats, PaLM).* The k-th draw of task t reads row
  `perm(seed, t, e)[k mod n_t]` of epoch e = k // n_t: every row once per epoch, in a fresh
  order each epoch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from pathways_mm.errors import ConfigError

_PERM_TAG = 0x5045524D  # keeps the epoch permutations' random streams apart from the batch keys'


class MixtureSampler:
    """Temperature sampling over tasks, p_t ∝ n_t ** (1 / T) * w_t; within a task, one pass
    without repeats per epoch.

    The weights multiply after the temperature: with a large T (near-uniform over tasks) a weight
    of 2 still means twice the share, rather than vanishing into the T-th root.

    `micro_batches` (micro-steps per step) and `world` (ranks) place a micro-batch in the stream;
    a run keeps both fixed, as it keeps the micro-batch size.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        temperature: float,
        seed: int,
        weights: Sequence[float] | None = None,
        *,
        micro_batches: int = 1,
        world: int = 1,
    ):
        sizes_arr = np.asarray(sizes, dtype=np.float64)
        if (sizes_arr <= 0).any():
            raise ConfigError(f"every task needs at least one training sample (sizes {list(sizes)})")
        w = np.ones_like(sizes_arr) if weights is None else np.asarray(weights, dtype=np.float64)
        p = sizes_arr ** (1.0 / temperature) * w
        if not p.sum() > 0:
            raise ConfigError("mixture.weights: at least one task needs a weight above 0")
        self.probs = p / p.sum()
        self.sizes = [int(s) for s in sizes]
        self.seed = seed
        self.micro_batches = micro_batches
        self.world = world
        # the share of what tasks t, t+1, ... leave that task t takes; the last task that can be
        # drawn takes all of it (exactly 1, so float rounding never leaks a draw past it)
        tail = np.cumsum(self.probs[::-1])[::-1]
        share = np.divide(self.probs, tail, out=np.zeros_like(self.probs), where=tail > 0)
        share[np.flatnonzero(self.probs)[-1]] = 1.0
        self._share = share.tolist()
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def draw(self, num: int, step: int, micro: int = 0, rank: int = 0) -> list[tuple[int, int]]:
        """`num` (task index, sample index) pairs for one micro-batch."""
        if not (0 <= micro < self.micro_batches and 0 <= rank < self.world):
            raise ValueError(
                f"micro-step {micro} / rank {rank} outside the sampler's {self.micro_batches} micro-steps "
                f"x {self.world} ranks"
            )
        start = ((step * self.micro_batches + micro) * self.world + rank) * num
        nth = self.counts(start)
        quota = self.counts(start + num) - nth
        rng = np.random.default_rng([self.seed, step, micro, rank])
        picks = []
        for t in rng.permutation(np.repeat(np.arange(len(self.sizes)), quota)).tolist():
            picks.append((t, self.sample(t, int(nth[t]))))
            nth[t] += 1
        return picks

    def counts(self, slots: int) -> np.ndarray:
        """How many of the stream's first `slots` slots each task fills (int64 [tasks])."""
        out = np.zeros(len(self.sizes), dtype=np.int64)
        left = slots
        for t, share in enumerate(self._share):
            out[t] = left if share == 1.0 else math.floor(left * share + 0.5)
            left -= int(out[t])
        return out

    def sample(self, task: int, k: int) -> int:
        """The row that the k-th draw (from 0) of `task` reads."""
        epoch, i = divmod(k, self.sizes[task])
        return int(self._perm(task, epoch)[i])

    def passes(self, steps: int, num: int) -> list[float]:
        """Passes each task made over its data in `steps` steps of `num`-row micro-batches."""
        drawn = self.counts(steps * self.micro_batches * self.world * num)
        return [int(c) / n for c, n in zip(drawn, self.sizes)]

    def _perm(self, task: int, epoch: int) -> np.ndarray:
        perm = self._perms.get((task, epoch))
        if perm is None:
            n = self.sizes[task]
            rng = np.random.default_rng([self.seed, task, epoch, _PERM_TAG])
            perm = rng.permutation(n).astype(np.int32 if n < 2**31 else np.int64)
            # keep this epoch and the one before (a micro-batch can straddle the two)
            for key in [key for key in self._perms if key[0] == task and key[1] not in (epoch - 1, epoch)]:
                del self._perms[key]
            self._perms[(task, epoch)] = perm
        return perm
