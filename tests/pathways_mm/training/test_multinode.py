"""DeepSpeed's multi-node launch, shown on one machine: two "nodes" of two processes each.

Without ssh: each node runs its own launcher with the same hostfile, `--no_ssh --node_rank N` and
node 0's address (DeepSpeed 0.19.8's runner). Expert parallelism strides across the nodes
(`use_data_before_expert_parallelism`), so every all-to-all crosses the node boundary.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pathways_mm.runtime.engine import free_port
from tests.helpers import MOE_CFG, ROOT, read_metrics, sets

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_two_nodes_of_two_processes_with_experts_across_the_node_boundary(tmp_path, data_dir):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n127.0.0.1 slots=2\n")  # two names, both this machine
    ds = {**json.loads((ROOT / "configs" / "ds" / "cpu.json").read_text()), "use_data_before_expert_parallelism": True}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    out = tmp_path / "run"
    args = sets("model.moe.ep_size=2", "train.steps=2", "eval.max_samples=1", f"train.out_dir={out}")
    args += sets(f"train.ds_config={tmp_path / 'ds.json'}")
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["PMM_DATA"] = str(data_dir)
    port = str(free_port())
    nodes = [
        subprocess.Popen(
            [launcher, "--hostfile", hostfile, "--no_ssh", "--node_rank", str(node), "--master_addr", "127.0.0.1"]
            + ["--master_port", port, "--module", "pathways_mm.cli", "train", MOE_CFG, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )  # fmt: skip
        for node in (0, 1)
    ]
    try:
        logs = [p.communicate(timeout=900)[0] for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, 9)
    for node, (p, log) in enumerate(zip(nodes, logs)):
        assert p.returncode == 0, f"node {node}:\n{log[-4000:]}"
        assert "global_rank_mapping=defaultdict(<class 'list'>, {'localhost': [0, 1], '127.0.0.1': [2, 3]})" in log
    assert "4 process(es) (rank 0 exchanges tokens with ranks [0, 2])" in logs[0]  # rank 2 is on the other node
    assert read_metrics(out)[-1]["weights_in_sync"] is True
