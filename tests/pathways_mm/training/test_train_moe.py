"""The MoE decoder through the real CLI and the deepspeed launcher (expert parallelism on CPU)."""

import json

import numpy as np
import pytest

from tests.helpers import MOE_CFG, ROOT, deepspeed_launch, read_metrics, run_cli, sets


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.moe.ep_size=2"], "model.moe.ep_size=2 does not divide the 1 processes"),
        (
            ["model.moe.num_experts=3", "model.moe.ep_size=2"],
            "num_experts (3) must be divisible by model.moe.ep_size (2)",
        ),
        (["model.moe.top_k=5"], "top_k (5) must be between 1 and num_experts (4)"),
    ],
)
def test_moe_config_errors(overrides, message, data_dir):
    args = ["train", MOE_CFG]
    for o in overrides:
        args += [*sets(o)]
    res = run_cli(args, data_dir)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_zero3_with_moe_is_refused(tmp_path, data_dir):
    ds = json.loads((ROOT / "configs" / "ds" / "cpu.json").read_text())
    ds["zero_optimization"] = {"stage": 3}
    (tmp_path / "z3.json").write_text(json.dumps(ds))
    res = run_cli(["train", MOE_CFG, *sets(f"train.ds_config={tmp_path / 'z3.json'}")], data_dir)
    assert res.returncode == 2 and "ZeRO stage 3" in res.stderr, res.stderr


@pytest.mark.slow
def test_moe_trains_in_one_process(tmp_path, data_dir):
    out = tmp_path / "moe"
    res = run_cli(
        [
            "train",
            MOE_CFG,
            *sets("train.steps=4", "eval.max_samples=4", f"train.out_dir={out}", "train.log_every=2"),
            *sets("model.moe.shared_d_ff=32", "model.moe.mi_coef=0.01", "train.log_to=[jsonl,csv]"),
        ],
        data_dir,
    )
    assert res.returncode == 0, res.stderr
    assert "M active" in res.stderr
    logged = [r for r in read_metrics(out) if "loss" in r]
    assert logged and all(r["loss"] == r["loss"] for r in logged)  # finite (NaN != NaN)
    # Each MoE layer's objectives (unweighted), dropped routes and the routed experts' share, per log step.
    for r in logged:
        assert sorted(r["routing"]) == ["block1"]
        layer = r["routing"]["block1"]
        assert sorted(layer) == ["balance", "dropped", "mi", "routed_share", "z"]
        assert layer["balance"] >= 1.0 - 1e-6 and layer["mi"] <= 0.0 and layer["dropped"] == 0.0
        assert 0.0 < layer["routed_share"] < 1.0
    assert "routing/block1/mi" in (out / "metrics.csv").read_text()


@pytest.mark.distributed
@pytest.mark.parametrize("impl", ["grouped", "deepspeed"])
def test_expert_parallel_training_then_eval_in_one_process(impl, tmp_path, data_dir):
    out = tmp_path / f"ep2-{impl}"
    # eval.batch_size 3: each rank's 3 samples form the same batch as in the one-process eval below
    same_eval = [*sets("eval.batch_size=3", "eval.routes=true")]
    res = deepspeed_launch(
        2,
        [
            "train",
            MOE_CFG,
            *sets(
                "model.moe.ep_size=2",
                f"model.moe.impl={impl}",
                "train.steps=3",
                "eval.max_samples=6",
                f"train.out_dir={out}",
            ),
            *same_eval,
        ],
        data_dir,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    final = read_metrics(out)[-1]
    assert final["weights_in_sync"] is True
    tag = out / "checkpoints" / "step_0000003"
    expert_files = sorted(p.name for p in tag.glob("*expert_*"))
    assert len(expert_files) == 4 * 1  # 4 global experts x 1 MoE layer, one file each
    report, routes_1 = tmp_path / "eval.json", tmp_path / "routes.json"
    res = run_cli(
        [
            "eval",
            out,
            "--max-samples",
            "6",
            "--out",
            report,
            "--routes",
            routes_1,
            *sets("eval.batch_size=3", "train.threads=1"),
        ],
        data_dir,
    )  # ep_size 2 -> 1
    assert res.returncode == 0, res.stderr
    ev = json.loads(report.read_text())["tasks"]
    # the same weights give the same held-out loss whatever the process count
    assert ev["text_lm"]["loss"] == pytest.approx(final["eval"]["text_lm"]["loss"], rel=1e-4)
    # ... and send the same tokens to the same experts: counts gathered over 2 ranks = one process's
    one, two = json.loads(routes_1.read_text()), json.loads((out / "routes" / "step_0000003.json").read_text())
    assert one["model"]["hash"] == two["model"]["hash"] and one["checkpoint"]["step"] == two["checkpoint"]["step"] == 3
    assert one["data"]["samples"] == two["data"]["samples"] == {"text_lm": 6, "text_arith": 6}
    for a, b in zip(one["layers"], two["layers"], strict=True):
        assert a["tokens"] == b["tokens"] and a["routes"] == b["routes"] and a["dropped"] == b["dropped"]
        assert sum(map(sum, a["tokens"])) > 100
        np.testing.assert_allclose(a["entropy_sum"], b["entropy_sum"], rtol=1e-5)


@pytest.mark.distributed
@pytest.mark.slow
def test_four_processes_with_expert_data_parallelism(tmp_path, data_dir):
    out = tmp_path / "ep2x2"
    res = deepspeed_launch(
        4,
        [
            "train",
            MOE_CFG,
            *sets("model.moe.ep_size=2", "train.steps=2", "eval.max_samples=4", f"train.out_dir={out}"),
        ],
        data_dir,
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert read_metrics(out)[-1]["weights_in_sync"] is True
