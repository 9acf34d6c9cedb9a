"""Bounded waits: a collective that fails because a peer stopped answering becomes an error
naming that rank and the step, on every rank that was left waiting.

torch.distributed (with `train.collective_timeout_s` on every group) turns the endless wait
into an exception, but neither says which rank went silent nor at which step. After such an
exception each waiting rank marks itself in the rendezvous store and waits as long again for
the others to do the same; the ranks that never mark themselves were not inside a collective:
they are the ones that stopped answering.
"""

from __future__ import annotations

import time
from types import TracebackType

import torch

from pathways_mm.errors import TrainingAborted
from pathways_mm.runtime import compat

KEY = "pmm/failed_in_collective/{}"


def is_comm_error(e: BaseException) -> bool:
    """A failed or timed-out collective (gloo, nccl), as opposed to a bug or a user error."""
    if isinstance(e, torch.distributed.DistError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(
        w in text for w in ("gloo", "nccl", "timed out", "timeout", "connection closed", "connection reset")
    )


class CollectiveGuard:
    """Context manager around a distributed run; set `.step` as the run advances.

    On leaving with a collective error, raises TrainingAborted naming the silent rank(s) and `.step`.
    """

    def __init__(self, rank: int, world: int, timeout_s: float):
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.step = 0

    def __enter__(self) -> CollectiveGuard:
        return self

    def __exit__(self, tp: type | None, e: BaseException | None, tb: TracebackType | None) -> bool:
        if e is None or self.world == 1 or not is_comm_error(e):
            return False
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        silent = self.silent_ranks()
        if silent is None:
            who = "rank 0 (it holds the rendezvous store, which no longer answers)"
        elif silent:
            who = "rank " + ", ".join(map(str, silent))
        else:
            who = "no single rank (every rank failed inside a collective)"
        raise TrainingAborted(
            f"{who} stopped answering at step {self.step}: a collective on rank {self.rank} got no reply within "
            f"train.collective_timeout_s={self.timeout_s:g}s ({reason}); continue from the last checkpoint with --resume"
        ) from None

    def silent_ranks(self) -> list[int] | None:
        """Ranks that did not report a failed collective within the timeout (None: store unreachable)."""
        try:
            store = compat.default_store()
            store.set(KEY.format(self.rank), str(self.step))
            others = [r for r in range(self.world) if r != self.rank]
            deadline = time.monotonic() + self.timeout_s
            while True:
                silent = [r for r in others if not store.check([KEY.format(r)])]
                if not silent or time.monotonic() > deadline:
                    return silent
                time.sleep(0.2)  # polling a store, not timing a test: peers report within the timeout
        except Exception:  # the store lives in rank 0's process; gone with it
            return None
