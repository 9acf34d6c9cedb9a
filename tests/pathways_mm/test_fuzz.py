"""Malformed input — random bytes, wrong types, huge values — gives clean ConfigErrors only:
never another exception, a hang or a partial file. Seeded, a few hundred cases, a few seconds.

Covered: configs and YAML, numeric edge values of every ranged key and flag, fault specs, dataset
caches (random bytes, every truncation, tampered records, media banks), samples, checkpoint
metadata and manifests (tampered values and tampered JSON), routes files, output paths and the
file-system errors of writing; declared tasks' media paths (.., absolute, symlinks), media past
their limits (image and audio headers), targets longer than data.max_len, and exceptions of a
plugin's own code in encode and build_dataset.
"""

import errno
import io as stdio
import json
import os
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from pathways_mm import io, routes_file
from pathways_mm.config import RANGES, check_range, config_from_dict, load_config, parse_overrides, to_dict
from pathways_mm.data.collate import collate
from pathways_mm.data.datasets import encode, load_split, record_path, split_path
from pathways_mm.data.sources import BadSample
from pathways_mm.data.sources.base import DEFAULT_RULES, Row
from pathways_mm.data.sources.media import decode_audio, decode_image
from pathways_mm.encoders.text import load_tokenizer
from pathways_mm.errors import ConfigError
from pathways_mm.runtime import checkpoint as ckpt
from pathways_mm.runtime import faults
from pathways_mm.runtime.checkpoint import check_compatible
from pathways_mm.tasks import MultimodalExample, Task, get_task
from pathways_mm.tasks.digits import cached_bank
from pathways_mm.viz import views
from tests.helpers import BEFORE, DEBUG_CFG, make_doc, run_cli, sets

HUGE = [10**30, -(10**30), 2**63, 2**63 - 1, 1e308, 1e-308, float("inf"), float("-inf"), float("nan"), -1, 0]
HUGER = [*HUGE, 10**5000]  # past Python's 4300-digit limit for str(): echoing it must not crash


def junk(rng: random.Random, depth: int = 0):
    """A random JSON/YAML-like value: wrong types, huge numbers, odd strings, nested containers."""
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return rng.choice(HUGE)
    if kind == 1:
        return rng.choice([None, True, False, "", "\x00", "é" * 3, "../../etc", "a" * 10_000])
    if kind == 2:
        return rng.randint(-5, 5)
    if kind == 3:
        return rng.random() * rng.choice([1, 1e6])
    if kind == 4:
        return bytes(rng.randrange(256) for _ in range(8)).decode("latin-1")
    if kind == 5:
        return rng.choice(["text_lm", "grouped", "example", "debug"])
    if kind == 6:
        return [junk(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["x", "steps", "moe", "text", "prompt", "target"]): junk(rng, depth + 1) for _ in range(3)}


def mutate(rng: random.Random, node, depth=0):
    """The default config with a few leaves replaced by junk (so deep keys get reached)."""
    if isinstance(node, dict) and node and depth < 3:
        node = dict(node)
        key = rng.choice(list(node))
        node[key] = mutate(rng, node[key], depth + 1) if rng.random() < 0.6 else junk(rng)
        return node
    return junk(rng)


def clean(fn, *args, **kwargs):
    """Run fn; it may succeed or raise ConfigError with a one-line message, nothing else."""
    try:
        return fn(*args, **kwargs)
    except ConfigError as e:
        assert str(e) and len(str(e).splitlines()) == 1, repr(e)
        return None


def test_configs(tmp_path):
    rng = random.Random(0)
    base = to_dict(load_config(DEBUG_CFG))
    for _ in range(300):
        data = mutate(rng, base)
        data.pop("source", None)
        clean(config_from_dict, data)
    for i in range(40):
        p = tmp_path / f"c{i}.yaml"
        p.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(200))))
        clean(load_config, p, [f"train.steps={rng.choice(['1e999', '[', '{a: 1}', '-1'])}"])


def test_fault_specs():
    rng = random.Random(1)
    alphabet = "kill:hang_nan=step,rank=1x:;"
    for _ in range(300):
        clean(faults.parse, "".join(rng.choice(alphabet) for _ in range(rng.randrange(30))))


class Broken(Task):
    name, modalities, metrics = "broken_fuzz", ("text",), ("loss",)

    def build_dataset(self, split, root, seed):
        yield {"prompt": "a", "target": "b"}
        raise RuntimeError("dataset source went away")


def test_dataset_cache_is_atomic_and_checked(tmp_path):
    task = Broken()
    with pytest.raises(ConfigError, match=r"task 'broken_fuzz': build_dataset\('train'\) failed at train\[1\]"):
        load_split(task, "train", tmp_path, 0)
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []  # nothing half-built left behind
    lm = get_task("text_lm")
    path = split_path(lm, "train", tmp_path, 0)
    path.parent.mkdir(parents=True)
    rng = random.Random(2)
    for _ in range(30):
        path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))) + b"\n{")
        clean(load_split, lm, "train", tmp_path, 0)


@pytest.mark.parametrize("task_name", ["text_lm", "text_arith"])
def test_samples(task_name):
    rng = random.Random(3)
    task, tok = get_task(task_name), load_tokenizer()
    for i in range(200):
        ex = clean(encode, task, junk(rng) if i % 20 else {"prompt": 10**5000, "text": [10**5000]})
        if ex is not None:
            clean(collate, [ex], [0], tok, rng.choice([2, 8, 96]))


def test_media_segments():
    """Random shapes, dtypes and values as images and audio: ConfigErrors naming the task, nothing else."""
    import numpy as np

    from pathways_mm.config import ModelConfig
    from pathways_mm.encoders.audio import Audio
    from pathways_mm.tasks import MultimodalExample

    rng = np.random.default_rng(5)
    tok, cfg = load_tokenizer(), ModelConfig(max_seq_len=512)
    dtypes = (np.uint8, np.int16, np.int64, np.float32, np.float64, np.bool_)
    for _ in range(150):
        shape = tuple(int(n) for n in rng.integers(0, 70, size=rng.integers(0, 4)))
        with np.errstate(invalid="ignore", over="ignore"):  # huge floats cast to ints are part of the junk
            arr = (rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 30)).astype(rng.choice(dtypes))
        if rng.random() < 0.5:
            seg = ("image", arr)
        else:
            seg = ("audio", Audio(arr.reshape(-1) if rng.random() < 0.7 else arr, int(rng.choice([0, 8000, 16000]))))
        ex = MultimodalExample("fuzz", (seg,), "x")
        clean(collate, [ex], [0], tok, 512, model_cfg=cfg, rng=np.random.default_rng(0))


def test_checkpoint_meta_and_manifest(tmp_path):
    rng = random.Random(4)
    cfg, tok = load_config(DEBUG_CFG), load_tokenizer()
    good = {
        "step": 3,
        "config": to_dict(cfg),
        "task_table": {"text_lm": 0, "text_arith": 1},
        "tokenizer_hash": tok.hash,
    }
    for i in range(200):
        tag = tmp_path / f"t{i}"
        tag.mkdir()
        raw = json.dumps(mutate(rng, good)) if i % 3 else bytes(rng.randrange(256) for _ in range(50)).decode("latin-1")
        (tag / ckpt.META_FILE).write_text(raw)
        meta = clean(ckpt.read_meta, tag)
        if meta is not None:
            clean(check_compatible, meta, cfg, tok, str(tag / ckpt.META_FILE))
        (tag / ckpt.MANIFEST).write_text(json.dumps({"files": mutate(rng, {"a.pt": {"sha256": "0", "bytes": 1}})}))
        assert clean(ckpt.verify, tag) != []  # never "intact": the files it names do not exist


@pytest.mark.parametrize("seed", range(3))
def test_cli_shows_one_line_not_a_traceback(seed, tmp_path, data_dir):
    rng = random.Random(seed)
    cfg = tmp_path / "fuzz.yaml"
    cfg.write_bytes(DEBUG_CFG.read_bytes() + b"\n" + bytes(rng.randrange(32, 127) for _ in range(40)))
    key = rng.choice(["train.steps", "model.d_model", "mixture.temperature", "data.max_len", "model.moe.num_experts"])
    res = run_cli(
        ["train", cfg, *sets(f"{key}={rng.choice(['.nan', '-7', '1e999', '[1]', 'x'])}")], data_dir, timeout=120
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert len([line for line in res.stderr.splitlines() if line.startswith("pathways-mm: error:")]) == 1


def test_numeric_edge_values_of_every_ranged_key():
    """Each key of the range table at its edges and far past them: refused in one line, or inside its range."""
    base = to_dict(load_config(DEBUG_CFG))
    base.pop("source")
    for key, (lo, hi) in RANGES.items():
        for value in [*HUGER, lo, hi, lo - 1, hi + 1, lo + 0.5, True]:
            data = json.loads(json.dumps(base))
            *parents, last = key.split(".")
            node = data
            for part in parents:
                node = node[part]
            node[last] = value
            cfg = clean(config_from_dict, data)
            if cfg is not None:
                got = cfg
                for part in key.split("."):
                    got = getattr(got, part)
                assert got is None or lo <= got <= hi, (key, value)
    for key in ("eval.max_samples", "train.steps", "continual.grow_experts", "continual.adapter_rank"):
        for value in [*HUGER, -1, 0, 1]:
            if not isinstance(value, float) or value == value:  # flags are integers (argparse's type=int)
                clean(check_range, key, value, "--flag")


def test_yaml_documents_and_overrides():
    rng = random.Random(6)
    pieces = [
        "a:",
        " ",
        "\n",
        "&x",
        "*x",
        "[",
        "]",
        "{",
        "}",
        ",",
        "- ",
        "1e-3",
        "<<:",
        "!!str",
        "'",
        '"',
        "? ",
        "|",
        "#",
    ]
    for _ in range(400):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(40)))
        clean(io.load_yaml, text, "fuzz.yaml")
        clean(parse_overrides, [f"train.lr={text}"])


def _write_tree(rng, root):
    """Random files and folders along a random path under root; returns that path or one below it."""
    path = root
    for _ in range(rng.randrange(1, 4)):
        path = path / rng.choice(["a", "b", "c"])
        if path.exists() or not path.parent.is_dir():
            continue
        kind = rng.random()
        if kind < 0.3:
            path.write_text("x")
        elif kind < 0.6:
            path.mkdir()
    return path / "f.json" if rng.random() < 0.5 else path


def test_output_paths(tmp_path):
    rng = random.Random(7)
    for i in range(200):
        root = tmp_path / str(i)
        root.mkdir()
        target = _write_tree(rng, root)
        for check in (io.output_file, lambda p, w: io.output_dir(p, w, empty=rng.random() < 0.5)):
            ok = clean(check, target, "--out")
            if ok is not None and check is io.output_file:  # a path that passed the check can be written
                ok.parent.mkdir(parents=True, exist_ok=True)
                io.atomic_write_text(ok, "report")


def test_file_system_errors_of_writing(tmp_path, monkeypatch):
    """Whatever errno the disk answers with, the write names its file, leaves the old one and no
    temporary file, and the user reads one line."""
    path = tmp_path / "report.json"
    path.write_text("old")
    real = os.fsync
    for code in sorted(errno.errorcode):
        monkeypatch.setattr(
            io.os, "fsync", lambda fd, code=code: (_ for _ in ()).throw(OSError(code, os.strerror(code)))
        )
        with pytest.raises(OSError) as e:
            io.atomic_write_text(path, "new")
        assert e.value.errno == code and e.value.filename == str(path)
        message = io.describe_os_error(e.value)
        assert str(path) in message and len(message.splitlines()) == 1
        assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    monkeypatch.setattr(io.os, "fsync", real)


def test_truncated_and_tampered_caches(tmp_path):
    lm = get_task("text_arith")
    load_split(lm, "test", tmp_path, 0)
    path = split_path(lm, "test", tmp_path, 0)
    whole, record = path.read_bytes(), record_path(path).read_bytes()
    rng = random.Random(8)
    cuts = sorted({0, 1, len(whole) - 1} | {rng.randrange(len(whole)) for _ in range(40)})
    cuts += [i + 1 for i, b in enumerate(whole) if b == ord("\n")][:: max(1, whole.count(b"\n") // 20)]
    for cut in cuts:  # anywhere, line boundaries included
        path.write_bytes(whole[:cut])
        with pytest.raises(ConfigError, match="dataset cache is cut or altered"):
            load_split(lm, "test", tmp_path, 0)
    path.write_bytes(whole)
    for _ in range(60):  # a tampered record: never read as valid unless it is the true one
        data = mutate(rng, json.loads(record)) if rng.random() < 0.7 else junk(rng)
        record_path(path).write_text(json.dumps(data) if rng.random() < 0.8 else str(data)[:50])
        samples = clean(load_split, lm, "test", tmp_path, 0)
        if samples is not None:
            assert json.loads(record_path(path).read_text())["sha256"] == json.loads(record)["sha256"]
    bank = tmp_path / "banks" / "fuzz.npz"
    arrays = {"x": np.arange(5000, dtype=np.int64), "y": np.ones((30, 30), np.uint8)}
    cached_bank(bank, ("x", "y"), lambda: arrays)
    whole = bank.read_bytes()
    for cut in sorted({rng.randrange(len(whole)) for _ in range(40)}):
        bank.write_bytes(whole[:cut])
        with pytest.raises(ConfigError, match=f"dataset cache file {bank} is unreadable"):
            cached_bank(bank, ("x", "y"), lambda: arrays)
    data_at = whole.index(np.arange(5000, dtype=np.int64).tobytes()[:64])
    for _ in range(20):  # a flipped byte inside the stored arrays fails their CRC
        flipped = bytearray(whole)
        flipped[data_at + rng.randrange(5000 * 8)] ^= 0xFF
        bank.write_bytes(bytes(flipped))
        with pytest.raises(ConfigError, match="unreadable"):
            cached_bank(bank, ("x", "y"), lambda: arrays)


def test_tampered_checkpoint_json(tmp_path):
    """pmm_meta.json and pmm_manifest.json as text: duplicate keys, NaN, deep nesting, cut bytes."""
    cfg, tok = load_config(DEBUG_CFG), load_tokenizer()
    good = json.dumps({"step": 3, "config": to_dict(cfg), "task_table": {"text_lm": 0}, "tokenizer_hash": tok.hash})
    rng = random.Random(9)
    variants = [good[: rng.randrange(len(good))] for _ in range(40)]
    variants += [good.replace('"step": 3', '"step": 3, "step": 4'), good.replace("3", "NaN", 1), "[" * 50_000]
    variants += [good.replace('"step": 3', '"step": 1e999'), good.replace("{", "{" * 3000, 1)]
    variants += [good.replace('"step": 3', '"step": ' + "9" * 5000)]
    for i, raw in enumerate(variants):
        tag = tmp_path / f"t{i}"
        tag.mkdir()
        (tag / ckpt.META_FILE).write_text(raw)
        (tag / ckpt.MANIFEST).write_text(raw)
        clean(ckpt.read_meta, tag)
        assert clean(ckpt.verify, tag) != []


def test_routes_files(tmp_path):
    rng = random.Random(10)
    good = json.loads(json.dumps(make_doc(BEFORE)))
    path = tmp_path / "r.json"
    for _ in range(300):
        doc = mutate(rng, good)
        doc = doc if isinstance(doc, dict) else good
        doc["format"], doc["version"] = routes_file.FORMAT, routes_file.VERSION
        path.write_text(json.dumps(doc))
        loaded = clean(routes_file.load, path)
        if loaded is not None:  # what the loader accepts, the drawing can use
            views.views(loaded)


def _outside(real: str, folder: Path) -> bool:
    return not (real == str(folder) or real.startswith(str(folder) + os.sep))


def test_media_paths(tmp_path):
    """Random paths in a media field: read only when they resolve inside the data folder; anything
    else is one line saying so, never an attempt to decode a file outside it."""
    data, outside = (tmp_path / "data").resolve(), (tmp_path / "outside").resolve()
    for d in (data / "sub", outside):
        d.mkdir(parents=True)
    Image.new("L", (4, 4)).save(data / "ok.png")
    Image.new("L", (4, 4)).save(outside / "x.png")
    (data / "in.png").symlink_to("ok.png")
    (data / "out.png").symlink_to(outside / "x.png")
    (data / "dir").symlink_to(outside, target_is_directory=True)
    (data / "loop").symlink_to("loop")
    pieces = ["..", ".", "sub", "dir", "ok.png", "in.png", "out.png", "x.png", "loop", "etc", "passwd", "", "\x00", "~"]
    rng = random.Random(11)
    for _ in range(300):
        value = ("/" if rng.random() < 0.2 else "") + "/".join(rng.choice(pieces) for _ in range(rng.randint(1, 5)))
        row = Row({"image": value}, data, lambda: "m.jsonl line 7")
        try:
            decode_image(row, "image")
            assert not _outside(os.path.realpath(data / value), data), value
        except BadSample as e:
            msg = str(e)
            assert len(msg.splitlines()) == 1 and msg.startswith("m.jsonl line 7: ") or "\x00" in value, msg
            if "\x00" not in value and _outside(os.path.realpath(data / value), data):
                assert "leads outside the data folder" in msg, (value, msg)


def _png_header(width: int, height: int, mode: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, mode, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 32)) + chunk(b"IEND", b"")


def test_media_bombs(tmp_path):
    """Image headers claiming up to 2^31 pixels a side and audio claiming many channels, seconds or a
    wild rate: refused from the header in one line (past a limit, naming it), never decoded whole."""
    rng = random.Random(12)
    rules = DEFAULT_RULES
    for _ in range(60):
        w, h = (rng.choice([1, 28, 4096, 12_000, 65_535, 2**31 - 1]) for _ in range(2))
        row = Row({"m": _png_header(w, h, rng.choice([0, 2, 4, 6]))}, tmp_path, lambda: "s.tar key k1", rules)
        try:
            decode_image(row, "m")
        except BadSample as e:
            assert len(str(e).splitlines()) == 1
            assert (w * h > rules.max_image_pixels) == ("data.max_image_pixels" in str(e)), (w, h, str(e))
    for _ in range(40):
        channels, rate = rng.choice([1, 2, 17, 300]), rng.choice([8, 8000, 16_000, 192_000])
        frames = rng.choice([1, 100, rate * 5])
        buf = stdio.BytesIO()
        soundfile.write(buf, np.zeros((min(frames, 4000), channels), np.float32), rate, format="WAV")
        data = bytearray(buf.getvalue())
        if rng.random() < 0.5:  # a header that lies about its data's length
            at = data.index(b"data") + 4
            data[at : at + 4] = struct.pack("<I", frames * channels * 2)
        row = Row({"m": bytes(data)}, tmp_path, lambda: "s.tar key k2", rules)
        try:
            decode_audio(row, "m", 16_000)
        except BadSample as e:
            assert len(str(e).splitlines()) == 1 and str(e).startswith("s.tar key k2 field 'm': "), str(e)
            if channels > rules.max_audio_channels:
                assert "data.max_audio_channels" in str(e)


def test_oversized_targets():
    """Targets of any length for a task whose targets are never cut: laid out whole, or one line
    naming data.max_len; never silently cut."""
    rng, tok = random.Random(13), load_tokenizer()
    for _ in range(60):
        target = " ".join("w" * rng.randint(1, 9) for _ in range(rng.choice([1, 5, 40, 400, 20_000])))
        max_len = rng.choice([8, 32, 96, 512])
        ex = MultimodalExample("long", (("text", "q?"),), target)
        batch = clean(collate, [ex], [0], tok, max_len, keys=["train[4]"], whole_targets={"long"})
        if batch is not None:  # the whole target and eos are labels
            assert int((batch.labels != -100).sum()) == len(tok.encode(target)) + 1
        else:
            with pytest.raises(ConfigError, match=r"task 'long', train\[4\]: .* does not fit data.max_len"):
                collate([ex], [0], tok, max_len, keys=["train[4]"], whole_targets={"long"})


class _Weird(Exception):
    def __str__(self):
        raise RuntimeError("even its message fails")


PLUGIN_ERRORS = [
    RuntimeError("codec\nmissing"),
    KeyError("image"),
    ZeroDivisionError(),
    _Weird(),
    OSError(5, "I/O error"),
    RecursionError("deep"),
    NotImplementedError(),
    AssertionError("x" * 10_000),
]


class Raising(Task):
    name, modalities, metrics = "raising_fuzz", ("text",), ("exact_match",)
    error: Exception = RuntimeError()
    at: int = 0

    def build_dataset(self, split, root, seed):
        for i in range(10):
            if i == self.at:
                raise self.error
            yield {"i": i}

    def encode(self, sample):
        if sample["i"] == self.at:
            raise self.error
        return MultimodalExample(self.name, (("text", "q"),), str(sample["i"]))


def test_plugin_exceptions_in_encode_and_build(tmp_path):
    """Whatever a plugin's encode or build_dataset raises: one line naming the task, the split and
    the sample index."""
    rng = random.Random(14)
    for k in range(40):
        task = Raising()
        task.error, task.at = rng.choice(PLUGIN_ERRORS), rng.randrange(10)
        with pytest.raises(ConfigError) as e:
            encode(task, {"i": task.at}, f"test[{task.at}]")
        msg = str(e.value)
        assert len(msg.splitlines()) == 1 and msg.startswith(f"task 'raising_fuzz', test[{task.at}]: "), msg
        assert type(task.error).__name__ in msg and len(msg) < 1000
        with pytest.raises(ConfigError) as e:
            load_split(task, "train", tmp_path / str(k), 0)
        msg = str(e.value)
        assert len(msg.splitlines()) == 1 and f"build_dataset('train') failed at train[{task.at}]" in msg, msg


def test_cli_plugin_encode_exception_is_one_line(tmp_path, data_dir):
    """`train` on a plugin whose encode raises: one error line naming task, split and sample, status 2."""
    (tmp_path / "fuzz_plugin.py").write_text(
        "from pathways_mm.tasks import MultimodalExample, Task, register_task\n"
        "@register_task\n"
        "class Flaky(Task):\n"
        "    name, modalities, metrics = 'flaky_fuzz', ('text',), ('exact_match',)\n"
        "    def build_dataset(self, split, root, seed):\n"
        "        return [{'i': i} for i in range(8)]\n"
        "    def encode(self, sample):\n"
        "        raise RuntimeError('plugin bug')\n"
    )
    cfg = tmp_path / "flaky.yaml"
    cfg.write_text(DEBUG_CFG.read_text().replace("[text_lm, text_arith]", "[flaky_fuzz]") + "plugins: [fuzz_plugin]\n")
    res = run_cli(
        ["train", cfg, *sets("train.steps=1", f"train.out_dir={tmp_path / 'run'}")],
        data_dir,
        timeout=180,
        env_extra={"PYTHONPATH": str(tmp_path)},
    )
    errors = [line for line in res.stderr.splitlines() if line.startswith("pathways-mm: error:")]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert len(errors) == 1 and "task 'flaky_fuzz', train[" in errors[0] and "RuntimeError: plugin bug" in errors[0]
