"""`export` writes safetensors + JSON, and the exported model answers as the run does."""

import json

import pytest
import torch

import pathways_mm
from pathways_mm.data.collate import collate
from pathways_mm.data.datasets import encode, load_split
from pathways_mm.errors import ConfigError
from pathways_mm.inference.export import load_export
from pathways_mm.tasks import get_task
from tests.helpers import run_cli

pytestmark = pytest.mark.slow


def digit_samples(data_dir, n=6):
    task = get_task("digit_image")
    return [encode(task, s) for s in load_split(task, "test", data_dir, 1234)[:n]]


@pytest.fixture(scope="module")
def whole(image_run, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "whole"
    res = run_cli(["export", "--from", image_run, "--out", out], data_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_a_whole_run_exports_as_safetensors_and_json(whole, image_run):
    assert sorted(p.name for p in whole.iterdir()) == ["export.json", "model.safetensors"]
    assert (whole / "model.safetensors").read_bytes()[8:9] == b"{"  # a JSON header, no pickle
    info = json.loads((whole / "export.json").read_text())
    assert info["kind"] == "run" and info["task_table"] == {"digit_image": 0, "text_arith": 1}
    run = pathways_mm.load(image_run, device="cpu")
    model, _ = load_export(whole)
    assert model.state_dict().keys() == run.module.state_dict().keys()
    assert all(torch.equal(v, run.module.state_dict()[k]) for k, v in model.state_dict().items())


def test_the_exported_model_answers_as_the_run_does(whole, image_run, data_dir):
    run, exported = pathways_mm.load(image_run, device="cpu"), pathways_mm.load(whole, device="cpu")
    assert exported.tasks == run.tasks == ["digit_image", "text_arith"]
    images = [dict(ex.segments)["image"] for ex in digit_samples(data_dir)]
    items = [{"image": im} for im in images]
    kw = {"max_new_tokens": 4, "return_experts": True}
    assert exported.generate_batch("digit_image", items, **kw) == run.generate_batch("digit_image", items, **kw)
    question = "what is three times two?"
    assert exported.generate("text_arith", text=question) == run.generate("text_arith", text=question)
    batch = collate(digit_samples(data_dir), [0] * 6, run.tok, run.cfg.data.max_len, model_cfg=run.cfg.model)
    with torch.no_grad():
        assert torch.equal(exported.module(batch).logits, run.module(batch).logits)


def test_a_task_export_answers_its_task_as_the_run_does(image_run, data_dir, tmp_path):
    res = run_cli(
        ["export", "--from", image_run, "--task", "digit_image", "--out", tmp_path / "x", "--max-samples", "6"],
        data_dir,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["export.json", "model.safetensors"]
    sub, run = pathways_mm.load(tmp_path / "x"), pathways_mm.load(image_run)
    assert sub.tasks == ["digit_image"]
    items = [{"image": dict(ex.segments)["image"]} for ex in digit_samples(data_dir)]
    kw = {"max_new_tokens": 4, "return_experts": True}
    got, want = sub.generate_batch("digit_image", items, **kw), run.generate_batch("digit_image", items, **kw)
    assert got == want  # the same text, and the same experts by their global ids
    with pytest.raises(ConfigError, match="unknown task 'text_arith'"):
        sub.generate("text_arith", text="what is one plus one?")


def test_an_old_pickle_export_is_refused(tmp_path, whole):
    info = json.loads((whole / "export.json").read_text())
    info.pop("format")
    (tmp_path / "export.json").write_text(json.dumps(info))
    with pytest.raises(ConfigError, match="export again"):
        load_export(tmp_path)
