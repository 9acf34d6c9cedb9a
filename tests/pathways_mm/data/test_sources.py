"""Declared tasks read real files in every source format; bad rows are named by file and line or key."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pathways_mm.config import DeclaredTaskConfig, ExperimentConfig, SourceConfig, load_config
from pathways_mm.data.datasets import encode, load_split
from pathways_mm.data.declared import declared_class
from pathways_mm.data.sources import BadSample, open_source
from pathways_mm.data.sources.manifest import JsonlSource
from pathways_mm.data.taskset import resolve_tasks
from pathways_mm.encoders.audio import Audio
from pathways_mm.errors import ConfigError
from pathways_mm.tasks import list_tasks
from pathways_mm.tasks.corpus import number_words
from tests.helpers import EXAMPLE_SIZES as SIZES

RATE = 16_000


@pytest.fixture(scope="module")
def cfg(examples) -> ExperimentConfig:
    return load_config(examples / "experiment.yaml")


@pytest.fixture(scope="module")
def tasks(cfg):
    return {t.name: t for t in resolve_tasks(cfg)}


def rows(task, split, data_dir):
    src = load_split(task, split, data_dir, 0)
    return [encode(task, src[i]) for i in range(len(src))]


@pytest.mark.parametrize(
    "name,kind,modalities",
    [
        ("seen_digit", "jsonl", ("image", "text")),
        ("heard_digit", "csv", ("audio",)),
        ("same_digit", "webdataset", ("image", "audio", "text")),
        ("hf_digit", "hf", ("image",)),
        ("parquet_sum", "parquet", ("audio", "text")),
    ],
)
def test_every_format_reads_every_row(tasks, data_dir, name, kind, modalities):
    task = tasks[name]
    for split, n in SIZES.items():
        src = load_split(task, split, data_dir, 0)
        assert src.kind == kind and len(src) == n
        for ex in rows(task, split, data_dir):
            assert tuple(m for m, _ in ex.segments) == modalities
            for modality, raw in ex.segments:
                if modality == "image":
                    assert raw.dtype == np.uint8 and raw.shape == (28, 28) and raw.max() > 100  # ink survives PNG
                if modality == "audio":  # WAV at 16 kHz as is; FLAC at 22.05 kHz resampled to the model's rate
                    assert isinstance(raw, Audio) and raw.sample_rate == RATE
                    assert abs(len(raw.samples) - RATE) <= 2 and 0.01 < np.abs(raw.samples).max() <= 1.0
            assert ex.target_text


def test_formats_agree_on_the_same_rows(tasks, data_dir):
    """Row i of every format came from the same image and clip: the answers line up."""
    words = [ex.target_text for ex in rows(tasks["seen_digit"], "train", data_dir)]
    labels = [ex.target_text for ex in rows(tasks["hf_digit"], "train", data_dir)]  # ClassLabel -> its name
    assert words == labels and set(words) <= {number_words(d) for d in range(10)}
    heard = [int(ex.target_text) for ex in rows(tasks["heard_digit"], "train", data_dir)]
    same = [ex.target_text for ex in rows(tasks["same_digit"], "train", data_dir)]
    seen = [[number_words(d) for d in range(10)].index(w) for w in words]
    assert same == ["yes" if s == h else "no" for s, h in zip(seen, heard)]
    sums = [int(ex.target_text) for ex in rows(tasks["parquet_sum"], "train", data_dir)]
    assert sums == [s + h for s, h in zip(seen, heard)]
    image_jsonl = rows(tasks["seen_digit"], "train", data_dir)[3].segments[0][1]
    image_hf = rows(tasks["hf_digit"], "train", data_dir)[3].segments[0][1]
    assert np.array_equal(image_jsonl, image_hf)


def test_declared_tasks_register_with_their_source(cfg, tasks):
    sources = {i.name: i.source for i in list_tasks()}
    assert sources["seen_digit"].startswith(f"declared in {cfg.source} (jsonl ")
    assert "webdataset" in sources["same_digit"] and "{000..001}.tar" in sources["same_digit"]
    assert tasks["parquet_sum"].modalities == ("audio", "text")
    again = resolve_tasks(cfg)  # declaring the same config again is a no-op, not a duplicate
    assert type(again[0]) is type(tasks["seen_digit"])


def manifest(tmp_path, lines: list[str], name="m.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("".join(lines))
    return p


def test_jsonl_index_skips_blank_lines_and_reads_a_last_line_without_newline(tmp_path):
    p = manifest(tmp_path, ['{"a": "1"}\n', "\n", "\r\n", '{"a": "2"}\r\n', "\n", '{"a": "3"}'])
    src = JsonlSource(p, ["a"])
    assert [src[i].fields["a"] for i in range(len(src))] == ["1", "2", "3"]
    assert src.index_bytes() == 8 * 4  # one offset per row and the end: the index is all it holds
    assert [r.fields["a"] for r in src[1:]] == ["2", "3"]


def image_task(tmp_path, lines, name="m.jsonl", fmt=None, inputs=None, target="t"):
    p = manifest(tmp_path, lines, name)
    spec = DeclaredTaskConfig(
        inputs=inputs or {"image": "image"}, target=target, splits={"train": SourceConfig(path=str(p), format=fmt)}
    )
    task = declared_class("scratch_declared", spec, RATE)()
    return task, task.open_split("train", tmp_path)


def write_png(examples, tmp_path, name="ok.png"):
    shutil.copy(examples / "images" / "train-0000.png", tmp_path / name)
    return name


@pytest.mark.parametrize(
    "line,match",
    [
        ('{"image": "ok.png", "t": "1"\n', r"m.jsonl line 2: malformed JSON line"),
        ('["ok.png"]\n', r"m.jsonl line 2: expected a JSON object"),
        ('{"image": "ok.png"}\n', r"m.jsonl line 2: no field 't'"),
        ('{"image": "gone.png", "t": "1"}\n', r"m.jsonl line 2: image file not found: .*gone.png"),
        ('{"image": "junk.png", "t": "1"}\n', r"junk.png: not an image Pillow can read"),
        ('{"image": 7, "t": "1"}\n', r"m.jsonl line 2: field 'image' holds int; expected a path"),
    ],
)
def test_bad_jsonl_rows_name_the_file_and_line(examples, tmp_path, line, match):
    write_png(examples, tmp_path)
    (tmp_path / "junk.png").write_bytes(b"not a png at all")
    task, src = image_task(tmp_path, ['{"image": "ok.png", "t": "1"}\n', line])
    encode(task, src[0])  # the good row
    with pytest.raises(BadSample, match=match):
        encode(task, src[1])


def test_a_file_that_is_not_audio_is_named(examples, tmp_path):
    (tmp_path / "clip.wav").write_text("RIFF? no, just text")
    task, src = image_task(tmp_path, ['{"a": "clip.wav", "t": "1"}\n'], inputs={"a": "audio"})
    with pytest.raises(BadSample, match=r"clip.wav: not an audio file libsndfile can read"):
        encode(task, src[0])


def test_bad_csv_rows_name_the_line(examples, tmp_path):
    write_png(examples, tmp_path)
    lines = ["image,t\n", "ok.png,1\n", 'ok.png,"two\nlines"\n', "ok.png\n", "ok.png,3\n"]
    task, src = image_task(tmp_path, lines, name="m.csv")
    assert len(src) == 4  # a quoted field may span lines: still one row
    assert encode(task, src[1]).target_text == "two\nlines"
    with pytest.raises(BadSample, match=r"m.csv line 5: 1 fields where the header has 2"):
        encode(task, src[2])
    assert encode(task, src[3]).target_text == "3"


def test_csv_without_the_declared_column_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"no column 't' in the header \['image', 'x'\]"):
        image_task(tmp_path, ["image,x\n", "a.png,1\n"], name="m.csv")


def shard(tmp_path, members: dict[str, bytes], name="s-000.tar") -> Path:
    path = tmp_path / name
    with tarfile.open(path, "w") as tf:
        for member, data in members.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_bad_shard_members_name_the_shard_and_key(examples, tmp_path):
    png = (examples / "images" / "train-0000.png").read_bytes()
    path = shard(
        tmp_path,
        {"k0.png": png, "k0.txt": b"7\n", "k1.png": b"garbage", "k1.txt": b"8", "k2.txt": b"9"},
    )
    spec = DeclaredTaskConfig(inputs={"png": "image"}, target="txt", splits={"train": SourceConfig(path=str(path))})
    task = declared_class("scratch_wds", spec, RATE)()
    src = task.open_split("train", tmp_path)
    assert len(src) == 3
    assert encode(task, src[0]).target_text == "7"  # "7\n": text members are stripped
    with pytest.raises(BadSample, match=r"s-000.tar key k1 field 'png': not an image Pillow can read"):
        encode(task, src[1])
    with pytest.raises(BadSample, match=r"s-000.tar key k2: the sample has no .png member"):
        src[2]


def test_a_truncated_shard_keeps_the_samples_before_the_damage(examples, tmp_path):
    png = (examples / "images" / "train-0000.png").read_bytes()
    members = {f"k{i}.{ext}": data for i in range(4) for ext, data in (("png", png), ("txt", b"1"))}
    path = shard(tmp_path, members)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])
    src = open_source(SourceConfig(path=str(path)), ["png", "txt"], "train", tmp_path)
    assert src.damage and str(path) in src.damage[0]
    assert 1 <= len(src) < 4
    assert src[0].fields["txt"] == b"1"
    with pytest.raises(BadSample, match=r"s-000.tar key k2: the sample has no .txt member"):
        src[len(src) - 1]  # its txt member was cut off


def test_shards_must_be_local_and_exist(tmp_path):
    with pytest.raises(ConfigError, match="only local shard files"):
        open_source(SourceConfig(path="https://example.com/s-{0..3}.tar"), ["png"], "train", tmp_path)
    with pytest.raises(ConfigError, match=r"shard not found: .*s-0.tar \(2 of 2 missing\)"):
        open_source(SourceConfig(path=str(tmp_path / "s-{0..1}.tar")), ["png"], "train", tmp_path)


def test_unknown_suffix_asks_for_a_format(tmp_path):
    (tmp_path / "data.txt").write_text("x\n")
    with pytest.raises(ConfigError, match="set format:"):
        open_source(SourceConfig(path=str(tmp_path / "data.txt")), ["x"], "train", tmp_path)


def test_hf_dataset_without_the_column_lists_the_columns(examples, tmp_path):
    with pytest.raises(ConfigError, match=r"no column 'caption' \(columns: \['image', 'label'\]\)"):
        open_source(SourceConfig(path=str(examples / "hf"), split="train"), ["caption"], "train", tmp_path)
    with pytest.raises(ConfigError, match=r"no split 'dev'"):
        open_source(SourceConfig(path=str(examples / "hf")), ["image"], "dev", tmp_path)


def test_manifest_paths_are_relative_to_the_experiment_file(examples, tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    text = (examples / "experiment.yaml").read_text()
    (other / "exp.yaml").write_text(text.replace("path: train.jsonl", f"path: {examples}/train.jsonl"))
    cfg = load_config(other / "exp.yaml")
    assert cfg.declare["seen_digit"].splits["train"].path == f"{examples}/train.jsonl"
    assert cfg.declare["heard_digit"].splits["train"].path == str(other / "train.csv")  # relative: next to exp.yaml
