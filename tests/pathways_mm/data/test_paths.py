"""The one path rule (data/sources/paths.py), per source kind: a path the data names resolves,
symlinks followed, inside the data's folder or data.media_roots; anything else is refused, naming
the row, before the file is read."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import datasets
import pytest

from pathways_mm.config import USER_ONLY_KEYS, DeclaredTaskConfig, SourceConfig, from_checkpoint, load_config
from pathways_mm.data.datasets import encode
from pathways_mm.data.declared import declared_class
from pathways_mm.data.sources import BadSample, open_source
from pathways_mm.data.sources.base import DEFAULT_RULES, Row
from pathways_mm.data.sources.media import decode_image
from pathways_mm.errors import ConfigError

RATE = 16_000
OK, OUT = "ok", "leads outside"


def populate(base: Path, outside: Path) -> None:
    """In `base`: ok.png, in_link.png -> ok.png, out_link.png -> outside/x.png, linked_dir -> outside/."""
    shutil.copy(outside / "x.png", base / "ok.png")
    (base / "in_link.png").symlink_to("ok.png")
    (base / "out_link.png").symlink_to(outside / "x.png")
    (base / "linked_dir").symlink_to(outside, target_is_directory=True)


@pytest.fixture
def tree(examples, tmp_path):
    """data/ populated (see `populate`), and outside/x.png next to it."""
    data, outside = tmp_path / "data", tmp_path / "outside"
    data.mkdir()
    outside.mkdir()
    shutil.copy(examples / "images" / "train-0000.png", outside / "x.png")
    populate(data, outside)
    return data, outside


def cases(base: Path, outside: Path) -> list[tuple[str, str]]:
    """(a path as the data names it, relative to `base`; what the rule says)."""
    return [
        ("ok.png", OK),
        ("in_link.png", OK),  # a symlink that stays inside
        (os.path.relpath(outside / "x.png", base), OUT),  # ../
        (str(outside / "x.png"), OUT),  # absolute
        ("out_link.png", OUT),  # a symlink that leads out
        ("linked_dir/x.png", OUT),  # through a symlinked folder
        ("/etc/passwd", OUT),  # refused by the rule, not opened and then found not to be an image
        ("../../../../../../etc/passwd", OUT),
    ]


def write_jsonl(data: Path, values: list[str]) -> Path:
    path = data / "m.jsonl"
    path.write_text("".join(json.dumps({"image": v, "t": "1"}) + "\n" for v in values))
    return path


def write_csv(data: Path, values: list[str]) -> Path:
    path = data / "m.csv"
    path.write_text("image,t\n" + "".join(f"{v},1\n" for v in values))
    return path


def write_parquet(data: Path, values: list[str]) -> Path:
    path = data / "m.parquet"
    datasets.Dataset.from_dict({"image": values, "t": ["1"] * len(values)}).to_parquet(str(path))
    return path


def write_hf(data: Path, values: list[str]) -> Path:
    datasets.disable_progress_bars()
    datasets.Dataset.from_dict({"image": values, "t": ["1"] * len(values)}).save_to_disk(str(data / "hf"))
    return data / "hf"


# kind -> (writer, the folder its media paths are relative to and must stay in)
WRITERS = {
    "jsonl": (write_jsonl, "."),
    "csv": (write_csv, "."),
    "parquet": (write_parquet, "."),
    "hf": (write_hf, "hf"),
}


def task_on(path: Path, fmt: str, tmp_path: Path, rules=DEFAULT_RULES):
    spec = DeclaredTaskConfig(
        inputs={"image": "image"}, target="t", splits={"train": SourceConfig(path=str(path), format=fmt)}
    )
    task = declared_class(f"paths_{fmt}", spec, RATE, rules)()
    return task, task.open_split("train", tmp_path / "cache")


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_media_paths_stay_inside_the_data_folder(tree, tmp_path, fmt):
    data, outside = tree
    write, folder = WRITERS[fmt]
    base = (data / folder).resolve() if folder == "." else data / folder
    table = cases(base, outside)
    path = write(data, [v for v, _ in table])
    if folder != ".":
        populate(base, outside)
    task, src = task_on(path, fmt, tmp_path)
    for i, (value, want) in enumerate(table):
        if want == OK:
            assert encode(task, src[i]).segments[0][1].shape == (28, 28), value
            continue
        with pytest.raises(BadSample) as e:
            encode(task, src[i])
        msg = str(e.value)
        assert OUT in msg and "not an image" not in msg, (value, msg)
        assert msg.startswith(src[i].where), msg  # names the manifest line or row


def test_through_a_symlinked_data_folder_is_inside(tree, tmp_path):
    """The manifest's own folder reached through a symlink: its files are still inside it."""
    data, _ = tree
    (tmp_path / "data_link").symlink_to(data, target_is_directory=True)
    path = write_jsonl(data, ["ok.png", "in_link.png", "out_link.png"])
    task, src = task_on(tmp_path / "data_link" / path.name, "jsonl", tmp_path)
    assert encode(task, src[0]).segments[0][1].shape == (28, 28)
    assert encode(task, src[1]).segments[0][1].shape == (28, 28)
    with pytest.raises(BadSample, match=OUT):
        encode(task, src[2])


def test_media_roots_allow_folders_the_user_names(tree, tmp_path):
    data, outside = tree
    path = write_jsonl(data, ["../outside/x.png", "linked_dir/x.png", "out_link.png", "/etc/passwd"])
    rules = dataclasses.replace(DEFAULT_RULES, roots=(outside,))
    task, src = task_on(path, "jsonl", tmp_path, rules)
    for i in range(3):
        assert encode(task, src[i]).segments[0][1].shape == (28, 28)
    with pytest.raises(BadSample, match=rf"leads outside the data folder .* or data.media_roots \['{outside}'\]"):
        encode(task, src[3])


def test_a_hugging_face_feature_path_follows_the_rule(tree):
    data, outside = tree
    row = Row({"image": {"bytes": None, "path": "../outside/x.png"}}, data, lambda: "hf row 3")
    with pytest.raises(BadSample, match=r"^hf row 3: image path '../outside/x.png' leads outside"):
        decode_image(row, "image")
    row = Row({"image": {"bytes": None, "path": "in_link.png"}}, data, lambda: "hf row 4")
    assert decode_image(row, "image").shape == (28, 28)


def test_a_nul_byte_is_a_bad_sample(tree):
    data, _ = tree
    with pytest.raises(BadSample, match="is not a file name"):
        decode_image(Row({"image": "ok\x00.png"}, data, lambda: "m.jsonl line 1"), "image")


def tar_of(path: Path, png: bytes) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, body in (("k0.png", png), ("k0.txt", b"1")):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tf.addfile(info, io.BytesIO(body))
    return path


def test_shard_paths_stay_inside_the_pattern_folder(tree, tmp_path):
    data, outside = tree
    png = (data / "ok.png").read_bytes()
    shards = data / "shards"
    shards.mkdir()
    tar_of(shards / "s-0.tar", png)
    tar_of(outside / "far.tar", png)
    (shards / "s-1.tar").symlink_to("s-0.tar")  # in: allowed
    (shards / "s-2.tar").symlink_to(outside / "far.tar")  # out
    (shards / "sub").symlink_to(outside, target_is_directory=True)
    fields, cache = ["png", "txt"], tmp_path / "cache"
    src = open_source(SourceConfig(path=str(shards / "s-{0..1}.tar")), fields, "train", cache)
    assert len(src) == 2
    refused = [  # (an absolute shard path inside braces is not one: it lands under the pattern's folder)
        "s-{0..2}.tar",  # a symlink out
        "{s-0,../../outside/far}.tar",  # ..
        "{s-0,sub/far}.tar",  # through a symlinked folder
    ]
    for pattern in refused:
        with pytest.raises(ConfigError, match=r"WebDataset shard .* leads outside the data folder"):
            open_source(SourceConfig(path=str(shards / pattern)), fields, "train", cache)
    rules = dataclasses.replace(DEFAULT_RULES, roots=(outside,))
    src = open_source(SourceConfig(path=str(shards / "s-{0..2}.tar")), fields, "train", cache, rules)
    assert len(src) == 3


def test_parquet_folder_files_stay_inside(tree, tmp_path):
    data, outside = tree
    folder = data / "pq"
    folder.mkdir()
    table = datasets.Dataset.from_dict({"image": ["../ok.png"], "t": ["1"]})
    table.to_parquet(str(folder / "a.parquet"))
    (folder / "b.parquet").symlink_to("a.parquet")  # in: allowed
    src = open_source(SourceConfig(path=str(folder)), ["image", "t"], "train", tmp_path / "c1")
    assert len(src) == 2
    table.to_parquet(str(outside / "far.parquet"))
    (folder / "c.parquet").symlink_to(outside / "far.parquet")
    with pytest.raises(ConfigError, match=r"parquet file .*c.parquet leads outside the data folder"):
        open_source(SourceConfig(path=str(folder)), ["image", "t"], "train", tmp_path / "c2")


def test_saved_dataset_files_stay_inside(tree, tmp_path):
    data, outside = tree
    folder = data / "hf"
    datasets.disable_progress_bars()
    datasets.Dataset.from_dict({"image": ["ok.png"], "t": ["1"]}).save_to_disk(str(folder))
    assert len(open_source(SourceConfig(path=str(folder), format="hf"), ["t"], "train", tmp_path)) == 1
    arrow = next(folder.glob("*.arrow"))
    shutil.move(arrow, outside / arrow.name)
    (folder / arrow.name).symlink_to(outside / arrow.name)  # the data file is a symlink out
    with pytest.raises(ConfigError, match=r"Hugging Face dataset file .* leads outside"):
        open_source(SourceConfig(path=str(folder), format="hf"), ["t"], "train", tmp_path)
    (folder / arrow.name).unlink()
    state = json.loads((folder / "state.json").read_text())
    state["_data_files"] = [{"filename": f"../../outside/{arrow.name}"}]  # state.json names a file outside
    (folder / "state.json").write_text(json.dumps(state))
    with pytest.raises(ConfigError, match=r"Hugging Face dataset file .* leads outside"):
        open_source(SourceConfig(path=str(folder), format="hf"), ["t"], "train", tmp_path)


def test_media_roots_come_from_the_users_config_only(tmp_path):
    (tmp_path / "exp.yaml").write_text("tasks: [text_lm]\ndata: {media_roots: [media, /srv/shared]}\n")
    cfg = load_config(tmp_path / "exp.yaml")
    assert cfg.data.media_roots == (str(tmp_path / "media"), "/srv/shared")  # relative to the experiment file
    assert "data.media_roots" in USER_ONLY_KEYS
    assert "media_roots" not in from_checkpoint({"data": {"media_roots": ["/"], "max_len": 9}})["data"]
    with pytest.raises(ConfigError, match="data.media_roots"):
        load_config(tmp_path / "exp.yaml", ["data.media_roots=['']"])
    assert os.path.isabs(load_config(tmp_path / "exp.yaml", ["data.media_roots=[rel]"]).data.media_roots[0])
