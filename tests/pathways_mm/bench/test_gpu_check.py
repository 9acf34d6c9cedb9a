"""`pathways-mm bench gpu-check`: the dry run on a CPU (what `make gpu-check` runs without CUDA), and
the report a GPU run would write."""

import json

import pytest

from pathways_mm.bench.gpu_check import failed_parts, markdown
from tests.helpers import MOE_CFG, run_cli


@pytest.mark.slow
def test_dry_run_runs_every_part_on_tiny_configs(tmp_path, data_dir):
    out = tmp_path / "check"
    res = run_cli(["bench", "gpu-check", "--out", out, "--demo-config", MOE_CFG], data_dir, timeout=3600)
    assert res.returncode == 0, res.stderr[-3000:] + (out / "gpu_check.log").read_text()[-3000:]
    r = json.loads((out / "gpu_check.json").read_text())
    assert r["mode"].startswith("dry run") and failed_parts(r) == []
    assert r["pytest"]["counts"]["skipped"] >= 6 and "failed" not in r["pytest"]["counts"]  # every gpu test, skipped
    rows = [row["name"] for row in r["moe"]["cpu"]["rows"]]
    assert len(rows) == 4 and "sort + torch._grouped_mm" in r["moe"]["cpu"]["skipped"][0]
    assert [row["name"].split(" ")[0] for row in r["train"]["rows"]] == ["dense", "MoE"]
    assert 0 < r["train"]["planned_gib"]["dense"] < r["train"]["planned_gib"]["moe"]
    demo = r["demo"]["cpu"]
    assert demo["ms_per_step"] > 0 and set(demo["eval"]) == {"text_lm", "text_arith"}
    assert r["pipeline"]["ratio"] > 0 and r["pipeline"]["live_ms"] > 0  # bench data: workers vs pre-made
    md = (out / "gpu_check.md").read_text()
    assert md in res.stdout and "| cpu | PathwaysMoE grouped (dropless) |" in md


def gpu_result(grouped_ms: float, moe_ms: float) -> dict:
    rows = [
        {"name": "dense SwiGLU (hidden 2x4096)", "ms": 10.0},
        {"name": "PathwaysMoE grouped (dropless)", "ms": grouped_ms},
    ]
    moe = {"status": "ok", "rows": rows, "skipped": [], "flops": 1e12, "d_model": 1024, "d_ff": 4096}
    moe.update(num_experts=8, top_k=2, tokens=16384, dtype="torch.bfloat16")
    train_row = {"total_params": 9e8, "active_params": 4e8, "tokens": 8192, "flops": 1e15, "peak_bytes": 2**34}
    train = {"status": "ok", "config": "1b", "batch": 4, "seq_len": 2048, "dtype": "bfloat16", "device": "H200"}
    train.update(peak_tflops=1000.0, planned_gib={"dense": 15.0, "moe": 17.0})
    train["rows"] = [
        {**train_row, "name": "dense (FLOP-matched d_ff)", "ms": 2000.0},
        {**train_row, "name": "MoE", "ms": moe_ms},
    ]
    demo = {"gpu": {"status": "ok", "ms_per_step": 50.0, "steps_timed": 275, "last_loss": 1.5, "eval": {}}}
    demo["cpu"] = {"status": "timed out after 180 s", "ms_per_step": 500.0, "steps_timed": 15}
    env = {"torch": "2.11", "cuda": "13.0", "card": "NVIDIA H200", "capability": "sm90", "memory_gib": 139.8}
    env.update(deepspeed="0.19.8", python="3.12.3", cpu_count=16)
    r = {
        "mode": "gpu",
        "date": "2026-12-01",
        "seconds": 400,
        "env": env,
        "pytest": {"status": "ok", "counts": {"passed": 6}},
    }
    return {**r, "moe": {"h200-a": moe}, "train": train, "data": {"status": "ok"}, "demo": demo}


@pytest.mark.parametrize(
    "grouped_ms,moe_ms,verdicts", [(10.5, 3000.0, ("met", "NOT met")), (12.0, 2000.0, ("NOT met", "met"))]
)
def test_gpu_report_states_each_target_and_the_step_time_next_to_the_cpu(grouped_ms, moe_ms, verdicts):
    md = markdown(gpu_result(grouped_ms, moe_ms))
    assert "# gpu-check: NVIDIA H200, 2026-12-01, gpu" in md and "NVIDIA H200 (sm90, 139.8 GiB)" in md
    assert f"| h200-a | PathwaysMoE grouped (dropless) | {grouped_ms:.2f} |" in md
    assert f">= 0.90: {verdicts[0]} |" in md  # 10 / 10.5 = 0.95; 10 / 12 = 0.83
    assert (
        f"target: MoE MFU >= 40%: {verdicts[1]}" in md
    )  # 1e15 FLOP / 2.0 s = 500 TFLOP/s = 50% of 1000; / 3.0 s = 33%
    assert "the GPU takes a step 10.0x faster than this machine's CPU" in md


def test_failed_parts_names_what_did_not_finish():
    r = gpu_result(10.0, 2000.0)
    assert failed_parts(r) == ["demo on the cpu"]
    r["moe"]["h200-a"]["status"] = "failed (exit 1)"
    assert failed_parts(r) == ["bench moe h200-a", "demo on the cpu"]


def test_unknown_part_is_a_one_line_error(tmp_path, data_dir):
    res = run_cli(["bench", "gpu-check", "--out", tmp_path, "--parts", "moe,speed"], data_dir)
    assert res.returncode == 2 and "unknown gpu-check part 'speed'; choose from pytest, moe, train, demo" in res.stderr
