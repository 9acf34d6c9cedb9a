"""`pathways-mm continual`: the three ways of adding a task, end to end on a debug model."""

import json

import pytest
import yaml

from pathways_mm.config import load_config
from pathways_mm.studies.common import write_config
from tests.helpers import ROOT, run_cli, sets

CFG = ROOT / "configs" / "experiments" / "continual.yaml"
TINY = [
    *sets(
        "model.size=debug",
        "tasks=[text_lm, text_arith]",
        "continual.add=[digit_image]",
        "train.steps=4",
        "continual.steps=3",
        "continual.grow_experts=2",
        "eval.max_samples=6",
        "train.warmup_steps=1",
    ),
]


@pytest.mark.slow
def test_continual_benchmark_compares_add_task_finetune_and_scratch(tmp_path, data_dir):
    out = tmp_path / "cont"
    args = ["continual", CFG, "--seeds", "2", "--out-dir", out, *TINY, *sets("continual.add_lr=0.01")]
    res = run_cli([*args, "--only-seed", "1"], data_dir, timeout=900)  # as one of two processes would
    assert res.returncode == 0 and "the table waits for seeds [0]" in res.stderr, res.stderr[-3000:]
    assert (out / "seed1" / "rows.json").is_file() and not (out / "seed0").exists()
    assert not (out / "continual.json").exists()
    res = run_cli(args, data_dir, timeout=900)  # runs seed 0, finds seed 1 done
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"-> {out / 'seed0' / 'base'}" in res.stderr and f"-> {out / 'seed1'}" not in res.stderr
    result = json.loads((out / "continual.json").read_text())
    (row,) = result["tasks"]
    assert row["task"] == "digit_image" and row["old_outputs_bit_identical"] is True
    assert set(row["forgetting"]) == {"text_lm", "text_arith"}
    assert row["largest_add_task_change"] == 0.0
    assert all(f["add_task"]["max"] == f["add_task"]["min"] == 0.0 for f in row["forgetting"].values())
    assert row["params_added"] > 0 and 0.0 <= row["reuse_share"]["mean"] <= 1.0
    for method in ("add_task", "finetune", "scratch"):  # mean and spread of the two seeds' results
        values = [r[0][method] for r in result["per_seed"]]
        assert row[method]["n"] == 2 and row[method]["mean"] == pytest.approx(sum(values) / 2)
        assert row[method]["min"] == min(values) and row[method]["max"] == max(values)
    assert "| digit_image | exact_match |" in (out / "continual.md").read_text()
    for seed in (0, 1):  # each seed its own chain, trained with that seed
        base = json.loads((out / f"seed{seed}" / "base" / "metrics.jsonl").read_text().splitlines()[-1])
        assert base["step"] == 4 and set(base["eval"]) == {"text_lm", "text_arith"}  # the --set values reached it
        assert yaml.safe_load((out / f"seed{seed}" / "base.yaml").read_text())["seed"] == seed
        lr = {m: yaml.safe_load((out / f"seed{seed}" / m / "digit_image" / "config.yaml").read_text())["train"]["lr"]
              for m in ("add", "finetune")}  # fmt: skip
        assert lr == {"add": 0.01, "finetune": 3.0e-3}  # continual.add_lr for add-task only
    # A rerun finds every stage done and only redraws the table.
    again = run_cli(args, data_dir, timeout=300)
    assert again.returncode == 0 and "training the first group" not in again.stderr, again.stderr[-2000:]
    assert json.loads((out / "continual.json").read_text()) == result


def test_continual_needs_tasks_to_add(data_dir, tmp_path):
    res = run_cli(["continual", CFG, "--out-dir", tmp_path / "c", *sets("continual.add=[]")], data_dir)
    assert res.returncode == 2 and "continual.add lists no task" in res.stderr, res.stderr[-2000:]
    res = run_cli(["continual", CFG, "--out-dir", tmp_path / "c", "--seeds", "2", "--only-seed", "2"], data_dir)
    assert res.returncode == 2 and "--only-seed 2: the seeds are 0 to 1" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "c").exists()
    res = run_cli(["continual", CFG, *sets("continual.add=[digit_image]")], data_dir)
    assert res.returncode == 2 and "none of the first group" in res.stderr, res.stderr[-2000:]


@pytest.mark.parametrize("ds_config", [None, "../ds/gpu_bf16.json"])
def test_a_stage_config_reads_back_as_the_same_experiment(ds_config, tmp_path):
    """Stages run from a YAML written elsewhere: the built-in DeepSpeed settings stay built in, a
    named JSON is named by absolute path, and the strict loader reads every value back."""
    cfg = load_config(CFG, [f"train.ds_config={ds_config}" if ds_config else "train.steps=7"])
    again = load_config(write_config(cfg, tmp_path / "stage" / "exp.yaml"))
    assert again.replace(source=None, train=cfg.train) == cfg.replace(source=None)
    if ds_config is None:
        assert again.train.ds_config is None and again.train.steps == 7
    else:
        assert again.train.ds_config == str((ROOT / "configs" / "ds" / "gpu_bf16.json").resolve())
