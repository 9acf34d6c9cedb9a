"""Dataset caches: a record of sample count and checksum beside every split, verified on each read."""

from __future__ import annotations

import dataclasses
import json

import pytest

from pathways_mm.config import load_config
from pathways_mm.data.collate import collate
from pathways_mm.data.datasets import encode, load_split, record_path, split_path
from pathways_mm.data.taskset import TaskSet, load_batch, load_tasks, make_sampler
from pathways_mm.encoders.text import load_tokenizer
from pathways_mm.errors import ConfigError
from pathways_mm.tasks import MultimodalExample, Task, get_task
from tests.helpers import DEBUG_CFG

TOK = load_tokenizer()


class Words(Task):
    """A small task that is never registered: the cache machinery is all it exercises."""

    name, modalities, metrics = "words_cache_test", ("text",), ("exact_match",)
    samples: list = [{"w": f"word{i}", "n": i} for i in range(50)]

    def build_dataset(self, split, root, seed):
        return list(self.samples)

    def encode(self, sample):
        return MultimodalExample(self.name, (("text", sample["w"]),), sample["w"])


def test_a_split_is_written_with_its_record_and_read_back(tmp_path):
    task = Words()
    assert load_split(task, "train", tmp_path, 0) == Words.samples
    path = split_path(task, "train", tmp_path, 0)
    record = json.loads(record_path(path).read_text())
    assert record["samples"] == 50 and record["bytes"] == path.stat().st_size and len(record["sha256"]) == 64
    assert load_split(task, "train", tmp_path, 0) == Words.samples  # read back through the record


def test_a_cache_cut_at_a_line_boundary_is_an_error_naming_the_file_then_rebuilt(tmp_path):
    task = Words()
    load_split(task, "train", tmp_path, 0)
    path = split_path(task, "train", tmp_path, 0)
    whole = path.read_bytes()
    lines = whole.splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:5]))  # a valid JSONL file, 45 samples short
    with pytest.raises(ConfigError) as e:
        load_split(task, "train", tmp_path, 0)
    assert str(e.value).startswith(f"{path}: dataset cache is cut or altered")
    assert "5 samples; its record says 50 samples); delete it and it is rebuilt" in str(e.value)
    path.unlink()  # what the message says to do
    assert load_split(task, "train", tmp_path, 0) == Words.samples
    assert path.read_bytes() == whole  # rebuilt byte-identical


def test_an_altered_sample_of_the_same_length_is_caught(tmp_path):
    task = Words()
    load_split(task, "train", tmp_path, 0)
    path = split_path(task, "train", tmp_path, 0)
    path.write_bytes(path.read_bytes().replace(b"word1", b"word9", 1))
    with pytest.raises(ConfigError, match="dataset cache is cut or altered"):
        load_split(task, "train", tmp_path, 0)


def test_a_cache_without_a_record_is_adopted_only_if_whole(tmp_path):
    """Caches written before records existed: kept (and given a record) when they equal a fresh build."""
    task = Words()
    load_split(task, "train", tmp_path, 0)
    path = split_path(task, "train", tmp_path, 0)
    record_path(path).unlink()
    assert load_split(task, "train", tmp_path, 0) == Words.samples and record_path(path).is_file()
    record_path(path).unlink()
    path.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:-1]))
    with pytest.raises(ConfigError, match="without a checksum record differs from a fresh build"):
        load_split(task, "train", tmp_path, 0)
    assert not record_path(path).exists()


@pytest.mark.parametrize(
    "bad,kind",
    [(b"raw bytes", "TypeError"), ("lone \udcff surrogate", "UnicodeEncodeError"), (float("nan"), "ValueError")],
)
def test_a_sample_that_is_not_json_names_the_task_and_the_sample(tmp_path, monkeypatch, bad, kind):
    monkeypatch.setattr(Words, "samples", [{"w": "ok"}, {"w": "ok"}, {"w": bad}])
    with pytest.raises(ConfigError) as e:
        load_split(Words(), "train", tmp_path, 0)
    assert str(e.value).startswith(f"task 'words_cache_test': build_dataset's train[2] is not a JSON sample ({kind}")
    assert list(tmp_path.rglob("*.jsonl")) == []


def test_undecodable_text_in_a_sample_names_the_task_and_the_sample():
    tok = load_tokenizer()
    ex = MultimodalExample("my_plugin", (("text", "read \udcff this"),), "x")
    with pytest.raises(ConfigError) as e:
        collate([ex], [0], tok, 64, keys=["train[17]"])
    assert str(e.value).startswith("task 'my_plugin', train[17]: a text segment is not valid Unicode")
    ex = MultimodalExample("my_plugin", (("text", "fine"),), "bad \ud800")
    with pytest.raises(ConfigError, match=r"task 'my_plugin', train\[3\]: the target is not valid Unicode"):
        collate([ex], [0], tok, 64, keys=["train[3]"])


def test_a_data_root_that_is_a_file_is_a_one_line_error(tmp_path):
    root = tmp_path / "pmm_data"
    root.write_text("not a folder")
    with pytest.raises(ConfigError) as e:
        load_split(Words(), "train", root, 0)
    assert "the data root (PMM_DATA or data.root) for the 'words_cache_test' cache" in str(e.value)
    assert f"{root} is a file, not a folder" in str(e.value)


def test_a_training_mixture_never_reads_a_shrunken_task(tmp_path, monkeypatch):
    """The issue's case: a text_arith cache cut at a line boundary made its mixture share fall from 0.361 to 0.034."""
    monkeypatch.setenv("PMM_DATA", str(tmp_path))
    cfg = load_config(DEBUG_CFG)
    load_tasks(cfg)
    path = split_path(get_task("text_arith"), "train", tmp_path, cfg.data.seed)
    path.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:100]))
    with pytest.raises(ConfigError, match=f"{path}: dataset cache is cut or altered"):
        load_tasks(cfg)


class Exploding(Words):
    """A plugin task whose code raises: in encode for every third sample, in build_dataset after five."""

    name = "exploding_test"

    def encode(self, sample):
        if sample["n"] % 3 == 2:
            raise RuntimeError(f"no codec for\nsample {sample['n']}")
        return super().encode(sample)


class ExplodingBuild(Words):
    name = "exploding_build_test"

    def build_dataset(self, split, root, seed):
        yield from self.samples[:5]
        raise ZeroDivisionError("division by zero")


def test_a_plugin_exception_in_encode_is_one_line_naming_task_split_and_index(tmp_path, monkeypatch):
    task = Exploding()
    assert encode(task, task.samples[0], "train[0]").target_text == "word0"
    with pytest.raises(ConfigError) as e:
        encode(task, task.samples[2], "train[2]")
    msg = str(e.value)
    assert msg.startswith("task 'exploding_test', train[2]: cannot encode sample") and len(msg.splitlines()) == 1
    assert "RuntimeError: no codec for sample 2" in msg and "PMM_TRACEBACK=1" in msg
    monkeypatch.setenv("PMM_TRACEBACK", "1")  # the task's own exception, with its traceback
    with pytest.raises(RuntimeError, match="no codec"):
        encode(task, task.samples[2], "train[2]")


def test_a_plugin_exception_while_building_a_batch_names_the_sample(tmp_path):
    cfg = load_config(DEBUG_CFG, ["train.micro_batch_size=8"])
    task = Exploding()
    ts = TaskSet(tasks=[task], train=[load_split(task, "train", tmp_path, 0)])
    sampler = make_sampler(cfg, ts, world=1)
    loaded = load_batch(cfg, ts, sampler, TOK, 0, 0, 0)
    first_bad = next(i for _, i in sampler.draw(8, 0, 0, 0) if i % 3 == 2)
    assert loaded.batch is None and loaded.error.startswith(f"task 'exploding_test', train[{first_bad}]: cannot")
    skipped = load_batch(
        dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, on_bad_sample="skip")), ts, sampler, TOK, 0, 0, 0
    )
    assert skipped.batch is not None and all("RuntimeError" in m for _, m in skipped.bad)
    assert len(skipped.bad) == sum(i % 3 == 2 for _, i in sampler.draw(8, 0, 0, 0))


def test_a_plugin_exception_in_build_dataset_is_one_line(tmp_path, monkeypatch):
    with pytest.raises(ConfigError) as e:
        load_split(ExplodingBuild(), "train", tmp_path, 0)
    assert str(e.value).startswith(
        "task 'exploding_build_test': build_dataset('train') failed at train[5] (ZeroDivisionError: division by zero)"
    )
    assert not list(tmp_path.rglob("*.jsonl"))  # nothing half-built left behind
    monkeypatch.setenv("PMM_TRACEBACK", "1")
    with pytest.raises(ZeroDivisionError):
        load_split(ExplodingBuild(), "train", tmp_path, 0)
