"""Malformed input — random bytes, wrong types, huge values — gives clean ConfigErrors only:
never another exception, a hang or a partial file. Seeded, a few hundred cases, a few seconds.

No routes-file loader exists on this branch yet; configs, fault specs, dataset caches, samples,
checkpoint metadata and manifests are covered.
"""

import json
import random

import pytest

from pathways_mm.config import config_from_dict, load_config, to_dict
from pathways_mm.data.collate import collate
from pathways_mm.data.datasets import encode, load_split, split_path
from pathways_mm.encoders.text import load_tokenizer
from pathways_mm.errors import ConfigError
from pathways_mm.runtime import checkpoint as ckpt
from pathways_mm.runtime import faults
from pathways_mm.runtime.checkpoint import check_compatible
from pathways_mm.tasks import Task, get_task
from tests.helpers import DEBUG_CFG, run_cli, sets

HUGE = [10**30, -(10**30), 2**63, 1e308, float("inf"), float("-inf"), float("nan"), -1, 0]


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
    with pytest.raises(RuntimeError):
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
    for _ in range(200):
        ex = clean(encode, task, junk(rng))
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
