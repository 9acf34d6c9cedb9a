"""Files: atomic writes with ordinary permissions, output paths checked up front, strict YAML and JSON."""

import errno
import os
import re
import stat
import time

import numpy as np
import pytest

from pathways_mm import io
from pathways_mm.errors import ConfigError
from pathways_mm.io import atomic_write_text, describe_os_error, load_json, load_yaml, output_dir, output_file
from pathways_mm.tasks import digits


def test_atomic_files_get_the_umask_permissions_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        digits._write_npz(tmp_path / "b.npz", {"x": np.arange(3)})
    finally:
        os.umask(old)
    for name in ("a.json", "b.npz"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_npz_banks_are_synced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(io.os, "fsync", lambda fd: (events.append(("fsync", os.fstat(fd).st_size)), real_fsync(fd)))
    monkeypatch.setattr(io.os, "replace", lambda a, b: (events.append(("replace", b)), real_replace(a, b)))
    path = tmp_path / "bank.npz"
    digits._write_npz(path, {"x": np.arange(1000)})
    assert [e[0] for e in events] == ["fsync", "replace"]
    assert events[0][1] == path.stat().st_size  # the whole zip, central directory included, was synced


def test_a_failed_write_names_the_file_and_leaves_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    path.write_text("old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", full)
    with pytest.raises(OSError) as e:
        atomic_write_text(path, "new")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.json"]
    assert describe_os_error(e.value) == (
        f"no room to write {path} (No space left on device): free disk space (or raise the quota) and run again"
    )


@pytest.mark.parametrize(
    "make,check,message",
    [
        (lambda p: p.mkdir(), output_file, "is a folder; give a file path"),
        (lambda p: p.parent.joinpath("f").write_text(""), None, "is a file, not a folder"),
        (lambda p: p.write_text(""), output_dir, "is a file, not a folder; choose a folder"),
        (lambda p: (p.mkdir(), (p / "x").write_text("")), "empty", "exists and is not empty"),
    ],
)
def test_output_paths_are_refused_before_any_work(tmp_path, make, check, message):
    target = tmp_path / "out"
    make(target)
    if check is None:  # a file where a parent folder should be
        target = tmp_path / "f" / "sub" / "report.json"
        check = output_file
    with pytest.raises(ConfigError, match=message):
        if check == "empty":
            output_dir(target, "--out", empty=True)
        else:
            check(target, "--out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_folder_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="cannot write in"):
            output_file(ro / "x.json", "--out")
    finally:
        ro.chmod(0o700)


def test_numbers_people_write_parse_as_numbers():
    data = load_yaml("lr: 1e-3\nb: 3.0e-3\nc: -2E5\nd: .5e1\nsteps: 10\nname: 1e3x\n", "x.yaml")
    assert data == {"lr": 0.001, "b": 0.003, "c": -200000.0, "d": 5.0, "steps": 10, "name": "1e3x"}
    assert isinstance(data["steps"], int)


@pytest.mark.parametrize(
    "text,message",
    [
        ("train: {steps: 3}\ntrain: {steps: 4}\n", "key 'train' appears twice (also on line 1); keep one (line 2"),
        ("a: {x: 1, x: 2}\n", "key 'x' appears twice"),
        ("a: &a [*a]\n", "an alias refers to a value that contains it"),
        ("[" * 5000 + "]" * 5000, "nested too deeply"),
        ("x: !!python/object/apply:os.system ['true']\n", "could not determine a constructor"),
        ("x: " + "9" * 5000 + "\n", "not valid YAML"),
    ],
)
def test_yaml_the_loader_refuses(text, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_yaml(text, "x.yaml")


def test_an_alias_bomb_is_refused_at_once_in_one_short_line():
    bomb = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        bomb += f"{name}: &{name} [{','.join(['*' + prev] * 9)}]\n"
    assert len(bomb) < 400
    t0 = time.process_time()
    with pytest.raises(ConfigError) as e:
        load_yaml(bomb, "bomb.yaml")
    assert time.process_time() - t0 < 5  # a bound, not a timing: the expansion is never built
    assert "expands to more than 10000 values" in str(e.value) and len(str(e.value)) < 300


@pytest.mark.parametrize(
    "text,message",
    [
        ('{"a": 1, "a": 2}', "key 'a' appears twice"),
        ('{"a": NaN}', "NaN is not a JSON number"),
        ('{"a": Infinity}', "Infinity is not a JSON number"),
        ("[" * 100_000 + "]" * 100_000, "RecursionError"),
        ("\xff\xfe", "UnicodeDecodeError"),
    ],
)
def test_json_the_loader_refuses(tmp_path, text, message):
    path = tmp_path / "m.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigError, match=message) as e:
        load_json(path, "checkpoint metadata")
    assert str(e.value).startswith(f"{path}: unreadable checkpoint metadata")
