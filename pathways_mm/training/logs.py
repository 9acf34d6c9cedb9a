"""Where a training run's records go: metrics.jsonl, and on request metrics.csv and TensorBoard.

    train:
      log_to: [jsonl, tensorboard, csv]   # jsonl alone by default

A record is one dict with a "step" (the loss since the last log step, an evaluation, a skipped
step). Every sink takes the same records; `flatten` names their numbers for the sinks that hold
one number per name (CSV rows, TensorBoard scalars): `task_loss/digit_image`,
`eval/digit_image/exact_match`, `expert_load/block3/digit_image/e5`. On resume, records after
the resumed step are dropped (JSONL, CSV) or hidden (TensorBoard's purge_step): they are redone.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Protocol

from torch.utils.tensorboard import SummaryWriter

from pathways_mm.io import atomic_write_text

SINKS = ("jsonl", "tensorboard", "csv")
JSONL, CSV, TENSORBOARD = "metrics.jsonl", "metrics.csv", "tensorboard"
CSV_HEADER = ("step", "name", "value")


class Logger(Protocol):
    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a record by slash-joined name (booleans, text, None and "step" left out)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and name != "step":
            if math.isfinite(value):
                out[name] = float(value)
    return out


def _kept_lines(path: Path, resume_step: int | None, step_of) -> list[str]:
    """Lines of `path` whose step is at most `resume_step` (all of them dropped when not resuming);
    a line `step_of` cannot read (torn by a kill mid-write) is dropped too."""
    if resume_step is None or not path.exists():
        return []
    keep = []
    for line in path.read_text(errors="replace").splitlines():
        step = step_of(line)
        if step is not None and step <= resume_step:
            keep.append(line)
    return keep


def _jsonl_step(line: str) -> int | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record.get("step", 0) if isinstance(record, dict) else None


def _csv_step(line: str) -> int | None:
    row = next(csv.reader([line]), [])
    return int(row[0]) if len(row) == 3 and row[0].isdigit() else None


class JsonlLog:
    """Append-only JSONL, one record per line. The rewrite on start is atomic, so a second kill
    cannot lose the records before it."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        atomic_write_text(path, "".join(line + "\n" for line in _kept_lines(path, resume_step, _jsonl_step)))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        pass


class CsvLog:
    """Long-format CSV (`step,name,value`, one row per number): new names never break the header,
    and `pandas.read_csv(...).pivot(index="step", columns="name")` makes it wide."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        kept = [",".join(CSV_HEADER)] + _kept_lines(path, resume_step, _csv_step)
        atomic_write_text(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        for name, value in flatten(record).items():
            writer.writerow((record["step"], name, repr(value)))
        with self.path.open("a") as f:
            f.write(buf.getvalue())

    def close(self) -> None:
        pass


class TensorBoardLog:
    """Scalars under their flattened names, at the record's step (`tensorboard --logdir RUN/tensorboard`)."""

    def __init__(self, log_dir: Path, resume_step: int | None):
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge)

    def write(self, record: dict[str, Any]) -> None:
        for name, value in flatten(record).items():
            self.writer.add_scalar(name, value, global_step=record["step"])
        self.writer.flush()  # a run killed between log steps keeps what it logged

    def close(self) -> None:
        self.writer.close()


class Logs:
    """Every sink of `train.log_to`, written together."""

    def __init__(self, sinks: list[Logger]):
        self.sinks = sinks

    def write(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def open_logs(out_dir: Path, log_to: tuple[str, ...], resume_step: int | None) -> Logs:
    """The sinks named in `log_to` under `out_dir`; `resume_step`: the run continues after that step."""
    make = {
        "jsonl": lambda: JsonlLog(out_dir / JSONL, resume_step),
        "csv": lambda: CsvLog(out_dir / CSV, resume_step),
        "tensorboard": lambda: TensorBoardLog(out_dir / TENSORBOARD, resume_step),
    }
    return Logs([make[name]() for name in log_to])
