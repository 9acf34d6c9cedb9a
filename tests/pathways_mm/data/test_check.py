"""Declared tasks' rows that training could not use are bad samples: `data check` lists them, a
training batch refuses (or with on_bad_sample: skip, leaves out) each one, naming its file and line."""

from __future__ import annotations

import json

import pytest

from pathways_mm.config import load_config
from pathways_mm.data.check import check_data
from pathways_mm.data.taskset import load_batch, load_tasks, make_sampler
from pathways_mm.encoders.text import load_tokenizer
from pathways_mm.errors import ConfigError

TOK = load_tokenizer()


@pytest.fixture
def long_target(tmp_path, data_dir):
    """An experiment whose manifest's second row has a 1 MB target."""
    rows = [{"q": "first?", "a": "yes"}, {"q": "second?", "a": "word " * 200_000}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "exp.yaml").write_text(
        "tasks: [long_answer]\n"
        "declare:\n"
        "  long_answer: {inputs: {q: text}, target: a, splits: {train: {path: m.jsonl}, test: {path: m.jsonl}}}\n"
        f"data: {{max_len: 48, root: {data_dir}}}\n"
        "train: {micro_batch_size: 2}\n"
    )
    return tmp_path / "exp.yaml"


def test_data_check_lists_a_target_longer_than_max_len(long_target, capsys):
    with pytest.raises(ConfigError, match="2 bad samples"):  # the row, in train and in test
        check_data(load_config(long_target), num_workers=0)
    out = capsys.readouterr().out
    assert f"bad: long_answer train: task 'long_answer', {long_target.parent / 'm.jsonl'} line 2: a target of" in out
    assert "does not fit data.max_len=48" in out and "line 1" not in out


@pytest.mark.parametrize("on_bad", ["error", "skip"])
def test_training_refuses_a_target_longer_than_max_len(long_target, on_bad):
    cfg = load_config(long_target, [f"data.on_bad_sample={on_bad}"])
    ts = load_tasks(cfg)
    loaded = load_batch(cfg, ts, make_sampler(cfg, ts, world=1), TOK, 0, 0, 0)  # both rows: one epoch, no repeats
    messages = [loaded.error] if on_bad == "error" else [m for _, m in loaded.bad]
    assert len(messages) == 1 and "m.jsonl line 2: a target of" in messages[0], messages
    assert (loaded.batch is None) == (on_bad == "error")
    if on_bad == "skip":
        assert loaded.batch.tokens.shape[0] == 1
