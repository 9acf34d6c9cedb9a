"""`pathways-mm predict`, `samples` and `eval --predictions` through the command line."""

import json
import re

import pytest

import pathways_mm
from tests.helpers import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def samples(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("samples")
    res = run_cli(["samples", "--out", out, "--task", "digit_image", "--task", "text_arith", "--count", "2"], data_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_samples_are_files_with_their_targets(samples):
    lines = [json.loads(x) for x in (samples / "inputs.jsonl").read_text().splitlines()]
    assert [x["key"] for x in lines] == [
        "digit_image/test[0]",
        "digit_image/test[1]",
        "text_arith/test[0]",
        "text_arith/test[1]",
    ]
    assert (samples / lines[0]["image"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert lines[0]["target"] in ("zero one two three four five six seven eight nine".split())
    assert lines[2]["text"].endswith("?") and lines[2]["target"].isdigit()


def test_predict_prints_the_answer_to_one_input(image_run, samples, data_dir):
    png = samples / "digit_image-0.png"
    res = run_cli(["predict", image_run, "--task", "digit_image", "--image", png, "--max-new-tokens", "3"], data_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    want = pathways_mm.load(image_run).generate("digit_image", image=png, max_new_tokens=3)
    assert res.stdout == want + "\n"


def test_predict_runs_a_file_in_batches_and_keeps_each_key(image_run, samples, data_dir, tmp_path):
    out = tmp_path / "answers.jsonl"
    res = run_cli(
        ["predict", image_run, "--input", samples / "inputs.jsonl", "--out", out, "--batch-size", "1"], data_dir
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "predict" in res.stderr and "4/4" in res.stderr  # the progress bar
    got = [json.loads(x) for x in out.read_text().splitlines()]
    lines = [json.loads(x) for x in (samples / "inputs.jsonl").read_text().splitlines()]
    assert [(g["key"], g["task"]) for g in got] == [(x["key"], x["task"]) for x in lines]
    model = pathways_mm.load(image_run)
    assert got[1]["output"] == model.generate("digit_image", image=samples / lines[1]["image"])
    assert got[3]["output"] == model.generate("text_arith", text=lines[3]["text"])
    assert all(g["answer"] == g["output"].strip() for g in got)


def test_predict_gives_the_experts_on_request(image_run, samples, data_dir):
    png = samples / "digit_image-1.png"
    res = run_cli(["predict", image_run, "--task", "digit_image", "--image", png, "--experts"], data_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    rec = json.loads(res.stdout)
    assert rec["tokens"][0] == "<task:digit_image>" and len(rec["experts"]["block1"]) == len(rec["tokens"])


@pytest.mark.parametrize(
    "args,message",
    [
        (["--task", "nope", "--text", "hi"], "unknown task 'nope'"),
        (["--task", "digit_image", "--audio", "{samples}/digit_image-0.png"], "reads image, not audio"),
        (["--task", "digit_image", "--image", "{tmp}/broken.png"], "cannot read image"),
        (["--task", "digit_image", "--image", "{tmp}/missing.png"], "cannot read image"),
        (["--task", "digit_image"], "needs --image"),
        (["--input", "{tmp}/bad.jsonl", "--out", "{tmp}/never.jsonl"], "bad.jsonl line 2: .*reads text, not image"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(image_run, samples, data_dir, tmp_path, args, message):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    good = {"task": "text_arith", "text": "what is one plus one?"}
    (tmp_path / "bad.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(good | {"image": "x.png"}) + "\n")
    args = [a.format(samples=samples, tmp=tmp_path) for a in args]
    res = run_cli(["predict", image_run, *args], data_dir)
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("pathways-mm: error:")]
    assert len(errors) == 1 and re.search(message, errors[0]), res.stderr[-2000:]
    assert not (tmp_path / "never.jsonl").exists()


def test_eval_writes_one_prediction_per_sample(image_run, data_dir, tmp_path):
    res = run_cli(
        ["eval", image_run, "--max-samples", "5", "--out", tmp_path / "e.json", "--predictions", tmp_path / "p.jsonl"],
        data_dir,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [(r["task"], r["key"]) for r in rows] == [
        (t, f"test[{i}]") for t in ("digit_image", "text_arith") for i in range(5)
    ]
    report = json.loads((tmp_path / "e.json").read_text())
    for task in ("digit_image", "text_arith"):
        mine = [r for r in rows if r["task"] == task]
        assert all(set(r) == {"key", "task", "target", "output", "metrics"} for r in mine)
        mean = sum(r["metrics"]["exact_match"] for r in mine) / len(mine)
        assert mean == pytest.approx(report["tasks"][task]["exact_match"])
        assert all(r["metrics"]["exact_match"] == float(r["output"].strip() == r["target"]) for r in mine)
