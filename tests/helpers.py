"""What several test modules share: paths, running the CLI and the deepspeed launcher, routes documents.

Test modules import from here, never from each other.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from pathways_mm import routes_file
from pathways_mm.config import ExperimentConfig, ModelConfig, MoEConfig
from pathways_mm.runtime.engine import free_port

ROOT = Path(__file__).resolve().parents[1]
DEBUG_CFG = ROOT / "configs" / "experiments" / "debug.yaml"
MOE_CFG = ROOT / "configs" / "experiments" / "moe_debug.yaml"
EXAMPLE_SIZES = {"train": 12, "test": 4}  # rows per split of `pathways-mm data example` datasets in tests
_LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def run_cli(
    args,
    data_dir: Path,
    timeout: float = 300,
    env_extra: dict | None = None,
    module: str = "pathways_mm.cli",
    cwd: Path = ROOT,
    max_file_bytes: int | None = None,
):
    """`python -m pathways_mm.cli ARGS` in a fresh process (no launcher environment), output captured.

    `max_file_bytes`: no file may grow past this (RLIMIT_FSIZE): writes beyond it fail as on a full disk.
    """
    env = {**os.environ, "PMM_DATA": str(data_dir), "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    for key in _LAUNCH_ENV:
        env.pop(key, None)
    limit = None
    if max_file_bytes is not None:
        limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))  # noqa: E731
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
        preexec_fn=limit,
    )


def error_lines(stderr: str) -> list[str]:
    """The `pathways-mm: error:` lines of a command's stderr, each required to start its own line."""
    return [line for line in stderr.split("\n") if line.startswith("pathways-mm: error:")]


def deepspeed_launch(num: int, args, data_dir: Path, timeout: float = 600, env_extra: dict | None = None):
    """`deepspeed --num_gpus NUM --module pathways_mm.cli ARGS` (gloo processes on a CPU)."""
    env = {**os.environ, "PMM_DATA": str(data_dir), **(env_extra or {})}
    for key in _LAUNCH_ENV:
        env.pop(key, None)
    launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or "deepspeed"
    cmd = [
        launcher,
        "--num_gpus",
        str(num),
        "--master_port",
        str(free_port()),
        "--module",
        "pathways_mm.cli",
        *map(str, args),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def sets(*items: str) -> list[str]:
    """`--set` flags: sets("a=1", "b=2") -> ["--set", "a=1", "--set", "b=2"]."""
    return [arg for item in items for arg in ("--set", str(item))]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


# Routes documents of known structure: routes[block][task][modality] = per-expert counts.
ROUTES_E, ROUTES_MAX_TASKS = 4, 8
ROUTES_CFG = ExperimentConfig(
    tasks=("a", "b", "new"), model=ModelConfig(n_layers=4, moe=MoEConfig(num_experts=ROUTES_E))
)
TEXT, IMAGE = 0, 1
BEFORE = {
    1: {0: {TEXT: [60, 20, 10, 10]}, 1: {TEXT: [0, 0, 40, 20], IMAGE: [20, 20, 0, 0]}},
    3: {0: {TEXT: [50, 50, 0, 0]}, 1: {TEXT: [0, 50, 50, 0]}},
}
AFTER = {
    1: BEFORE[1],
    3: {0: {TEXT: [0, 0, 0, 100]}, 1: {TEXT: [0, 50, 50, 0]}, 2: {TEXT: [25, 25, 25, 25]}},
}


def make_doc(routes_by_block, dropped=None, entropy_per_token=0.7):
    """A routes document through routes_file.document, from routes[block][task][modality] = per-expert counts."""
    E = ROUTES_E
    gathered = []
    for block, per_task in routes_by_block.items():
        counts = torch.zeros(2, ROUTES_MAX_TASKS, 3, E, dtype=torch.long)
        for t, per_mod in per_task.items():
            for m, row in per_mod.items():
                counts[0, t, m] = torch.tensor(row)
        for (t, m, e), n in (dropped or {}).get(block, {}).items():
            counts[1, t, m, e] = n
        stats = torch.zeros(2, ROUTES_MAX_TASKS, 3, dtype=torch.long)
        stats[0] = counts[0].sum(-1) // 2  # top-2: every token makes two routes
        stats[1] = (stats[0] * entropy_per_token * 1_000_000).round().long()
        gathered.append((block, counts, stats))
    return routes_file.document(
        gathered, ROUTES_CFG, ["a", "b", "new"], {"path": "/ckpt/step_1", "step": 1}, {"split": "test"}
    )
