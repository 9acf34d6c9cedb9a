"""Expert parallelism over two real gloo processes (`deepspeed --num_gpus 2` on CPU)."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("ep_worker.py")
ROOT = WORKER.parents[2]
TIMEOUT = 240  # a hung collective shows up as a timeout, not a stuck test session

pytestmark = pytest.mark.distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(procs: int, *args) -> None:
    """Run ep_worker.py in `procs` processes; fail with its output unless every rank reports OK."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    port = free_port()
    if procs == 1:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        cmd = [sys.executable, str(WORKER)]
    else:
        launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        cmd = [launcher, "--num_gpus", str(procs), "--master_port", str(port), str(WORKER)]
    try:
        res = subprocess.run(
            [*cmd, *map(str, args)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"ep_worker {args} hung for {TIMEOUT}s:\n{(e.stdout or b'')[-3000:]!r}")
    oks = res.stdout.count("EP_WORKER_OK")
    assert res.returncode == 0 and oks == procs, (
        f"rc={res.returncode} ok={oks}\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    )


@pytest.mark.parametrize("impl,capacity", [("grouped", None), ("deepspeed", 100.0)])
def test_two_ranks_match_one_process(impl, capacity):
    args = ["--mode", "equiv", "--impl", impl] + (["--capacity", capacity] if capacity else [])
    launch(2, *args)


def test_checkpoint_moves_between_ep_sizes_and_impls(tmp_path):
    ep2, ep1 = tmp_path / "ep2", tmp_path / "ep1"
    launch(2, "--mode", "save", "--impl", "grouped", "--dir", ep2)
    assert len(list((ep2 / "t").glob("layer_0_expert_*_model_states.pt"))) == 4  # one file per global expert
    launch(1, "--mode", "load", "--impl", "deepspeed", "--capacity", 100.0, "--dir", ep2)
    launch(1, "--mode", "save", "--impl", "deepspeed", "--capacity", 100.0, "--dir", ep1)
    launch(2, "--mode", "load", "--impl", "grouped", "--dir", ep1)


@pytest.mark.parametrize("impl,capacity", [("grouped", None), ("deepspeed", 1.0)])
def test_rank_without_tokens_completes_step(impl, capacity):
    # The worker forces every token onto one expert, so one rank computes for nobody (k=1 and k=2).
    launch(2, "--mode", "zero", "--impl", impl, *(["--capacity", capacity] if capacity else []))
