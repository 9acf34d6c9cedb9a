"""Driven by the registry: every registered task builds, encodes, collates and trains one step."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from pathways_mm.config import ModelConfig
from pathways_mm.data.collate import collate
from pathways_mm.data.datasets import load_split
from pathways_mm.encoders.text import load_tokenizer
from pathways_mm.model.model import build_model
from pathways_mm.tasks import get_task, list_tasks
from pathways_mm.tasks.speech import spoken_digits, spoken_numbers
from pathways_mm.training.losses import forward_loss
from tests.helpers import read_metrics, run_cli, sets

TOK = load_tokenizer()
MEDIA_TASKS = (
    "digit_image",
    "digit_speech",
    "speech_numbers",
    "image_caption",
    "image_speech_same",
    "image_speech_sum",
)


def test_the_builtin_suite_is_registered():
    names = {t.name for t in list_tasks()}
    assert set(MEDIA_TASKS) | {"text_lm", "text_arith"} <= names


@pytest.mark.parametrize("name", sorted(t.name for t in list_tasks()))
def test_every_task_builds_and_trains_one_step(name, data_dir):
    task = get_task(name)
    train = load_split(task, "train", data_dir, 1234)
    test = load_split(task, "test", data_dir, 1234)
    assert len(train) > 0 and len(test) > 0
    for metric in task.metrics:
        chance = task.chance(metric, train, test)
        assert chance is None or 0.0 <= chance <= (8.0 if metric == "bits_per_byte" else 1.0)
    cfg = ModelConfig(max_seq_len=128)
    picks = train[:4]
    examples = [task.encode(s) for s in picks]
    assert {m for ex in examples for m, _ in ex.segments} <= set(task.modalities) | {"text"}
    batch = collate(examples, [0] * len(picks), TOK, 128, model_cfg=cfg, rng=np.random.default_rng(0))
    torch.manual_seed(0)
    model = build_model(cfg, TOK.vocab_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.decoder.parameters()]
    loss = forward_loss(model, batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.decoder.parameters()))


@pytest.mark.parametrize("name", sorted(t.name for t in list_tasks()))
def test_a_users_inputs_are_laid_out_as_encode_lays_out_a_sample(name, data_dir):
    """`predict` builds its input with `segments_for`: the same segments, in the same order."""
    task = get_task(name)
    example = task.encode(load_split(task, "test", data_dir, 1234)[0])
    laid_out = task.segments_for(dict(example.segments))
    assert [(m, id(raw)) for m, raw in laid_out] == [(m, id(raw)) for m, raw in example.segments]


@pytest.mark.parametrize("name", MEDIA_TASKS)
def test_test_samples_come_from_held_out_banks(name, data_dir):
    """Every sample points into its own split's bank, whose items training never sees."""
    task = get_task(name)
    for split in ("train", "test"):
        assert {s["split"] for s in load_split(task, split, data_dir, 1234)} == {split}


@pytest.mark.parametrize("name", ["image_speech_same", "image_speech_sum"])
def test_image_and_speech_targets_show_both_digits_then_the_answer(name, data_dir):
    task = get_task(name)
    for s in load_split(task, "test", data_dir, 1234)[:20]:
        target = task.encode(s).target_text
        seen, heard = map(int, re.findall(r"\d", target)[:2])
        assert task.answer(seen, heard) == s["answer"] == task.final_answer(target)


def test_speech_splits_share_no_voice(data_dir):
    for bank in (spoken_digits, spoken_numbers):
        train, test = bank("train", data_dir, 1234), bank("test", data_dir, 1234)
        assert not set(train.voices.tolist()) & set(test.voices.tolist())


@pytest.mark.slow
def test_train_and_eval_every_builtin_task_through_the_cli(data_dir, tmp_path):
    out = tmp_path / "run"
    names = ",".join(MEDIA_TASKS + ("text_arith",))
    res = run_cli(
        [
            "train",
            "configs/experiments/debug.yaml",
            *sets(f"tasks=[{names}]", "train.steps=2", "data.max_len=96", "eval.max_samples=8", f"train.out_dir={out}"),
        ],
        data_dir,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert read_metrics(out)[-1]["step"] == 2
    for name in MEDIA_TASKS:
        assert name in res.stderr  # the final evaluation table has a row per task
