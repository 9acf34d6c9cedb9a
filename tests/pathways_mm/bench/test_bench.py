import re

import pytest
import torch

from pathways_mm.bench.data import manifest_memory
from pathways_mm.bench.train import peak_tflops, step_flops
from tests.helpers import run_cli


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


@pytest.mark.slow
def test_bench_train_prints_sparse_and_dense_rows_with_active_params(data_dir):
    res = run_cli(
        [
            "bench",
            "train",
            "--config",
            "cpu",
            "--iters",
            "2",
            "--warmup",
            "1",
            "--batch",
            "2",
            "--seq-len",
            "32",
            "--dense",
            "--threads",
            "1",
        ],
        data_dir,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = re.findall(
        r"^(dense|MoE).*?\s([\d.]+)M\s+([\d.]+)M\s+([\d.]+)\s+([\d,]+)\s+([\d.]+)\s+n/a\s+([\d.]+)$", res.stdout, re.M
    )
    assert [r[0] for r in rows] == ["dense", "MoE"], res.stdout
    (_, d_total, d_active, d_ms, *_), (_, m_total, m_active, m_ms, *_, m_peak) = rows
    assert float(m_total) > float(d_total) and m_active == d_active  # FLOP-matched: same active parameters
    assert float(d_ms) > 0 and float(m_ms) > 0 and float(m_peak) > 0
    assert re.search(r"sparse/dense time per step: [\d.]+", res.stdout), res.stdout


def test_bench_train_mfu_uses_the_given_peak():
    assert peak_tflops(torch.device("cpu"), None) is None
    assert peak_tflops(torch.device("cpu"), 2.5) == 2.5
    # 6 N per token, plus 12 * layers * d_model * L per token for attention
    assert step_flops(1000, 2, 16, 3, 8) == (6 * 1000 + 12 * 2 * 16 * 8) * 3 * 8


@pytest.mark.slow
def test_bench_data_times_the_pipeline_and_the_step_both_ways(data_dir):
    res = run_cli(
        [
            "bench",
            "data",
            "--config",
            "configs/experiments/debug.yaml",
            "--workers",
            "0,1",
            "--batches",
            "2",
            "--steps",
            "1",
            "--threads",
            "1",
            *["--set", "train.micro_batch_size=4"],
        ],
        data_dir,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rates = dict(
        (t, (float(a.replace(",", "")), float(b.replace(",", ""))))
        for t, a, b in re.findall(r"^(text_lm|text_arith)\s+([\d,]+)\s+([\d,]+)$", res.stdout, re.M)
    )
    assert set(rates) == {"text_lm", "text_arith"} and all(v > 0 for r in rates.values() for v in r), res.stdout
    live = float(re.search(r"fed by the DataLoader\s+([\d.]+)", res.stdout).group(1))
    pre = float(re.search(r"pre-made batches\s+([\d.]+)", res.stdout).group(1))
    ratio = float(re.search(r"ratio live / pre-made: ([\d.]+)", res.stdout).group(1))
    assert live > 0 and pre > 0 and ratio == pytest.approx(live / pre, rel=0.01)


@pytest.mark.slow
def test_an_open_manifest_costs_its_index_not_its_rows():
    rows = 200_000
    mem = manifest_memory(rows)
    for fmt in ("jsonl", "csv"):
        assert mem[fmt]["index"] == pytest.approx(8.0, abs=0.01)  # one int64 offset a row
        # resident bytes a row, reads included: a list of parsed rows would cost hundreds
        assert mem[fmt]["after_reads"] < 64, mem
