"""train.log_to: the same records in metrics.jsonl, metrics.csv and TensorBoard's event files."""

import csv
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pathways_mm.config import load_config
from pathways_mm.errors import ConfigError
from pathways_mm.training.logs import CsvLog, JsonlLog, flatten, open_logs
from tests.helpers import MOE_CFG, read_metrics, run_cli, sets

RECORD = {
    "step": 10,
    "loss": 2.5,
    "task_loss": {"a": 2.0, "b": 3.0},
    "skipped": "non-finite loss",
    "weights_in_sync": True,
    "eval": {"a": {"exact_match": 0.5, "chance": {"exact_match": None}}},
    "expert_load": {"block1": {"a": {"e0": 0.75, "e1": 0.25}}},
}


def test_flatten_names_every_number_by_its_path():
    assert flatten(RECORD) == {
        "loss": 2.5,
        "task_loss/a": 2.0,
        "task_loss/b": 3.0,
        "eval/a/exact_match": 0.5,
        "expert_load/block1/a/e0": 0.75,
        "expert_load/block1/a/e1": 0.25,
    }


@pytest.mark.parametrize("cls,name", [(JsonlLog, "metrics.jsonl"), (CsvLog, "metrics.csv")])
def test_a_resume_drops_the_records_after_its_step(tmp_path, cls, name):
    log = cls(tmp_path / name, None)
    for step in (5, 10, 15):
        log.write({"step": step, "loss": float(step)})
    with (tmp_path / name).open("a") as f:
        f.write('{"step": 20, "lo')  # torn by a kill mid-write
    cls(tmp_path / name, resume_step=10).write({"step": 15, "loss": -1.0})
    text = (tmp_path / name).read_text()
    if cls is JsonlLog:
        steps = [(r["step"], r["loss"]) for r in map(json.loads, text.splitlines())]
    else:
        rows = list(csv.DictReader(text.splitlines()))
        steps = [(int(r["step"]), float(r["value"])) for r in rows]
    assert steps == [(5, 5.0), (10, 10.0), (15, -1.0)]


def test_log_to_is_checked():
    assert load_config(MOE_CFG).train.log_to == ("jsonl",)
    for bad in ("[tensorboard]", "[jsonl, wandb]", "[jsonl, csv, csv]"):
        with pytest.raises(ConfigError, match="train.log_to"):
            load_config(MOE_CFG, [f"train.log_to={bad}"])


def test_open_logs_makes_the_named_sinks(tmp_path):
    logs = open_logs(tmp_path, ("jsonl", "csv"), None)
    logs.write(RECORD)
    logs.close()
    assert (tmp_path / "metrics.jsonl").is_file() and (tmp_path / "metrics.csv").is_file()
    assert not (tmp_path / "tensorboard").exists()


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_tensorboard_gets_losses_lr_eval_and_expert_load(tmp_path, data_dir):
    out = tmp_path / "run"
    args = ["train", MOE_CFG, *sets("train.steps=6", "train.log_every=2", "train.eval_every=4", "eval.max_samples=4")]
    args += sets("train.log_to=[jsonl,tensorboard,csv]", f"train.out_dir={out}")
    res = run_cli([*args, "--stop-after", "4"], data_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_cli([*args, "--resume"], data_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    got = scalars(out / "tensorboard")
    assert [s for s, _ in got["loss"]] == [2, 4, 6]  # the resumed run's steps once each
    records = {r["step"]: r for r in read_metrics(out) if "loss" in r}
    assert [v for _, v in got["loss"]] == pytest.approx([records[s]["loss"] for s in (2, 4, 6)])
    for tag in ("task_loss/text_lm", "task_loss/text_arith", "lr", "skipped_steps"):
        assert [s for s, _ in got[tag]] == [2, 4, 6], tag
    assert [s for s, _ in got["eval/text_arith/exact_match"]] == [4, 6]
    assert "eval/text_lm/bits_per_byte" in got
    # route telemetry of the training steps: per MoE layer (block 1) and task, each expert's share
    load = {tag: v for tag, v in got.items() if tag.startswith("expert_load/block1/text_lm/")}
    assert sorted(load) == [f"expert_load/block1/text_lm/e{e}" for e in range(4)]
    for i, step in enumerate((2, 4, 6)):
        assert sum(v[i][1] for v in load.values()) == pytest.approx(1.0, abs=1e-3)
        assert records[step]["expert_load"]["block1"]["text_lm"]["e0"] == pytest.approx(
            load["expert_load/block1/text_lm/e0"][i][1]
        )
    rows = list(csv.DictReader((out / "metrics.csv").read_text().splitlines()))
    assert sorted({int(r["step"]) for r in rows if r["name"] == "loss"}) == [2, 4, 6]
