import json

import pytest

from pathways_mm.config import load_config
from tests.helpers import DEBUG_CFG, deepspeed_launch, error_lines, read_metrics, run_cli, sets


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
    # every command launches the same way: eval over two ranks (the launcher adds --local_rank)
    res = deepspeed_launch(2, ["eval", out, "--max-samples", "6", "--out", tmp_path / "eval.json"], data_dir)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["tasks"]["text_lm"]["n"] == 6 and report["step"] == 3
    assert res.stdout.count("bits_per_byte") == 1  # one table, from rank 0


def _tree(run_dir):
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in run_dir.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_training_again_into_a_run_never_destroys_it(tmp_path, data_dir):
    """The issue's case: 20 steps saved every 5, then the same command with train.steps=3 and no --resume
    pruned the new checkpoint, cut metrics.jsonl and left `eval RUN` on the old step 20."""
    out = tmp_path / "run"
    common = [*sets("train.log_every=1", "eval.max_samples=2", f"train.out_dir={out}")]
    res = run_cli(["train", DEBUG_CFG, *common, *sets("train.steps=4", "train.save_every=2")], data_dir)
    assert res.returncode == 0, res.stderr
    assert "CUDA_HOME" not in res.stderr and "built successfully" not in res.stdout + res.stderr  # DeepSpeed's noise
    before = _tree(out)
    res = run_cli(["train", DEBUG_CFG, *common, *sets("train.steps=3")], data_dir)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert error_lines(res.stderr) == [
        f"pathways-mm: error: train.out_dir {out} already holds a run (checkpoints, metrics.jsonl); continue it "
        "with --resume, or start over with --overwrite (deletes its checkpoints and metrics), or set another train.out_dir"
    ]
    assert _tree(out) == before  # not a byte touched
    res = run_cli(["train", DEBUG_CFG, *common, *sets("train.steps=3"), "--resume"], data_dir)
    assert res.returncode == 2 and "--resume from step 4, past train.steps=3" in res.stderr and _tree(out) == before
    res = run_cli(["train", DEBUG_CFG, *common, *sets("train.steps=3"), "--resume", "--overwrite"], data_dir)
    assert res.returncode == 2 and "give one" in res.stderr and _tree(out) == before
    (out / "notes.txt").write_text("mine")
    res = run_cli(["train", DEBUG_CFG, *common, *sets("train.steps=3"), "--overwrite"], data_dir)
    assert res.returncode == 0, res.stderr
    assert [p.name for p in (out / "checkpoints").iterdir() if p.is_dir()] == ["step_0000003"]
    assert (out / "checkpoints" / "latest").read_text() == "step_0000003"
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3]
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite deletes the run's files, nothing else


@pytest.mark.slow
def test_an_error_during_training_starts_its_own_line(tmp_path, data_dir):
    """The progress bar's line is finished before the error is printed."""
    res = run_cli(
        ["train", DEBUG_CFG, *sets("train.steps=5", "train.max_bad_steps=1", f"train.out_dir={tmp_path / 'r'}")],
        data_dir,
        env_extra={"PMM_FAULT": "nan_grad:step=2"},
    )
    assert res.returncode == 1 and "train:" in res.stderr
    assert len(error_lines(res.stderr)) == 1 and "had a non-finite loss or gradient" in error_lines(res.stderr)[0]


@pytest.mark.parametrize(
    "flag,message",
    [
        (["--stop-after", "-1"], "--stop-after must be between 1 and"),
        (["--stop-after", "0"], "--stop-after must be between 1 and"),
    ],
)
def test_negative_counts_on_the_command_line_are_refused(flag, message, tmp_path, data_dir):
    res = run_cli(["train", DEBUG_CFG, *sets(f"train.out_dir={tmp_path}"), *flag], data_dir)
    assert res.returncode == 2 and len(error_lines(res.stderr)) == 1 and message in res.stderr, res.stderr
