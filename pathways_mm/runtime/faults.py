"""Test-only fault injection, read from one environment variable.

    PMM_FAULT="kill:rank=1:step=3"              SIGKILL rank 1 in the middle of step 3
    PMM_FAULT="kill_during_save:rank=1:step=4"  SIGKILL rank 1 after it wrote its part of checkpoint 4
    PMM_FAULT="hang:rank=1:step=2"              rank 1 sleeps forever at the start of step 2
    PMM_FAULT="nan_grad:step=4"                 a NaN in one gradient at step 4 (every rank, or rank=R)
    PMM_FAULT="nan_grad:step=2,nan_grad:step=3" several faults, comma-separated

Steps count from 1, as in metrics.jsonl. Unset, `hit` returns at its first line: nothing else
in a run reads or pays for it.
"""

from __future__ import annotations

import os
import signal
import time
from typing import NamedTuple

from pathways_mm.errors import ConfigError

KINDS = ("kill", "kill_during_save", "hang", "nan_grad")


class Fault(NamedTuple):
    kind: str
    step: int
    rank: int | None  # None: every rank


def parse(spec: str | None) -> tuple[Fault, ...]:
    if not spec:
        return ()
    faults = []
    for item in spec.split(","):
        kind, *fields = item.strip().split(":")
        try:
            kv = dict(f.split("=", 1) for f in fields)
            fault = Fault(kind, int(kv.pop("step")), int(kv.pop("rank")) if "rank" in kv else None)
        except (ValueError, KeyError):
            fault, kv = None, {}
        if fault is None or kind not in KINDS or kv:
            raise ConfigError(
                f"PMM_FAULT: cannot parse {item!r}; expected KIND:step=N[:rank=R] with KIND one of {KINDS}"
            )
        faults.append(fault)
    return tuple(faults)


_FAULTS = parse(os.environ.get("PMM_FAULT"))


def hit(kind: str, step: int, rank: int) -> bool:
    """Whether a fault of `kind` is planned for this step on this rank."""
    if not _FAULTS:
        return False
    return any(f.kind == kind and f.step == step and f.rank in (None, rank) for f in _FAULTS)


def maybe_die(kind: str, step: int, rank: int) -> None:
    """Act out a planned kill or hang here (no return from either)."""
    if not hit(kind, step, rank):
        return
    if kind == "hang":
        while True:  # a rank that stops answering without dying
            time.sleep(3600)
    os.kill(os.getpid(), signal.SIGKILL)
