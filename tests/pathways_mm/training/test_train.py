import json

import pytest

from pathways_mm.config import load_config
from tests.helpers import DEBUG_CFG, deepspeed_launch, read_metrics, run_cli, sets


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path, data_dir):
    common = [*sets("train.steps=8", "train.log_every=1", "eval.max_samples=4")]
    full, split = tmp_path / "full", tmp_path / "split"
    res = run_cli(["train", DEBUG_CFG, *common, *sets(f"train.out_dir={full}")], data_dir)
    assert res.returncode == 0, res.stderr
    res = run_cli(["train", DEBUG_CFG, *common, *sets(f"train.out_dir={split}"), "--stop-after", "4"], data_dir)
    assert res.returncode == 0, res.stderr
    assert "stopped after step 4" in res.stderr
    assert max(losses(split)) == 4
    res = run_cli(["train", DEBUG_CFG, *common, *sets(f"train.out_dir={split}"), "--resume"], data_dir)
    assert res.returncode == 0, res.stderr
    a, b = losses(full), losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in range(5, 9):  # the steps after the resume: same batches, same optimizer state, same loss
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), (step, a, b)
    assert len(set(a.values())) > 4  # the loss really moves, so equality means something


@pytest.mark.slow
def test_eval_reads_checkpoint_and_writes_json(tmp_path, data_dir):
    out = tmp_path / "run"
    res = run_cli(["train", DEBUG_CFG, *sets("train.steps=3", f"train.out_dir={out}")], data_dir)
    assert res.returncode == 0, res.stderr
    meta = json.loads((out / "checkpoints" / "step_0000003" / "pmm_meta.json").read_text())
    assert meta["task_table"] == {"text_lm": 0, "text_arith": 1}
    assert len(meta["tokenizer_hash"]) == 16 and meta["config"]["train"]["steps"] == 3
    report_path = tmp_path / "eval.json"
    res = run_cli(["eval", out, "--max-samples", "6", "--out", report_path], data_dir)
    assert res.returncode == 0, res.stderr
    report = json.loads(report_path.read_text())
    assert report["step"] == 3
    assert set(report["tasks"]) == {"text_lm", "text_arith"}
    assert report["tasks"]["text_lm"]["n"] == 6 and report["tasks"]["text_lm"]["bits_per_byte"] > 0
    assert 0 <= report["tasks"]["text_arith"]["exact_match"] <= 1
    assert "text_arith" in res.stdout and "exact_match" in res.stdout


@pytest.mark.slow
def test_resume_refuses_another_model_shape(tmp_path, data_dir):
    out = tmp_path / "run"
    assert run_cli(["train", DEBUG_CFG, *sets("train.steps=2", f"train.out_dir={out}")], data_dir).returncode == 0
    res = run_cli(
        [
            "train",
            DEBUG_CFG,
            *sets("train.steps=4", f"train.out_dir={out}", "model.d_model=32"),
            "--resume",
        ],
        data_dir,
    )
    assert res.returncode == 2 and "model.d_model" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.distributed
def test_two_processes_train_and_stay_in_sync(tmp_path, data_dir):
    out = tmp_path / "dp"
    res = deepspeed_launch(
        2,
        [
            "train",
            DEBUG_CFG,
            *sets("train.steps=3", "train.log_every=1", "eval.max_samples=6", f"train.out_dir={out}"),
        ],
        data_dir,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    records = read_metrics(out)
    final = records[-1]
    assert final["weights_in_sync"] is True
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert final["eval"]["text_lm"]["n"] == 6  # both ranks' shards gathered, duplicates removed
    cfg = load_config(DEBUG_CFG)
    assert (out / "checkpoints" / "step_0000003" / "pmm_meta.json").is_file() and cfg.tasks
