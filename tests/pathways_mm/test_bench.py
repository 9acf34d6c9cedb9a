import re

import pytest

from tests.conftest import run_cli


@pytest.mark.slow
def test_bench_telemetry_times_both_modes_and_counts_when_on(data_dir):
    res = run_cli(["bench", "telemetry", "--iters", "2", "--warmup", "1", "--threads", "1"], data_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = dict(re.findall(r"^(off|on)\s+([\d.]+)", res.stdout, re.M))
    assert set(rows) == {"off", "on"} and all(float(ms) > 0 for ms in rows.values()), res.stdout
    assert float(re.search(r"ratio on/off: ([\d.]+)", res.stdout).group(1)) > 0
    real = int(re.search(r"\((\d+) real tokens\)", res.stdout).group(1))
    counted = int(re.search(r"(\d+) token-layer counts per step", res.stdout).group(1))
    assert counted == 2 * real  # two MoE blocks, padding not counted
    assert re.search(r"telemetry.record alone: \d+ us per step", res.stdout), res.stdout
