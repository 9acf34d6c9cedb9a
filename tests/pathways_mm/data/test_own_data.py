"""Training on declared tasks through the CLI, as a user would: every command takes them, a kill
and --resume with background workers repeat an uninterrupted run, and bad data is named,
skipped and counted, or stops the run."""

from __future__ import annotations

import csv
import json
import re
import shlex
import shutil

import pytest
import soundfile

import pathways_mm
from pathways_mm.config import DataConfig, load_config
from pathways_mm.tasks import registry
from pathways_mm.training.bad_samples import clearly_over, judge_after
from tests.helpers import ROOT, deepspeed_launch, read_metrics, run_cli, sets

QUICK = sets("train.micro_batch_size=8", "train.log_every=1", "train.warmup_steps=1", "eval.max_samples=4")
MOE = sets("model.moe.num_experts=4", "model.moe.top_k=2")
SKIP_HALF = ("data.on_bad_sample=skip", "data.max_bad_fraction=0.5")
SEEN_WORD = """\
  seen_word:
    inputs: {image: image}
    prompt: say it
    target: word
    splits: {train: {path: train.jsonl}, test: {path: test.jsonl}}
"""


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def ok(res):
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.mark.slow
def test_every_command_takes_declared_tasks(examples, data_dir, tmp_path):
    cfg = examples / "experiment.yaml"
    run = tmp_path / "run"
    res = ok(
        run_cli(
            ["train", cfg, *QUICK, *MOE, *sets("train.steps=4", "data.num_workers=2", f"train.out_dir={run}")], data_dir
        )
    )
    passes = re.search(r"passes over each task's training data.*?: (.*)", res.stderr).group(1)
    per_task = {t: float(p) for t, p in (item.split() for item in passes.split(", "))}
    assert sum(per_task.values()) * 12 == pytest.approx(4 * 8, abs=0.1)  # 4 steps of 8 draws over 12-row tasks
    ok(
        run_cli(
            ["eval", run, "--max-samples", "4", "--out", tmp_path / "ev.json", "--routes", tmp_path / "r.json"],
            data_dir,
        )
    )
    report = json.loads((tmp_path / "ev.json").read_text())
    assert set(report["tasks"]) == {"seen_digit", "heard_digit", "same_digit", "hf_digit", "parquet_sum"}
    assert all(t["n"] == 4 for t in report["tasks"].values())
    ok(run_cli(["routes", tmp_path / "r.json", "--out", tmp_path / "routes"], data_dir))
    assert (tmp_path / "routes" / "routes.html").is_file()
    ok(
        run_cli(
            ["export", "--from", run, "--task", "heard_digit", "--out", tmp_path / "export", "--max-samples", "4"],
            data_dir,
        )
    )
    assert json.loads((tmp_path / "export" / "export.json").read_text())["dropped_encoders"] == ["vision"]
    # a new declared task, from a config next to the data: add-task reads it from --config
    new = examples / "add.yaml"
    new.write_text((examples / "experiment.yaml").read_text().replace("declare:\n", "declare:\n" + SEEN_WORD, 1))
    args = ["add-task", "--from", run, "--task", "seen_word", "--steps", "2", "--config", new]
    ok(run_cli([*args, "--out-dir", tmp_path / "added", *MOE, *QUICK], data_dir))
    added = json.loads((tmp_path / "added" / "add_task_report.json").read_text())
    assert added["old_outputs_bit_identical"] is True and added["new_task"]["n"] == 4
    res = ok(run_cli(["tasks", "--config", cfg], data_dir))
    assert f"declared in {cfg.resolve()} (parquet " in res.stdout


@pytest.mark.slow
def test_baseline_of_a_declared_task(examples, data_dir, tmp_path):
    res = ok(
        run_cli(
            [
                "baseline",
                examples / "experiment.yaml",
                "--task",
                "hf_digit",
                "--out-dir",
                tmp_path,
                *QUICK,
                *sets("train.steps=3"),
            ],
            data_dir,
        )
    )
    assert "hf_digit" in res.stdout


@pytest.mark.slow
def test_kill_then_resume_with_workers_matches_an_uninterrupted_run(examples, data_dir, tmp_path):
    common = [examples / "experiment.yaml", *QUICK, *sets("train.steps=6", "train.save_every=2")]
    full, killed = tmp_path / "full", tmp_path / "killed"
    ok(run_cli(["train", *common, *sets(f"train.out_dir={full}", "data.num_workers=0")], data_dir))
    res = run_cli(
        ["train", *common, *sets(f"train.out_dir={killed}", "data.num_workers=2")],
        data_dir,
        env_extra={"PMM_FAULT": "kill:step=3"},
    )
    assert res.returncode != 0 and (killed / "checkpoints" / "latest").read_text() == "step_0000002"
    res = ok(run_cli(["train", *common, *sets(f"train.out_dir={killed}", "data.num_workers=2"), "--resume"], data_dir))
    assert "steps 2->6" in res.stderr
    a, b = losses(full), losses(killed)
    assert sorted(b) == list(range(1, 7))
    for step in range(3, 7):  # the same batches from two workers as from none: the same losses
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), (step, a, b)
    assert len(set(a.values())) > 3


@pytest.fixture
def broken(examples, tmp_path):
    """The example folder whose train.jsonl has a malformed line (3) and a missing image (6) of 12 rows."""
    out = tmp_path / "ex"
    shutil.copytree(examples, out)
    lines = (out / "train.jsonl").read_text().splitlines()
    lines[2] = lines[2][:-1]
    lines[5] = lines[5].replace("images/", "images/missing-")
    (out / "train.jsonl").write_text("\n".join(lines) + "\n")
    return out


@pytest.mark.slow
def test_bad_data_is_named_skipped_and_counted(broken, data_dir, tmp_path):
    cfg = broken / "experiment.yaml"
    base = [cfg, *QUICK, *sets("tasks=[seen_digit, heard_digit]", "train.steps=3", "data.num_workers=1")]
    res = run_cli(["data", "check", cfg, "--workers", "1"], data_dir)
    assert res.returncode == 2 and "2 bad samples" in res.stderr and "data.max_bad_fraction" in res.stderr
    assert res.stdout.count("train.jsonl line 3: malformed JSON line") == 1 and res.stdout.count("missing-") == 1
    assert "line 1 column" not in res.stdout  # one line number: the manifest's
    run = tmp_path / "run"
    res = run_cli(["train", *base, *sets(f"train.out_dir={run}")], data_dir)
    assert res.returncode == 2 and "pathways-mm: error:" in res.stderr
    assert "train.jsonl line 3: malformed JSON line" in res.stderr or "image file not found" in res.stderr
    assert not (run / "checkpoints").exists() and (run / "metrics.jsonl").exists()
    # the same folder again: the stopped run holds no checkpoint, so the rerun starts, its logs kept aside
    res = ok(run_cli(["train", *base, *sets(f"train.out_dir={run}", *SKIP_HALF)], data_dir))
    assert "stopped before its first checkpoint; starting afresh" in res.stderr
    (aside,) = run.glob("stopped-*")
    assert (aside / "metrics.jsonl").is_file() and (aside / "config.yaml").is_file()
    records = [r for r in read_metrics(run) if "bad_total" in r]
    assert records[-1]["read_total"] == 3 * 8 and records[-1]["bad_total"] >= 1
    assert set().union(*(r["bad_samples"] for r in records)) == {"seen_digit"}
    assert f"skipped {records[-1]['bad_total']} bad samples of the 24 read" in res.stderr
    # over the limit: the run saves, then stops with one line that says how to go on
    strict = tmp_path / "strict"
    res = run_cli(
        ["train", *base, *sets(f"train.out_dir={strict}", "data.on_bad_sample=skip", "data.max_bad_fraction=0.01")],
        data_dir,
    )
    assert res.returncode == 2, res.stderr[-2000:]
    (error,) = [line for line in res.stderr.splitlines() if line.startswith("pathways-mm: error:")]
    assert "more than data.max_bad_fraction=0.01" in error and "continue with --resume" in error
    saved = (strict / "checkpoints" / "latest").read_text()
    assert f"saved {strict / 'checkpoints' / saved} first" in error


def test_the_share_of_bad_samples_is_judged_once_it_can_be():
    cfg = DataConfig(on_bad_sample="skip", max_bad_fraction=0.01)
    assert judge_after(cfg, num_rows=324) == 324  # small data: judged over all of it
    assert judge_after(cfg, num_rows=10**6) == 1000  # large data: once 10 bad ones are expected at the limit
    assert judge_after(DataConfig(max_bad_fraction=0.0), 324) == 0  # no bad sample allowed: judged at once
    assert not clearly_over(4, 100, 0.01)  # 4 of the first 100: could be chance at 1%
    assert clearly_over(8, 16, 0.01)  # half of them: not chance


@pytest.mark.distributed
def test_two_processes_with_workers_count_bad_samples_over_both_ranks(broken, data_dir, tmp_path):
    out = tmp_path / "dp"
    args = [broken / "experiment.yaml", *QUICK, *sets("train.steps=4", f"train.out_dir={out}", "data.num_workers=1")]
    res = deepspeed_launch(2, ["train", *args, *sets(*SKIP_HALF)], data_dir)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    records = read_metrics(out)
    counted = [r for r in records if "read_total" in r]
    assert counted[-1]["read_total"] == 4 * 8 * 2  # every rank's samples, summed
    assert counted[-1]["bad_total"] >= 1 and records[-1]["weights_in_sync"] is True
    assert all(t["n"] == 4 for t in records[-1]["eval"].values())  # both ranks' shards of each declared task


@pytest.mark.slow
def test_a_model_trained_on_declared_tasks_answers_them(examples, data_dir, tmp_path, monkeypatch):
    """predict (one input and --input) and pathways_mm.load answer declared tasks, from the run and
    from its export, exactly as `eval --predictions` scored the same samples; audio at 22,050 Hz."""
    registry.ensure_loaded()  # before the copy: loaded into it, the built-ins would be gone after the test
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # load() declares the run's tasks
    run = tmp_path / "run"
    two = sets("tasks=[seen_digit, heard_digit]", "train.steps=4", f"train.out_dir={run}")
    ok(run_cli(["train", examples / "experiment.yaml", *QUICK, *MOE, *two], data_dir))
    meta = json.loads((run / "checkpoints" / "step_0000004" / "pmm_meta.json").read_text())
    assert list(meta["config"]["declare"]["same_digit"]["inputs"]) == ["png", "flac"]  # the segments' order
    ok(run_cli(["eval", run, "--max-samples", "4", "--predictions", tmp_path / "p.jsonl"], data_dir))
    scored = {(p["task"], p["key"]): p["output"] for p in map(json.loads, (tmp_path / "p.jsonl").open())}
    images = [examples / json.loads(line)["image"] for line in (examples / "test.jsonl").open()]
    clips = [examples / r["audio"] for r in csv.DictReader((examples / "test.csv").open())]
    assert {soundfile.info(str(c)).samplerate for c in clips} == {22_050}  # the model's rate is 16,000
    inputs = [{"key": f"test[{i}]", "task": "seen_digit", "image": str(p)} for i, p in enumerate(images)]
    inputs += [{"key": f"test[{i}]", "task": "heard_digit", "audio": str(p)} for i, p in enumerate(clips)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in inputs))
    ok(run_cli(["export", "--from", run, "--out", tmp_path / "export"], data_dir))
    for source in (run, tmp_path / "export"):
        out = tmp_path / f"{source.name}.jsonl"
        ok(run_cli(["predict", source, "--input", tmp_path / "in.jsonl", "--out", out], data_dir))
        answers = {(r["task"], r["key"]): r["output"] for r in map(json.loads, out.open())}
        assert answers == scored and len(answers) == 8
        res = ok(run_cli(["predict", source, "--task", "heard_digit", "--audio", clips[1]], data_dir))
        assert res.stdout.strip() == scored["heard_digit", "test[1]"]
        model = pathways_mm.load(source, "cpu")
        assert model.generate("seen_digit", image=images[2]) == scored["seen_digit", "test[2]"]
        samples, rate = soundfile.read(clips[3], dtype="float32")
        assert model.generate("heard_digit", audio=(samples, rate)) == scored["heard_digit", "test[3]"]


def readme_walkthrough() -> list[list[str]]:
    """The commands of the README's own-data walkthrough (its first code block), as argument lists."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Training on your own data\n") :]
    block = section.split("```\n", 2)[1]
    prefix = ".venv/bin/pathways-mm "
    return [shlex.split(line[len(prefix) :].split("  #")[0]) for line in block.splitlines() if line.startswith(prefix)]


@pytest.mark.slow
def test_the_readme_walkthrough_trains_a_sparse_model_and_predicts_on_its_files(data_dir, tmp_path):
    """The README's own-data commands, word for word in a new folder (training shortened)."""
    commands = readme_walkthrough()
    assert [c[0] for c in commands] == ["data", "data", "train", "eval", "predict", "predict"]
    for args in commands:
        if args[0] == "train":
            args = [*args, *sets("train.steps=20", "train.log_every=5", "eval.max_samples=4")]
        res = ok(run_cli(args, data_dir, cwd=tmp_path))
        if args[0] == "train":
            total, active = map(float, re.search(r"([\d.]+)M params \(([\d.]+)M active\)", res.stderr).groups())
            assert active < total  # sparse: a token meets fewer parameters than the model holds
        if args[0] == "predict":  # one answer line (after 20 steps it may well be empty)
            assert res.stdout.count("\n") == 1, res.stdout + res.stderr[-2000:]
    cfg = load_config(tmp_path / "my_data" / "experiment.yaml")
    assert cfg.model.moe.num_experts > 0 and cfg.model.moe.mi_coef > 0  # the sparse model with pathways
    rate = soundfile.info(str(tmp_path / "my_data" / "audio" / "test-0000.wav")).samplerate
    assert rate != cfg.model.audio.sample_rate  # predict resampled a clip, as training does
