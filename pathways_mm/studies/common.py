"""What the studies share: a stage is one `pathways-mm` command in its own process, writing its own
run directory; a stage whose result exists is not redone, so a rerun continues where it stopped."""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from pathways_mm.config import ExperimentConfig, resolve_relative, to_dict
from pathways_mm.errors import TrainingAborted
from pathways_mm.io import atomic_write_text
from pathways_mm.tasks import get_task

_LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")


def run_stage(args: list[str], log: Path) -> None:
    """`pathways-mm ARGS` in its own process (its own DeepSpeed engine and process group), logged to `log`."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_ENV}
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        cmd = [sys.executable, "-m", "pathways_mm.cli", *args]
        res = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if res.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        stage = " ".join(args[:3])
        raise TrainingAborted(f"stage `pathways-mm {stage} ...` failed (exit {res.returncode}): {tail[0]}; see {log}")


def records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def trained(run_dir: Path) -> bool:
    """Whether a training run finished (its final evaluation is logged)."""
    return any("eval" in r and "weights_in_sync" in r for r in records(run_dir))


def final_eval(run_dir: Path) -> dict[str, Any]:
    return [r for r in records(run_dir) if "eval" in r][-1]["eval"]


def write_config(cfg: ExperimentConfig, path: Path) -> Path:
    """`cfg` as an experiment YAML; its DeepSpeed config (if it names one) by absolute path (the
    YAML lives elsewhere than the original)."""
    data = to_dict(cfg)
    data.pop("source", None)
    if cfg.train.ds_config is not None:
        data["train"]["ds_config"] = str(resolve_relative(cfg, cfg.train.ds_config))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
    return path


def only_tasks(cfg: ExperimentConfig, tasks: tuple[str, ...]) -> ExperimentConfig:
    """`cfg` restricted to `tasks` (their mixture weights kept, the others dropped)."""
    weights = {t: w for t, w in cfg.mixture.weights.items() if t in tasks}
    return cfg.replace(tasks=tasks, mixture=dataclasses.replace(cfg.mixture, weights=weights))


def train_stage(cfg: ExperimentConfig, run_dir: Path, say) -> None:
    """Train `cfg` into `run_dir` unless it finished there; an interrupted run resumes."""
    if trained(run_dir):
        return
    say(f"training {cfg.name} ({cfg.train.steps} steps) -> {run_dir}")
    cfg = cfg.replace(train=dataclasses.replace(cfg.train, out_dir=str(run_dir)))
    path = write_config(cfg, run_dir.with_name(run_dir.name + ".yaml"))
    run_stage(["train", str(path), "--resume"], run_dir.with_name(run_dir.name + ".log"))


def primary(task: str) -> str:
    """The metric a task is judged by (its first)."""
    return get_task(task).metrics[0]


def spread(values: list[float]) -> dict[str, float]:
    """Mean, standard deviation, range and count of one number over seeds."""
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}  # fmt: skip
