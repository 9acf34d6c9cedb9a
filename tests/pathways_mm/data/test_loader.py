"""The DataLoader path: batches are a pure function of (seed, step, micro-step, rank), whatever
the number of workers; bad samples are skipped and counted, or stop the run naming the file."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from pathways_mm.config import load_config
from pathways_mm.data.loader import micro_batches
from pathways_mm.data.taskset import load_batch, load_tasks, make_sampler, train_batch
from pathways_mm.encoders.text import load_tokenizer
from pathways_mm.model.batch import Batch

TOK = load_tokenizer()


def config(examples, data_dir, *sets: str):
    overrides = [
        "tasks=[seen_digit, heard_digit, same_digit, hf_digit, parquet_sum, text_arith]",
        f"data.root={data_dir}",
        "train.micro_batch_size=4",
        "train.grad_accum=2",
        "train.steps=4",
        *sets,
    ]
    return load_config(examples / "experiment.yaml", overrides)


def same(a: Batch, b: Batch) -> bool:
    for f in dataclasses.fields(Batch):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if (x is None) != (y is None) or (x is not None and not torch.equal(x, y)):
            return False
    return True


def test_zero_one_and_two_workers_give_identical_batches(examples, data_dir):
    cfg = config(examples, data_dir)
    ts = load_tasks(cfg)
    sampler = make_sampler(cfg, ts)
    runs = {w: list(micro_batches(cfg, ts, sampler, TOK, 0, 0, num_workers=w)) for w in (0, 1, 2)}
    keys = [(s, m) for s in range(4) for m in range(2)]
    for w, loaded in runs.items():
        assert [(lb.step, lb.micro) for lb in loaded] == keys, w
    for k, (step, micro) in enumerate(keys):
        direct = train_batch(cfg, ts, sampler, TOK, step, micro, 0)  # what the loop computed before the DataLoader
        assert all(same(runs[w][k].batch, direct) for w in (0, 1, 2)), (step, micro)
    tasks = torch.cat([lb.batch.task_ids for lb in runs[0]])
    assert len(set(tasks.tolist())) >= 4  # the batches mix media tasks: decoding really ran in the workers
    assert any(lb.batch.images is not None for lb in runs[2]) and any(lb.batch.audio is not None for lb in runs[2])


def test_a_batch_travels_packed_in_one_buffer_per_dtype(examples, data_dir):
    cfg = config(examples, data_dir)
    ts = load_tasks(cfg)
    sampler = make_sampler(cfg, ts)
    batches = [load_batch(cfg, ts, sampler, TOK, s, m, 0).batch for s in range(4) for m in range(2)]
    media = next(b for b in batches if b.images is not None and b.audio is not None)
    for batch in batches:
        packed = batch.packed()
        dtypes = {getattr(batch, f.name).dtype for f in dataclasses.fields(Batch) if getattr(batch, f.name) is not None}
        assert set(packed.buffers) == dtypes and len(packed.buffers) <= 2
        assert same(packed.unpacked(), batch)
    unpacked = media.packed().unpacked()
    assert unpacked.images.untyped_storage().data_ptr() == unpacked.audio.untyped_storage().data_ptr()  # views


def test_a_resumed_loader_sees_the_same_batches(examples, data_dir):
    cfg = config(examples, data_dir)
    ts = load_tasks(cfg)
    full = list(micro_batches(cfg, ts, make_sampler(cfg, ts), TOK, 0, 0, num_workers=2))
    resumed = list(micro_batches(cfg, ts, make_sampler(cfg, ts), TOK, 0, 2, num_workers=1))  # from step 2
    assert len(resumed) == 4
    assert all(same(a.batch, b.batch) for a, b in zip(full[4:], resumed))


@pytest.fixture
def broken(examples, tmp_path):
    """The example folder with two bad rows in train.jsonl: a malformed line and a missing image."""
    out = tmp_path / "ex"
    shutil.copytree(examples, out)
    lines = (out / "train.jsonl").read_text().splitlines()
    lines[2] = lines[2][:-1]  # no closing brace
    lines[5] = lines[5].replace("images/", "images/missing-")
    (out / "train.jsonl").write_text("\n".join(lines) + "\n")
    return out


def test_bad_samples_stop_the_batch_naming_the_file_and_line(broken, data_dir):
    cfg = config(broken, data_dir, "tasks=[seen_digit]", "train.steps=6")
    ts = load_tasks(cfg)
    errors = [lb.error for lb in micro_batches(cfg, ts, make_sampler(cfg, ts), TOK, 0, 0, num_workers=1) if lb.error]
    assert errors and all("train.jsonl line 3: malformed JSON" in e or "missing-" in e for e in errors)
    assert any("train.jsonl line 6: image file not found" in e for e in errors)  # not wrapped by the worker


def test_skipped_samples_are_counted_once_per_pass(broken, data_dir):
    cfg = config(broken, data_dir, "tasks=[seen_digit]", "train.steps=6", "data.on_bad_sample=skip")
    ts = load_tasks(cfg)
    sampler = make_sampler(cfg, ts)
    loaded = [load_batch(cfg, ts, sampler, TOK, s, m, 0) for s in range(6) for m in range(2)]  # 48 draws: 4 passes
    assert all(lb.error is None for lb in loaded)
    bad = [msg for lb in loaded for _, msg in lb.bad]
    assert len(bad) == 2 * 4  # two bad rows, each read once per pass
    assert sum(len(lb.batch) for lb in loaded) == 48 - 8
