import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEBUG_CFG = ROOT / "configs" / "experiments" / "debug.yaml"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One dataset cache for the whole session (PMM_DATA for subprocesses)."""
    return tmp_path_factory.mktemp("pmm_data")


def run_cli(args, data_dir: Path, timeout: float = 300, env_extra: dict | None = None, module: str = "pathways_mm.cli"):
    env = {**os.environ, "PMM_DATA": str(data_dir), "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
