"""Checkpoint integrity: manifests, fallback past damaged checkpoints, refusal of pickled code, NaN steps."""

import json

import pytest
import torch

from pathways_mm.config import load_config, to_dict
from pathways_mm.encoders.text import load_tokenizer
from pathways_mm.errors import ConfigError, TrainingAborted
from pathways_mm.runtime import checkpoint as ckpt
from pathways_mm.runtime.checkpoint import weights_only_load
from tests.helpers import DEBUG_CFG, MOE_CFG, read_metrics, run_cli, sets


def fake_tag(ckpt_dir, step, files=None, publish=True):
    tag = ckpt_dir / ckpt.tag_for(step)
    tag.mkdir(parents=True)
    for name, data in (files or {"model.pt": b"weights %d" % step, ckpt.META_FILE: b"{}"}).items():
        (tag / name).write_bytes(data)
    if publish:
        ckpt.publish(tag, step, ckpt.hash_files(tag, ckpt.list_files(tag)))
    return tag


def test_newest_intact_skips_unfinished_and_damaged(tmp_path, capsys):
    fake_tag(tmp_path, 2)
    damaged = fake_tag(tmp_path, 4)
    fake_tag(tmp_path, 6, publish=False)  # a save that a kill interrupted
    (damaged / "model.pt").write_bytes(b"weights 5")  # same size, other bytes
    assert ckpt.newest_intact(tmp_path) == tmp_path / "step_0000002"
    err = capsys.readouterr().err
    assert "step_0000006: its save did not finish" in err
    assert f"{damaged / 'model.pt'}: checksum differs" in err and "falling back to step_0000002" in err


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-2]), "truncated or altered"),
        (lambda p: p.unlink(), "missing"),
    ],
)
def test_explicit_damaged_checkpoint_is_an_error_naming_the_file(tmp_path, damage, message):
    tag = fake_tag(tmp_path, 2)
    damage(tag / "model.pt")
    with pytest.raises(ConfigError, match=message) as e:
        ckpt.resolve_checkpoint(tag)
    assert str(tag / "model.pt") in str(e.value)
    with pytest.raises(ConfigError, match="no intact checkpoint"):
        ckpt.newest_intact(tmp_path)


def test_no_published_checkpoint_means_start_over(tmp_path):
    fake_tag(tmp_path, 2, publish=False)
    assert ckpt.newest_intact(tmp_path) is None
    with pytest.raises(ConfigError, match="unfinished checkpoint"):
        ckpt.resolve_checkpoint(tmp_path / "step_0000002")


def test_a_checkpoint_without_a_manifest_is_never_loaded_even_where_latest_names_it(tmp_path, capsys):
    """One rule: no manifest, no load (an interrupted save, or one nothing can verify)."""
    old = fake_tag(tmp_path, 2)
    bare = fake_tag(tmp_path, 4, publish=False)
    (tmp_path / ckpt.LATEST).write_text(bare.name)  # what a pathways-mm before manifests left behind
    assert ckpt.newest_intact(tmp_path) == old
    assert f"skipping {bare}: its save did not finish (no {ckpt.MANIFEST})" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unverified weights are never loaded"):
        ckpt.resolve_checkpoint(bare)


def meta_for(cfg_dict, **extra):
    tok = load_tokenizer()
    return {
        "step": 2,
        "config": cfg_dict,
        "task_table": {"text_lm": 0, "text_arith": 1},
        "tokenizer_hash": tok.hash,
    } | extra


def test_a_checkpoint_never_chooses_plugins_or_this_machines_paths(tmp_path, monkeypatch):
    stored = to_dict(load_config(DEBUG_CFG))
    stored |= {"plugins": ["evil_plugin"], "source": "/elsewhere/exp.yaml"}
    stored["data"]["root"], stored["train"]["ds_config"] = "/elsewhere/data", "/elsewhere/ds.json"
    tag = fake_tag(tmp_path, 2, {"model.pt": b"w", ckpt.META_FILE: json.dumps(meta_for(stored)).encode()})
    monkeypatch.setenv("PMM_DATA", str(tmp_path / "mine"))
    _, _, cfg = ckpt.open_checkpoint(tag, load_tokenizer())
    assert cfg.plugins == () and cfg.data.root is None and cfg.train.ds_config is None and cfg.source is None
    _, _, cfg = ckpt.open_checkpoint(tag, load_tokenizer(), {"plugins": ["mine"], "data": {"root": "/mine"}})
    assert cfg.plugins == ("mine",) and cfg.data.root == "/mine"  # the user's own values are honoured


def test_a_plugin_task_of_a_checkpoint_says_which_plugin_to_name(tmp_path):
    stored = to_dict(load_config(DEBUG_CFG)) | {"tasks": ["text_lm", "echo_ckpt_test"], "plugins": ["their.tasks"]}
    meta = meta_for(stored, task_table={"text_lm": 0, "echo_ckpt_test": 1})
    tag = fake_tag(tmp_path, 2, {"model.pt": b"w", ckpt.META_FILE: json.dumps(meta).encode()})
    opened = ckpt.open_checkpoint(tag, load_tokenizer())
    with pytest.raises(ConfigError) as e:
        ckpt.checkpoint_tasks(opened)
    assert "task 'echo_ckpt_test' of" in str(e.value) and "add --set plugins=[their.tasks]" in str(e.value)
    assert [t.name for t in ckpt.checkpoint_tasks(opened, ["text_lm"])] == ["text_lm"]


class FullDisk:
    """An engine whose save fails the way torch.save does on a full disk."""

    def save_checkpoint(self, save_dir, tag, **kwargs):
        (torch_dir := ckpt.Path(save_dir) / tag).mkdir(parents=True)
        (torch_dir / "mp_rank_00_model_states.pt").write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2005888 vs 2005780")


def test_a_checkpoint_that_cannot_be_written_stops_the_run_in_one_line(tmp_path):
    older = fake_tag(tmp_path, 2)
    with pytest.raises(TrainingAborted) as e:
        ckpt.save_checkpoint(FullDisk(), tmp_path, 4, {"step": 4}, keep=3)
    msg = str(e.value)
    assert msg.startswith(f"could not write checkpoint {tmp_path / 'step_0000004'} (") and "--resume" in msg
    assert len(msg.splitlines()) == 1 and "MiB free there" in msg
    assert not (tmp_path / "step_0000004").exists()  # the half-written save gives its space back
    assert ckpt.newest_intact(tmp_path) == older and (tmp_path / ckpt.LATEST).read_text() == older.name


def test_prune_keeps_newest_published_and_drops_unfinished(tmp_path):
    for step in (1, 2, 3):
        fake_tag(tmp_path, step)
    fake_tag(tmp_path, 4, publish=False)
    ckpt.prune(tmp_path, keep=2)
    assert [p.name for p in ckpt.tag_dirs(tmp_path)] == ["step_0000003", "step_0000002"]


class Payload:
    def __reduce__(self):  # what a malicious checkpoint carries: a call made while unpickling
        return (exec, ("open('PWNED', 'w').close()",))


def testweights_only_loader_refuses_pickled_callable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"module": {"w": torch.ones(2)}, "hook": Payload()}, path)
    with pytest.raises(ConfigError, match="refused to load") as e:
        weights_only_load(str(path))
    assert str(path) in str(e.value) and not (tmp_path / "PWNED").exists()
    assert "it holds pickled code or objects (exec), not only tensors" in str(e.value)
    reason = str(e.value).split(": refused to load", 1)[1]
    assert "weights_only" not in reason and "trust" not in reason  # never advise loading it anyway
    torch.save({"module": {"w": torch.ones(2)}}, path)
    assert torch.equal(weights_only_load(str(path))["module"]["w"], torch.ones(2))


def train(out, data_dir, *extra, env=None, resume=False):
    args = [
        "train",
        MOE_CFG,
        *sets("train.log_every=1", "eval.max_samples=2", f"train.out_dir={out}"),
    ]
    args += ["--resume"] if resume else []
    for e in extra:
        args += [*sets(e)]
    return run_cli(args, data_dir, env_extra=env)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """A one-process MoE run with checkpoints at steps 2 and 4 (one file per expert)."""
    out = tmp_path_factory.mktemp("trained")
    res = train(out, data_dir, "train.steps=4", "train.save_every=2")
    assert res.returncode == 0, res.stderr
    return out


def copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_expert_file_is_detected_and_resume_falls_back(damage, trained, tmp_path, data_dir):
    out = copy_run(trained, tmp_path / "run")
    before = losses(out)
    expert = out / "checkpoints" / "step_0000004" / "layer_0_expert_1_mp_rank_00_model_states.pt"
    data = bytearray(expert.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    expert.write_bytes(bytes(data))
    res = run_cli(["eval", expert.parent, "--max-samples", "2"], data_dir)
    errors = [line for line in res.stderr.splitlines() if line.startswith("pathways-mm: error:")]
    assert res.returncode == 2 and len(errors) == 1 and str(expert) in errors[0], res.stderr
    res = train(out, data_dir, "train.steps=5", "train.save_every=2", resume=True)
    assert res.returncode == 0, res.stderr
    assert "checkpoint step_0000004 is damaged" in res.stderr and "falling back to step_0000002" in res.stderr
    after = losses(out)
    for step in (3, 4):  # redone from step 2: the same losses as the first time
        assert after[step] == pytest.approx(before[step], rel=1e-6, abs=1e-7)


@pytest.mark.slow
def test_checkpoint_with_pickled_callable_is_refused(trained, tmp_path, data_dir):
    out = copy_run(trained, tmp_path / "run")
    tag = out / "checkpoints" / "step_0000004"
    states = tag / "mp_rank_00_model_states.pt"
    sd = torch.load(states, weights_only=True)
    sd["client_hook"] = Payload()
    torch.save(sd, states)
    ckpt.publish(tag, 4, ckpt.hash_files(tag, ckpt.list_files(tag)))  # checksums match: the author is the attacker
    res = run_cli(["eval", tag, "--max-samples", "2"], data_dir, env_extra={"PMM_DATA": str(data_dir)})
    assert res.returncode == 2, res.stderr
    assert f"{states}: refused to load" in res.stderr and "Traceback" not in res.stderr
    assert not list(tmp_path.rglob("PWNED")) and not (out.parents[0] / "PWNED").exists()


@pytest.mark.slow
def test_checkpoint_with_another_tokenizer_is_refused_naming_the_file(trained, tmp_path, data_dir):
    out = copy_run(trained, tmp_path / "run")
    tag = out / "checkpoints" / "step_0000004"
    meta = json.loads((tag / ckpt.META_FILE).read_text())
    meta["tokenizer_hash"] = "0" * 16
    (tag / ckpt.META_FILE).write_text(json.dumps(meta))
    ckpt.publish(tag, 4, ckpt.hash_files(tag, ckpt.list_files(tag)))
    res = run_cli(["eval", tag, "--max-samples", "2"], data_dir)
    assert (
        res.returncode == 2 and f"{tag / ckpt.META_FILE}: checkpoint tokenizer '0000000000000000' differs" in res.stderr
    )


def module_weights(tag_dir):
    sd = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=True)
    experts = [torch.load(p, weights_only=True) for p in sorted(tag_dir.glob("layer_*_expert_*"))]
    return [sd["module"], *experts]


def same(a, b):
    return all(
        a_sd.keys() == b_sd.keys() and all(torch.equal(a_sd[k], b_sd[k]) for k in a_sd) for a_sd, b_sd in zip(a, b)
    )


@pytest.mark.slow
def test_injected_nan_gradient_skips_exactly_that_step(tmp_path, data_dir):
    out = tmp_path / "nan"
    res = train(
        out,
        data_dir,
        "train.steps=4",
        "train.save_every=1",
        "train.keep_checkpoints=0",
        env={"PMM_FAULT": "nan_grad:step=3"},
    )
    assert res.returncode == 0, res.stderr
    records = read_metrics(out)
    assert [r["step"] for r in records if "skipped" in r] == [3]
    assert [r["skipped_steps"] for r in records if "loss" in r] == [0, 0, 1]  # logged steps 1, 2, 4
    tags = {s: module_weights(out / "checkpoints" / ckpt.tag_for(s)) for s in (2, 3, 4)}
    assert same(tags[2], tags[3])  # step 3 changed no weight
    assert not same(tags[3], tags[4])  # step 4 trained again
    for s in (2, 3, 4):
        assert all(torch.isfinite(t).all() for sd in tags[s] for t in sd.values())


def test_too_many_non_finite_steps_stop_the_run(tmp_path, data_dir):
    res = train(
        tmp_path / "bad",
        data_dir,
        "train.steps=5",
        "train.max_bad_steps=2",
        env={"PMM_FAULT": "nan_grad:step=2,nan_grad:step=3"},
    )
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "pathways-mm: error: 2 steps in a row (up to step 3) had a non-finite loss or gradient" in res.stderr
